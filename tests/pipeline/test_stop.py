"""A consumer's stop is bounded: a step that hangs (a broker or server gone while the process
idled) is logged and left, and the steps after it still run."""

from __future__ import annotations

import asyncio
import logging
import time

from runstate.pipeline.app import bounded_step


async def _hangs() -> None:
    await asyncio.Event().wait()


async def _fails() -> None:
    raise ConnectionError("broker gone")


async def test_a_hanging_step_is_left_after_its_bound_and_the_next_step_runs(caplog) -> None:
    ran: list[str] = []

    async def next_step() -> None:
        ran.append("next")

    caplog.set_level(logging.WARNING, logger="runstate.pipeline.app")
    started = time.monotonic()
    await bounded_step("the Kafka producer", _hangs(), seconds=0.2)
    await bounded_step("the PostgreSQL pool", next_step(), seconds=0.2)
    assert time.monotonic() - started < 30  # returned, not stuck (a bound, not a timing assertion)
    assert ran == ["next"]
    assert any("the Kafka producer did not finish" in r.getMessage() for r in caplog.records)


async def test_a_failing_step_is_logged_not_raised(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="runstate.pipeline.app")
    await bounded_step("the probes", _fails(), seconds=5)
    assert any("the probes failed" in r.getMessage() and "broker gone" in r.getMessage() for r in caplog.records)
