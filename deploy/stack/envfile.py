"""The one writer of .runstate/env: `export KEY=value` lines, quoted for the shell, so that
`set -a; . .runstate/env; set +a` loads them. runstate.envfile is its one reader."""

from __future__ import annotations

import shlex
from pathlib import Path

HEADER = "# Written by deploy/stack up. Load with: set -a; . .runstate/env; set +a"


def write_env_file(path: Path, env: dict[str, str]) -> None:
    lines = [HEADER, *(f"export {key}={shlex.quote(value)}" for key, value in env.items())]
    path.write_text("\n".join(lines) + "\n")
