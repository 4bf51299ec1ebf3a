"""`python -m bench.run` (and `make bench`): run the benchmarks and print their figures."""

from __future__ import annotations

import sys

from .bench_unify import main

if __name__ == "__main__":
    sys.exit(main())
