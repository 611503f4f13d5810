"""`python -m cadist.cli …` (the same as the `cadist` command, without installing it)."""

from cadist.cli import main

main()
