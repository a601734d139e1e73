"""Make `runstate` importable when the suite runs without PYTHONPATH=services."""

import sys
from pathlib import Path

try:
    import runstate.domain  # noqa: F401
except ImportError:  # pragma: no cover - depends on how pytest was started
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "services"))
