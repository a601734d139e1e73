"""Models: seed JSON round-trips, request validation, policy normalisation, data handling."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from runstate.domain import (
    EmpiricalPolicy,
    OrchestrationResult,
    SetStateRequest,
    State,
    StateCreate,
    StateDetails,
    StateType,
    data_as_returned,
    stored_data,
)

HERE = Path(__file__).resolve().parent
EMBEDDED_SEEDS = HERE / "seed_examples.json"
SHARED_SEEDS = Path(__file__).resolve().parents[2] / ".." / "shared" / "seeds"


def seed_examples() -> dict[str, list[dict]]:
    return json.loads(EMBEDDED_SEEDS.read_text())


def _examples_in(text: str) -> list[dict]:
    decoder, found, position = json.JSONDecoder(), [], 0
    while (position := text.find('{\n"state"', position)) != -1:
        example, position = decoder.raw_decode(text, position)
        if example not in found:
            found.append(example)
    return found


REFERENCE = seed_examples()["set-task-run-state.api-reference"][0]
OLDER_PAGE = seed_examples()["set-task-run-state.api-page"][0]


@pytest.mark.skipif(not SHARED_SEEDS.is_dir(), reason="shared/seeds not beside this checkout")
def test_embedded_seed_copy_matches_shared_seed_pages():
    from_pages = {p.stem: _examples_in(p.read_text()) for p in sorted(SHARED_SEEDS.glob("*.txt"))}
    assert from_pages == seed_examples()


def test_reference_seed_round_trips_exactly():
    parsed = OrchestrationResult.model_validate(REFERENCE)
    assert parsed.model_dump(mode="json") == REFERENCE
    assert json.loads(parsed.model_dump_json()) == REFERENCE


def test_older_page_seed_round_trips_its_own_keys():
    # The older page predates deployment_concurrency_lease_id; every key it has comes back unchanged.
    parsed = OrchestrationResult.model_validate(OLDER_PAGE)
    assert parsed.model_dump(mode="json", exclude_unset=True) == OLDER_PAGE
    assert parsed.model_dump(mode="json")["state"]["state_details"]["deployment_concurrency_lease_id"] is None


def test_seed_timestamps_come_back_with_z_and_no_fraction():
    dumped = OrchestrationResult.model_validate(REFERENCE).model_dump(mode="json")
    assert dumped["state"]["timestamp"] == "2023-11-07T05:31:56Z"
    assert dumped["state"]["state_details"]["scheduled_time"] == "2023-11-07T05:31:56Z"


@pytest.mark.parametrize(
    "given, expected",
    [
        ("2024-05-01T12:00:00.000001Z", "2024-05-01T12:00:00.000001Z"),
        ("2024-05-01T12:00:00.120000+00:00", "2024-05-01T12:00:00.120000Z"),
        ("2024-05-01T14:00:00+02:00", "2024-05-01T12:00:00Z"),
        ("2024-05-01T12:00:00", "2024-05-01T12:00:00Z"),  # naive means UTC
    ],
)
def test_timestamps_serialise_as_utc_with_z_keeping_microseconds(given, expected):
    parsed = State.model_validate({"id": REFERENCE["state"]["id"], "type": "PENDING", "timestamp": given})
    assert parsed.timestamp.tzinfo is not None
    assert parsed.model_dump(mode="json")["timestamp"] == expected


def test_state_create_rejects_server_minted_and_unknown_fields():
    for extra in ({"id": REFERENCE["state"]["id"]}, {"timestamp": "2024-01-01T00:00:00Z"}, {"colour": "red"}):
        with pytest.raises(ValidationError):
            StateCreate.model_validate({"type": "RUNNING", **extra})


@pytest.mark.parametrize(
    "body, name",
    [
        ({"type": "CANCELLING"}, "Cancelling"),
        ({"type": "SCHEDULED", "name": None}, "Scheduled"),
        ({"type": "RUNNING", "name": ""}, ""),
        ({"type": "RUNNING", "name": "Mine"}, "Mine"),
    ],
)
def test_state_create_name_defaults_to_capitalised_type_only_when_missing(body, name):
    assert StateCreate.model_validate(body).name == name


def test_state_create_rejects_an_invalid_type():
    with pytest.raises(ValidationError):
        StateCreate.model_validate({"type": "SLEEPING"})


def test_state_details_drop_unknown_keys():
    details = StateDetails.model_validate({"cache_key": "k", "made_up": 1})
    assert "made_up" not in details.model_dump()
    assert details.cache_key == "k"


def test_request_ignores_unknown_top_level_keys_but_needs_the_state_wrapper():
    parsed = SetStateRequest.model_validate({"state": {"type": "PENDING"}, "force": True, "extra": 1})
    assert parsed.force is True and parsed.state.type is StateType.PENDING
    with pytest.raises(ValidationError):
        SetStateRequest.model_validate({"type": "PENDING"})


@pytest.mark.parametrize(
    "given, retries, retry_delay",
    [
        ({}, None, None),
        ({"max_retries": 3}, 3, None),
        ({"retries": 0, "max_retries": 3}, 3, None),  # 0 counts as empty, as in Prefect
        ({"retries": 2, "max_retries": 3}, 2, None),
        ({"retry_delay_seconds": 5}, None, 5),
        ({"retry_delay": [], "retry_delay_seconds": 5}, None, 5),
        ({"retry_delay": [1, 2], "retry_delay_seconds": 5}, None, [1, 2]),
    ],
)
def test_empirical_policy_folds_deprecated_fields(given, retries, retry_delay):
    policy = EmpiricalPolicy.model_validate(given)
    assert (policy.retries, policy.retry_delay) == (retries, retry_delay)


def test_empirical_policy_limits():
    EmpiricalPolicy(retry_delay=[1.0] * 50)
    with pytest.raises(ValidationError):
        EmpiricalPolicy(retry_delay=[1.0] * 51)
    with pytest.raises(ValidationError):
        EmpiricalPolicy(retry_jitter_factor=-0.1)


ARTEFACT_DATA = {"value": 1, "artifact_key": "k", "artifact_type": "t", "artifact_description": "d"}


@pytest.mark.parametrize(
    "data, returned, stored",
    [
        (None, None, None),
        ({"type": "unpersisted"}, {"type": "unpersisted"}, None),
        (ARTEFACT_DATA, {"value": 1}, {"value": 1}),
        ("<unknown>", "<unknown>", "<unknown>"),
        ([1, 2], [1, 2], [1, 2]),
    ],
)
def test_data_as_returned_and_as_stored(data, returned, stored):
    written = State(id=REFERENCE["state"]["id"], type="COMPLETED", timestamp=datetime.now(UTC), data=data)
    assert data_as_returned(data) == returned
    assert stored_data(written) == stored


def test_stored_data_of_no_state_is_none():
    assert stored_data(None) is None


def test_datetime_microseconds_survive_a_json_round_trip():
    at = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC) + timedelta(microseconds=7)
    original = State(id=REFERENCE["state"]["id"], type="RUNNING", timestamp=at)
    assert State.model_validate_json(original.model_dump_json()) == original
