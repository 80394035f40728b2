"""`python -m peftkit` runs the command line, like the `peftkit` script."""

from peftkit.cli import main

main()
