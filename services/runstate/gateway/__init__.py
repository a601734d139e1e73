"""Prefect-compatible HTTP gateway: Prefect 3.9.1's REST calls under /api become
runstate commands on Kafka, answered with their decisions; reads come from
PostgreSQL. Run it with `runstate gateway --host --port`; its OpenAPI document is
schemas/openapi.json (`python -m runstate.gateway.openapi` rewrites it)."""

from .app import DEFAULT_RESULT_TIMEOUT, create_app

__all__ = ["DEFAULT_RESULT_TIMEOUT", "create_app"]
