"""`python -m cowlink` runs the command line."""

from cowlink.cli import main

main()
