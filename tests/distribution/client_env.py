"""The worker's environment: a virtualenv made by `pip install prefect==3.9.1 runstate`, with
runstate as the wheel the repository builds (the client only, no extra).

The virtualenv is built once per pyproject.toml (its dependencies decide what pip resolves)
under .cache/ (git-ignored), under a lock as tests/gateway/prefect_env.py does; each test
session then puts the wheel of the current source in front of the installed one (PYTHONPATH),
so the cached environment never runs stale code and is never changed after it is built.

    python tests/distribution/client_env.py    # build it ahead of time; prints its python
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PREFECT_REQUIREMENT = "prefect==3.9.1"
REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
VENV = CACHE / "prefect-client-venv"
STAMP = VENV / "runstate-pyproject.sha256"


def build_wheel(out: Path) -> Path:
    """The wheel of the current source, built from a clean copy: setuptools reuses an
    in-tree build/ folder, which can hold files the source no longer has."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy2(REPO / name, src / name)
        shutil.copytree(REPO / "services", src / "services",
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                       check=True)
    (wheel,) = out.glob("runstate-*.whl")
    return wheel


def client_python(wheel: Path) -> Path:
    """Python of the worker's virtualenv, built with `pip install prefect==3.9.1 WHEEL` when
    pyproject.toml changed since it was last built."""
    python = VENV / "bin" / "python"
    key = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "prefect-client-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (python.exists() and STAMP.exists() and STAMP.read_text() == key):
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", PREFECT_REQUIREMENT, str(wheel)], check=True)
            STAMP.write_text(key)
    return python


def unpack(wheel: Path, target: Path) -> Path:
    """The wheel's files as an import path (a pure-Python wheel is importable unpacked)."""
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    return target


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        print(client_python(build_wheel(Path(tmp))))
