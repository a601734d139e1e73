"""The separate virtualenv holding the real prefect==3.9.1 client.

Prefect 3.9.1 pins fastapi<0.151 while runstate's gateway uses fastapi 0.163, so the
two cannot share one environment. The client side of the acceptance test runs in
this venv, in a subprocess. It is built on first use (about a minute, from PyPI)
under .cache/ (git-ignored), or taken from RUNSTATE_PREFECT_PYTHON when set.

    python tests/gateway/prefect_env.py     # build it ahead of time; prints its python
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

PREFECT_REQUIREMENT = "prefect==3.9.1"
REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".cache" / "prefect-venv"


def prefect_python() -> Path:
    """Path of a python that can import prefect 3.9.1; builds the venv if needed."""
    explicit = os.environ.get("RUNSTATE_PREFECT_PYTHON")
    if explicit:
        return Path(explicit)
    python = VENV / "bin" / "python"
    VENV.parent.mkdir(parents=True, exist_ok=True)
    # The acceptance test asks for it from two coroutines at once (gateway and Prefect's
    # own server): only one may build it, the other waits and then finds it built.
    with open(VENV.parent / "prefect-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _has_prefect(python):
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", PREFECT_REQUIREMENT], check=True)
    return python


def _has_prefect(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run(
        [str(python), "-c", "import prefect, sys; sys.exit(prefect.__version__ != '3.9.1')"],
        capture_output=True,
    )
    return probe.returncode == 0


if __name__ == "__main__":
    print(prefect_python())
