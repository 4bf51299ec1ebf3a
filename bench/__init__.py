"""Benchmarks: cowlink against the tools hosting operators compare it with."""
