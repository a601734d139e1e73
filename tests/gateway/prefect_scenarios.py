"""Drive a Prefect API with the real prefect==3.9.1 client and print what it answered.

Runs in the separate Prefect virtualenv (prefect 3.9.1 pins fastapi<0.151, runstate
uses 0.163), started by tests/gateway/test_prefect_client.py in a subprocess:

    PREFECT_API_URL=http://127.0.0.1:PORT/api python prefect_scenarios.py   # runstate's gateway
    python prefect_scenarios.py                                              # Prefect's own server

With no PREFECT_API_URL the client runs Prefect's server in-process (ephemeral mode,
SQLite under PREFECT_HOME), which is how the test obtains the reference answers.
Prints one JSON object on stdout: per scenario, the steps with their answers.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateDetails
from prefect.results import ResultRecord, ResultRecordMetadata
from prefect.serializers import JSONSerializer
from prefect.states import Completed, Failed, Pending, Running, Scheduled

# Far enough ahead that even a slow create and propose are answered WAIT.
FUTURE_SECONDS = 120
UUID_IN_PATH = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@flow(name="runstate-gateway-acceptance")
def acceptance_flow() -> None:  # only its name and settings are used
    pass


@task(name="plain")
def plain_task() -> None:
    pass


@task(name="flaky", retries=1)
def flaky_task() -> None:
    pass


def persisted(value: Any) -> ResultRecord:
    # A result the client counts as persisted: to_state_create() sends its metadata
    # as the state's data (PREFECT_RESULTS_PERSIST_BY_DEFAULT=true is set by the test).
    return ResultRecord(
        result=value,
        metadata=ResultRecordMetadata(storage_key=f"runstate-test/{uuid.uuid4()}", serializer=JSONSerializer()),
    )


class Recorder:
    """Remembers the HTTP status of every response, so 201 vs 200 can be compared."""

    def __init__(self) -> None:
        self.last_status: int | None = None
        self.calls: list[tuple[str, str, int]] = []

    async def __call__(self, response: Any) -> None:
        self.last_status = response.status_code
        self.calls.append((response.request.method, response.request.url.path, response.status_code))


def answer(result: Any, http: int | None) -> dict[str, Any]:
    state = result.state
    return {
        "http": http,
        "status": result.status.value,
        "state_type": state.type.value if state else None,
        "state_name": state.name if state else None,
        "details": result.details.model_dump(mode="json"),
        "state_id": str(state.id) if state else None,
    }


async def main() -> dict[str, Any]:
    out: dict[str, Any] = {}
    recorder = Recorder()
    async with get_client() as client:
        client._client.event_hooks["response"].append(recorder)  # noqa: SLF001 - observing only
        out["health"] = (await client.api_healthcheck()) is None
        out["server_version"] = await client.api_version()

        flow_id = await client.create_flow(acceptance_flow)
        flow_run = await client.create_flow_run(acceptance_flow, state=Pending())
        flow_running = await client.set_flow_run_state(flow_run.id, Running())
        out["flow_run"] = {
            "flow_id_matches": flow_run.flow_id == flow_id,
            "created_state": flow_run.state.type.value if flow_run.state else None,
            "set_running": answer(flow_running, recorder.last_status),
            "read_state": (await client.read_flow_run(flow_run.id)).state_type.value,
        }

        async def new_run(t: Any, state: Any = None) -> tuple[Any, int | None]:
            run = await client.create_task_run(t, flow_run_id=flow_run.id, dynamic_key=str(uuid.uuid4()), state=state)
            return run, recorder.last_status

        async def propose(run_id: uuid.UUID, state: Any) -> dict[str, Any]:
            return answer(await client.set_task_run_state(run_id, state), recorder.last_status)

        # 1. SCHEDULED -> PENDING -> RUNNING -> COMPLETED
        run, http = await new_run(plain_task, Scheduled())
        steps = [{"created": run.state.type.value, "http": http}]
        for state in (Pending(), Running(), Completed()):
            steps.append(await propose(run.id, state))
        read = await client.read_task_run(run.id)
        history = await client.read_task_run_states(run.id)
        out["lifecycle"] = {
            "task_run_id": str(run.id),
            "steps": steps,
            "read": {"state_type": read.state_type.value, "state_name": read.state_name, "run_count": read.run_count,
                     "start_time_set": read.start_time is not None, "end_time_set": read.end_time is not None,
                     "flow_run_id_matches": read.flow_run_id == flow_run.id},
            "states": [{"id": str(s.id), "type": s.type.value, "name": s.name} for s in history],
        }

        # 2. RUNNING proposed after a COMPLETED state with a persisted result
        run, _ = await new_run(plain_task)
        out["running_after_completed"] = [
            await propose(run.id, Running()),
            await propose(run.id, Completed(data=persisted(1))),
            await propose(run.id, Running()),
        ]

        # 3. RUNNING proposed while the scheduled time is still in the future; the seconds left
        # when it was sent and when it was answered bound the WAIT delay (the two servers run at
        # their own speeds, so their delays may differ by more than a second on a loaded machine).
        start_at = datetime.now(UTC) + timedelta(seconds=FUTURE_SECONDS)
        run, _ = await new_run(plain_task, Scheduled(scheduled_time=start_at))
        sent = datetime.now(UTC)
        out["scheduled_in_future"] = [await propose(run.id, Running())]
        answered = datetime.now(UTC)
        out["seconds_left"] = [(start_at - answered).total_seconds(), (start_at - sent).total_seconds()]

        # 4. FAILED with retries left, then the retry
        run, _ = await new_run(flaky_task)
        out["retry_after_failed"] = [
            await propose(run.id, Running()),
            await propose(run.id, Failed()),
            await propose(run.id, Running()),
            await propose(run.id, Failed()),
        ]

        # 5. a second run with the same cache key is answered from the cache
        cache_key = f"runstate-gateway-{uuid.uuid4()}"
        first, _ = await new_run(plain_task)
        second, _ = await new_run(plain_task)
        out["cached"] = [
            await propose(first.id, Running()),
            await propose(first.id, Completed(data=persisted(2), state_details=StateDetails(cache_key=cache_key))),
            await propose(second.id, Pending()),
            await propose(second.id, Running(state_details=StateDetails(cache_key=cache_key))),
        ]
        # Which endpoints the client used, with ids folded: the gateway must serve them all.
        out["calls"] = sorted({f"{method} {UUID_IN_PATH.sub('{id}', path)}" for method, path, _ in recorder.calls})
    return out


if __name__ == "__main__":
    json.dump(asyncio.run(main()), sys.stdout)
