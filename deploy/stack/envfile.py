"""The one writer of .runstate/env: `export KEY=value` lines, quoted for the shell, so that
`set -a; . .runstate/env; set +a` loads them. runstate.envfile is its one reader."""

from __future__ import annotations

import shlex
from pathlib import Path

from .security import write_private

HEADER = "# Written by deploy/stack up. Load with: set -a; . .runstate/env; set +a"


def env_file_text(env: dict[str, str]) -> str:
    lines = [HEADER, *(f"export {key}={shlex.quote(value)}" for key, value in env.items())]
    return "\n".join(lines) + "\n"


def write_env_file(path: Path, env: dict[str, str]) -> None:
    """Written readable by its owner only: it carries passwords."""
    write_private(path, env_file_text(env))
