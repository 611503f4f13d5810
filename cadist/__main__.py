"""`python -m cadist …` (the same as the `cadist` command)."""

from cadist.cli import main

main()
