"""`python -m reals_cli` is the `reals` command."""

from .cli import main

main(prog_name="reals")  # as the console script names itself, in usage lines and error hints
