"""Entry point of `python deploy/stack ...` (and of `python -m stack` with deploy/ on the path)."""

import sys
from pathlib import Path

if not __package__:
    # Run as a folder: its own directory is sys.path[0], where its modules would shadow
    # top-level ones; import the package by its name from deploy/ instead.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from stack.cli import main

sys.exit(main())
