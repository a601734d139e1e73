"""Failures that end a request without a decision (Prefect answers them with an HTTP error)."""

from __future__ import annotations

from uuid import UUID


class OrchestrationFailure(Exception):
    """Base class; `http_status` is the code Prefect 3.9.1 answers with."""

    http_status = 500


class FlowRunNotFound(OrchestrationFailure, LookupError):
    """R9: a RUNNING state was accepted for a task whose flow_run_id names a flow run that
    does not exist. Prefect raises in the after hook, rolls the transaction back and answers 404."""

    http_status = 404

    def __init__(self, flow_run_id: UUID) -> None:
        super().__init__(f"Flow run with id {flow_run_id} not found")
        self.flow_run_id = flow_run_id
