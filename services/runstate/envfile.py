"""The one reader of `.runstate/env`, the file `deploy/stack up` writes: `export KEY=value`
lines with values quoted for the shell."""

from __future__ import annotations

import shlex
from pathlib import Path

ENV_FILE = Path(".runstate") / "env"


def find_env_file(start: Path | None = None) -> Path | None:
    """The .runstate/env of `start` (default: the working directory) or of its nearest parent."""
    here = start or Path.cwd()
    for folder in (here, *here.parents):
        candidate = folder / ENV_FILE
        if candidate.is_file():
            return candidate
    return None


def read_env_file(path: Path | None) -> dict[str, str]:
    """KEY -> value; an absent file has no values."""
    values: dict[str, str] = {}
    if path is None or not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :]
        key, sep, raw = line.partition("=")
        if sep:
            parts = shlex.split(raw)
            values[key.strip()] = parts[0] if parts else ""
    return values
