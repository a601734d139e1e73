"""schemas/openapi.json is the gateway's current OpenAPI document."""

from __future__ import annotations

import json

from runstate.gateway.openapi import OPENAPI_PATH, openapi_document

PREFECT_PATHS = {
    "/api/task_runs/", "/api/task_runs/{id}", "/api/task_runs/{id}/set_state",
    "/api/task_run_states/", "/api/task_run_states/{id}",
    "/api/flows/", "/api/flow_runs/", "/api/flow_runs/{id}", "/api/flow_runs/{id}/set_state",
    "/api/concurrency_limits/", "/api/concurrency_limits/{id}", "/api/concurrency_limits/tag/{tag}",
    "/api/health", "/api/admin/version", "/api/csrf-token",
}


def test_openapi_document_has_not_drifted():
    assert OPENAPI_PATH.is_file(), "schemas/openapi.json is missing: run `python -m runstate.gateway.openapi`"
    assert OPENAPI_PATH.read_text() == openapi_document(), (
        "schemas/openapi.json is out of date: run `python -m runstate.gateway.openapi` and review the diff"
    )


def test_openapi_document_covers_prefects_paths():
    document = json.loads(openapi_document())
    assert set(document["paths"]) >= PREFECT_PATHS
    set_state = document["paths"]["/api/task_runs/{id}/set_state"]["post"]
    assert {"200", "201", "404", "422", "503"} <= set(set_state["responses"])
