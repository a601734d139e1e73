"""Wire contracts as documents: JSON Schema of every message and the AsyncAPI
document of the service, written to the repo's schemas/ folder and checked for
drift by a test (`python -m runstate.schemas` rewrites them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import SecretStr

from runstate.config import Settings
from runstate.messages import COMMAND_ADAPTER, json_schemas

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"

# Documents describe the default topic names, not whatever the local env says.
DOCUMENT_SETTINGS = Settings.model_construct(  # model_construct: the defaults, no environment
    kafka_bootstrap_servers="localhost:9092",
    database_url=SecretStr("postgresql+psycopg://runstate_app@localhost/runstate"),
    admin_database_url=SecretStr("postgresql+psycopg://runstate_owner@localhost/runstate"),
)


def asyncapi_document() -> str:
    from runstate.pipeline.app import build_app

    app = build_app(DOCUMENT_SETTINGS)
    document = app.schema.to_specification().to_jsonable()
    # The command handler takes raw records (it validates them itself, so that
    # a bad one is dead-lettered rather than failing its batch); FastStream
    # therefore sees no payload type, and the Command union is filled in here.
    command = COMMAND_ADAPTER.json_schema(ref_template="#/components/schemas/{model}")
    schemas = document["components"]["schemas"]
    schemas.update(command.pop("$defs", {}))
    schemas["Command"] = command
    # What FastStream derived from the untyped handler parameter, replaced below.
    schemas.pop("EmptyPayload", None)
    schemas.pop("commands:Message:Payload", None)
    document["components"]["messages"]["commands:SubscribeMessage"]["payload"] = {
        "$ref": "#/components/schemas/Command"
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def documents() -> dict[str, str]:
    docs = {
        f"{name}.schema.json": json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for name, schema in json_schemas().items()
    }
    docs["asyncapi.json"] = asyncapi_document()
    return docs


def write(folder: Path = SCHEMAS_DIR) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in documents().items():
        path = folder / name
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else SCHEMAS_DIR):
        print(path)
