"""The one writer of .runstate/env (and .runstate/service.env): `export KEY=value` lines,
quoted for the shell, so that `set -a; . .runstate/env; set +a` loads them; mode 0600, as they
carry passwords. runstate.envfile is its one reader. `shown` is how a value may be printed."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from .security import write_private

HEADER = "# Written by deploy/stack up. Load with: set -a; . .runstate/env; set +a"
SERVICE_HEADER = ("# Written by deploy/stack up: the runstate services' own credentials (not a worker's).\n"
                  "# Load with: set -a; . .runstate/env; . .runstate/service.env; set +a")
# Variables whose whole value is a secret.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING")
# The password part of a URL: scheme://user:PASSWORD@host
URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def write_env_file(path: Path, env: dict[str, str], header: str = HEADER) -> None:
    lines = [header, *(f"export {key}={shlex.quote(value)}" for key, value in env.items())]
    write_private(path, "\n".join(lines) + "\n")


def shown(key: str, value: str) -> str:
    """`value` as it may be printed: secrets and the passwords in URLs replaced by ***."""
    if SECRET_NAME.search(key):
        return "***"
    return URL_PASSWORD.sub(r"\1***@", value)
