"""``python -m pairscout.cli``."""

from pairscout.cli import main

main()
