"""`python -m reals_cli` is the `reals` command."""

from .cli import main

main()
