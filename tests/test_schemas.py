"""The wire contracts in schemas/ are generated from the code; this fails when
they drift (regenerate with `python -m runstate.schemas`)."""

from __future__ import annotations

import json

import pytest

from runstate.schemas import SCHEMAS_DIR, documents


@pytest.mark.parametrize("name", sorted(documents()))
def test_committed_schema_matches_the_code(name: str) -> None:
    committed = SCHEMAS_DIR / name
    assert committed.is_file(), f"schemas/{name} is missing: run python -m runstate.schemas"
    assert json.loads(committed.read_text()) == json.loads(documents()[name]), (
        f"schemas/{name} drifted from the code: run python -m runstate.schemas"
    )


def test_asyncapi_names_every_topic() -> None:
    document = json.loads(documents()["asyncapi.json"])
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == {
        "runstate.commands",
        "runstate.results",
        "runstate.state-changes",
        "runstate.dead-letter",
    }
