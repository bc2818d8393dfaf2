"""``python -m tracker``: the command line, as the ``tracker`` script runs it."""

from tracker.cli import main

main()
