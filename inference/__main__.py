"""``python -m inference check``: the same as the ``inference`` command."""

from .cli import main

main()
