"""Entry point of `python deploy/stack ...` (and of `python -m stack` with deploy/ on the path)."""

import sys
from pathlib import Path

if not __package__:
    # Run as a folder: its own directory is sys.path[0]; put deploy/ there instead, so the
    # package imports by its name and its modules never shadow top-level ones.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from stack.cli import main  # noqa: E402

sys.exit(main())
