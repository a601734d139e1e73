"""`python -m runstate` and the `runstate` script: the command line, which needs the server extra."""

from __future__ import annotations

import sys

# Top-level modules the CLI imports that the client-only install (`pip install runstate`) lacks.
SERVER_MODULES = frozenset(
    {"alembic", "fastapi", "faststream", "psycopg", "psycopg_pool", "rich", "sqlalchemy", "typer", "uvicorn", "uvloop"}
)


def main() -> None:
    # Commands import what they need when they run, so a missing module can surface there too.
    try:
        from runstate.cli import app

        app(prog_name="runstate")
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in SERVER_MODULES:
            raise
        sys.stderr.write(
            f"error: the runstate command line needs the server extra ({exc.name} is not installed):"
            " pip install 'runstate[server]'\n"
        )
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
