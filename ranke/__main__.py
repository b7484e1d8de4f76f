"""`python -m ranke ...` is the `ranke` command (worker processes use it)."""

from ranke.cli import main

main()
