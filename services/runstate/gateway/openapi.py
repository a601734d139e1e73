"""The gateway's OpenAPI document, written to schemas/openapi.json and checked for
drift by a test. Rewrite it with `python -m runstate.gateway.openapi`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

OPENAPI_PATH = Path(__file__).resolve().parents[3] / "schemas" / "openapi.json"


def openapi_document() -> str:
    """Stable text: sorted keys, so a diff shows only real changes."""
    from .app import create_app

    return json.dumps(create_app().openapi(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_openapi(path: Path = OPENAPI_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(openapi_document())
    return path


if __name__ == "__main__":
    sys.stdout.write(f"wrote {write_openapi()}\n")
