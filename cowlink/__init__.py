"""cowlink: Linux-VServer style unification of guest trees on a stock Linux kernel."""

__version__ = "0.1.0"
