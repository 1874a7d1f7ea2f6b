"""``python -m pairscout``: the command line."""

from pairscout.cli import main

main()
