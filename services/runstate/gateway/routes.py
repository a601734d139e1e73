"""Prefect's paths under /api. Writes go to Kafka as commands and wait for their
decision; reads come from PostgreSQL. Status codes and bodies follow Prefect 3.9.1
(docs/rules.md, 'The request and its answer'); see README/report for where runstate cannot fill a field."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar
from uuid import UUID

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from runstate.client import RunstateTimeout
from runstate.domain import AcceptDetails, OrchestrationResult, SetStateStatus, State, StateCreate, StateType
from runstate.messages import (
    Command,
    CreateFlowRunCommand,
    CreateTaskRunCommand,
    DeleteConcurrencyLimitCommand,
    ErrorInfo,
    LimitCommand,
    LimitResultEvent,
    OrchestrationResultEvent,
    RunCommand,
    SetConcurrencyLimitCommand,
    SetFlowRunStateCommand,
    SetStateCommand,
    limit_id,
)

from .models import (
    ConcurrencyLimit,
    ConcurrencyLimitCreate,
    DetailBody,
    ErrorBody,
    Flow,
    FlowCreate,
    FlowRun,
    FlowRunCreate,
    TaskRun,
    TaskRunCreate,
    ValidationErrorBody,
)
from .state import Gateway, PendingDecision

PREFECT_VERSION = "3.9.1"
"""What /admin/version answers: the client warns when the server is older than itself."""
SERVER_API_VERSION = "0.8.4"
"""What /version answers (prefect.client.constants.SERVER_API_VERSION in 3.9.1)."""

FLOW_NAMESPACE = uuid.UUID("6f0c2a51-93a4-4b7e-8d8e-2b0b7f3c9e15")
TASK_RUN_NAMESPACE = uuid.UUID("3d7e5b8a-1c2f-4e6d-9a0b-5f4c3e2d1a09")
INTEGRITY_CONFLICT = (
    "Data integrity conflict. This usually means a unique or foreign key constraint was violated. "
    "See server logs for details."
)

router = APIRouter(prefix="/api")
C = TypeVar("C", bound=Command)

ERRORS: dict[int | str, dict[str, Any]] = {422: {"model": ValidationErrorBody}}
DECIDED: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    404: {"model": ErrorBody},
    413: {"model": ErrorBody, "description": "The body or the command it makes is larger than runstate takes."},
    500: {"model": ErrorBody},
    503: {"model": ErrorBody, "description": "No decision within the gateway's timeout; it is still made later."},
}


def gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(gateway)]
StateBody = Annotated[StateCreate, Body(description="The intended state.")]


def _not_found(detail: str) -> JSONResponse:
    # Prefect's plain 404s are FastAPI HTTPExceptions: {"detail": ...}.
    return JSONResponse(status_code=404, content={"detail": detail})


def _error(error: ErrorInfo) -> JSONResponse:
    """A command the pipeline refused, as Prefect answers the same situation."""
    if error.code == "unknown_run":
        return JSONResponse(status_code=404, content={"exception_message": error.message})
    if error.code == "unknown_limit":
        return _not_found("Concurrency limit not found")
    if error.code == "already_exists":
        return JSONResponse(status_code=409, content={"detail": INTEGRITY_CONFLICT})
    if error.code == "too_large":
        # Its result or state change would not fit its topic.
        return JSONResponse(status_code=413, content={"exception_message": error.message})
    if error.code in ("invalid_command", "unstorable"):
        # The body itself is the cause (the gateway checks what it can before sending;
        # PostgreSQL refusing a too-long key, say, is only found on the way in).
        return JSONResponse(
            status_code=422,
            content={"exception_message": "Invalid request received.", "exception_detail": [{"msg": error.message}],
                     "request_body": None},
        )
    return JSONResponse(status_code=500, content={"exception_message": "Internal Server Error"})


def _command(model: type[C], **fields: Any) -> C:
    """Build a command from a validated request: the command's own edge bounds
    (retry arithmetic, tags) refuse what the request models let through, as a 422."""
    try:
        return model(**fields)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors, body=None) from None


async def _decide(gw: Gateway, command: RunCommand, what: str) -> OrchestrationResultEvent:
    try:
        return await gw.bus.request(command, gw.result_timeout)
    except RunstateTimeout as exc:
        raise _pending(gw, command, what) from exc


async def _decide_limit(gw: Gateway, command: LimitCommand, what: str) -> LimitResultEvent:
    try:
        return await gw.bus.request(command, gw.result_timeout)
    except RunstateTimeout as exc:
        raise _pending(gw, command, what) from exc


def _pending(gw: Gateway, command: Command, what: str) -> PendingDecision:
    tid = None
    retry = ""
    if isinstance(command, SetStateCommand):
        tid = str(command.state.state_details.transition_id)
        retry = f" Send it again with state.state_details.transition_id = {tid} to get that decision."
    return PendingDecision(
        f"runstate did not decide {what} within {gw.result_timeout:g} s; the command is queued and"
        f" will still be decided.{retry}",
        tid,
    )


# -- root -------------------------------------------------------------------------
@router.get("/health", tags=["Root"])
async def health() -> bool:
    return True


@router.get("/version", tags=["Root"])
async def server_version() -> str:
    return SERVER_API_VERSION


@router.get("/hello", tags=["Root"])
async def hello() -> str:
    return "👋"


@router.get("/ready", tags=["Root"], responses={503: {"description": "The result reader or the database is down."}})
async def ready(gw: GatewayDep) -> JSONResponse:
    """Ready when decisions can be received (the result reader runs) and reads can be
    served (PostgreSQL answers); /health stays true either way."""
    if not gw.bus.reader_alive:
        return JSONResponse(status_code=503, content={"message": "The result reader is not running"})
    try:
        await gw.reads.ping()
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        return JSONResponse(status_code=503, content={"message": "Database is not available"})
    return JSONResponse(status_code=200, content={"message": "OK"})


@router.get("/admin/version", tags=["Admin"])
async def admin_version() -> str:
    return PREFECT_VERSION


@router.get("/csrf-token", tags=["Root"], responses={422: {"model": DetailBody}})
async def csrf_token(client: str = Query(..., description="The client to create a CSRF token for")) -> JSONResponse:
    # Prefect's default (CSRF protection off): the client then stops asking.
    return JSONResponse(status_code=422, content={"detail": "CSRF protection is disabled."})


# -- flows ------------------------------------------------------------------------
@router.post("/flows/", tags=["Flows"], status_code=201, responses=ERRORS)
async def create_flow(flow: FlowCreate) -> Flow:
    """Flows are only a name to runstate: the id is derived from it, so creating the
    same flow twice gives the same id (as Prefect's upsert by name does)."""
    now = datetime.now(UTC)
    return Flow(id=uuid.uuid5(FLOW_NAMESPACE, flow.name), created=now, updated=now, name=flow.name,
                tags=flow.tags, labels=flow.labels)


# -- flow runs --------------------------------------------------------------------
@router.post("/flow_runs/", tags=["Flow Runs"], status_code=201, responses=DECIDED, response_model=FlowRun)
async def create_flow_run(flow_run: FlowRunCreate, gw: GatewayDep) -> FlowRun | JSONResponse:
    run_id = uuid.uuid4()
    command = _command(
        CreateFlowRunCommand,
        command_id=uuid.uuid4(),
        id=run_id,
        name=flow_run.name or f"flow-run-{run_id.hex[:8]}",
        flow_id=flow_run.flow_id,
        state=flow_run.state or StateCreate(type=StateType.PENDING),  # Prefect's default
    )
    result = await _decide(gw, command, f"the creation of flow run {run_id}")
    if result.error is not None:
        return _error(result.error)
    created = await gw.reads.flow_run(run_id)
    if created is None:
        raise RuntimeError(f"flow run {run_id} was decided but is not in the projection")
    return created


@router.get("/flow_runs/{id:uuid}", tags=["Flow Runs"], responses={404: {"model": DetailBody}, **ERRORS}, response_model=FlowRun)
async def read_flow_run(gw: GatewayDep, flow_run_id: UUID = Path(..., alias="id")) -> FlowRun | JSONResponse:
    found = await gw.reads.flow_run(flow_run_id)
    return found if found is not None else _not_found("Flow run not found")


@router.post("/flow_runs/{id:uuid}/set_state", tags=["Flow Runs"], status_code=201, responses=DECIDED, response_model=OrchestrationResult)
async def set_flow_run_state(
    gw: GatewayDep,
    state: StateBody,
    flow_run_id: UUID = Path(..., alias="id"),
    force: bool = Body(False),
) -> OrchestrationResult | JSONResponse:
    """runstate records flow-run states as given (they are context for the task rules),
    so the answer is always ACCEPT with the recorded state."""
    command = _command(SetFlowRunStateCommand, command_id=uuid.uuid4(), flow_run_id=flow_run_id, state=state)
    result = await _decide(gw, command, f"the state of flow run {flow_run_id}")
    if result.error is not None:
        return _error(result.error)
    recorded = await gw.reads.flow_run_state_at(flow_run_id, result.seq or 0)
    return OrchestrationResult(state=recorded, status=SetStateStatus.ACCEPT, details=AcceptDetails())


@router.get("/flow_run_states/", tags=["Flow Run States"], responses=ERRORS)
async def read_flow_run_states(gw: GatewayDep, flow_run_id: UUID) -> list[State]:
    return await gw.reads.flow_run_states(flow_run_id)


# -- task runs --------------------------------------------------------------------
@router.post("/task_runs/", tags=["Task Runs"], status_code=201, responses=DECIDED, response_model=TaskRun)
async def create_task_run(task_run: TaskRunCreate, response: Response, gw: GatewayDep) -> TaskRun | JSONResponse:
    """Creates the run with its initial state (PENDING when absent, applied forced as
    Prefect does). An existing run with the same (flow_run_id, task_key, dynamic_key)
    is returned instead, with 200, also to creates sent at the same time."""
    key = (task_run.flow_run_id, task_run.task_key, task_run.dynamic_key)
    # Creates of one key wait for each other in this process; without an id, the
    # run id is derived from the key, so creates through other gateway processes
    # address the same run and the pipeline answers all but the first with it.
    async with gw.creating.hold(key):
        return await _create_task_run(task_run, response, gw)


def task_run_id_for(flow_run_id: UUID | None, task_key: str, dynamic_key: str) -> UUID:
    """The id of a task run created without one: the same for the same key."""
    return uuid.uuid5(TASK_RUN_NAMESPACE, json.dumps([str(flow_run_id) if flow_run_id else None, task_key,
                                                      dynamic_key]))


async def _create_task_run(task_run: TaskRunCreate, response: Response, gw: Gateway) -> TaskRun | JSONResponse:
    existing = await gw.reads.task_run_by_key(task_run.flow_run_id, task_run.task_key, task_run.dynamic_key)
    if existing is not None:
        response.status_code = 200
        return existing
    run_id = task_run.id or task_run_id_for(task_run.flow_run_id, task_run.task_key, task_run.dynamic_key)
    command = _command(
        CreateTaskRunCommand,
        command_id=uuid.uuid4(),
        id=run_id,
        name=task_run.name or f"{task_run.task_key or 'task'}-{run_id.hex[:8]}",
        flow_run_id=task_run.flow_run_id,
        task_key=task_run.task_key,
        dynamic_key=task_run.dynamic_key,
        tags=task_run.tags,
        cache_key=task_run.cache_key,
        cache_expiration=task_run.cache_expiration,
        empirical_policy=task_run.empirical_policy,
        state=task_run.state,
    )
    result = await _decide(gw, command, f"the creation of task run {run_id}")
    if result.error is not None and result.error.code != "already_exists":
        return _error(result.error)
    created = await gw.reads.task_run(run_id)
    if created is None:
        raise RuntimeError(f"task run {run_id} was decided but is not in the projection")
    if result.error is not None:
        # Same id already taken: a retried create of the same run is answered with it,
        # anything else is the unique-key conflict Prefect reports.
        same = (created.flow_run_id, created.task_key, created.dynamic_key) == (
            task_run.flow_run_id, task_run.task_key, task_run.dynamic_key)
        if not same:
            return _error(result.error)
        response.status_code = 200
    return created


@router.get("/task_runs/{id:uuid}", tags=["Task Runs"], responses={404: {"model": DetailBody}, **ERRORS}, response_model=TaskRun)
async def read_task_run(gw: GatewayDep, task_run_id: UUID = Path(..., alias="id")) -> TaskRun | JSONResponse:
    found = await gw.reads.task_run(task_run_id)
    return found if found is not None else _not_found("Task not found")


@router.post("/task_runs/{id:uuid}/set_state", tags=["Task Runs"], responses={**DECIDED, 201: {"model": OrchestrationResult}}, response_model=OrchestrationResult)
async def set_task_run_state(
    response: Response,
    gw: GatewayDep,
    state: StateBody,
    task_run_id: UUID = Path(..., alias="id", description="The task run id"),
    force: bool = Body(
        False,
        description="If false, orchestration rules will be applied that may alter or prevent the state "
        "transition. If True, orchestration rules are not applied.",
    ),
) -> OrchestrationResult | JSONResponse:
    """Set a task run state, invoking any orchestration rules.

    201 when a state was written (ACCEPT, or REJECT with a replacement), 200 otherwise.
    Without a `state_details.transition_id` the gateway mints one; sending the same
    request again with a transition id gets the stored decision, never a second one.
    """
    details = state.state_details
    if details.transition_id is None:
        details = details.model_copy(update={"transition_id": uuid.uuid4()})
    command = _command(
        SetStateCommand,
        command_id=uuid.uuid4(),
        task_run_id=task_run_id,
        state=state.model_copy(update={"state_details": details}),
        force=force,
    )
    result = await _decide(gw, command, f"the proposed {state.type.value} state of task run {task_run_id}")
    if result.error is not None:
        return _error(result.error)
    if result.result is None:
        raise RuntimeError(f"decision for task run {task_run_id} carries no result")
    response.status_code = 201 if result.state_appended else 200
    return result.result


@router.get("/task_run_states/", tags=["Task Run States"], responses=ERRORS)
async def read_task_run_states(gw: GatewayDep, task_run_id: UUID) -> list[State]:
    """The run's states in the order they were appended to the event log."""
    return await gw.reads.task_run_states(task_run_id)


@router.get("/task_run_states/{id:uuid}", tags=["Task Run States"], responses={404: {"model": DetailBody}, **ERRORS}, response_model=State)
async def read_task_run_state(gw: GatewayDep, state_id: UUID = Path(..., alias="id")) -> State | JSONResponse:
    found = await gw.reads.task_run_state(state_id)
    # Prefect 3.9.1 really says "Flow run state" here.
    return found if found is not None else _not_found("Flow run state not found")


# -- tag concurrency limits (Prefect's V1 API over runstate's tag limits) ------------
# Changes are commands decided by the consumer, like every write; reads come from the projection.
@router.post("/concurrency_limits/", tags=["Concurrency Limits"], status_code=201, responses=DECIDED,
             response_model=ConcurrencyLimit)
async def create_concurrency_limit(
    concurrency_limit: ConcurrencyLimitCreate, response: Response, gw: GatewayDep
) -> ConcurrencyLimit | JSONResponse:
    """Prefect's V1 create is an upsert: an existing limit gets the new value (200) and
    keeps its active slots; a new one is created active (201)."""
    tag = concurrency_limit.tag
    command = _command(SetConcurrencyLimitCommand, command_id=uuid.uuid4(), tag=tag,
                       concurrency_limit=concurrency_limit.concurrency_limit)
    result = await _decide_limit(gw, command, f"the concurrency limit of tag {tag!r}")
    if result.error is not None:
        return _error(result.error)
    response.status_code = 201 if result.created else 200
    found = await gw.reads.limit_by_tag(tag)
    if found is None:  # deleted again by a later command already: answer with what was set
        return ConcurrencyLimit(id=limit_id(tag), updated=result.decided_at, tag=tag,
                                concurrency_limit=concurrency_limit.concurrency_limit)
    return found


@router.get("/concurrency_limits/tag/{tag}", tags=["Concurrency Limits"],
            responses={404: {"model": DetailBody}, **ERRORS}, response_model=ConcurrencyLimit)
async def read_concurrency_limit_by_tag(gw: GatewayDep, tag: str) -> ConcurrencyLimit | JSONResponse:
    found = await gw.reads.limit_by_tag(tag)
    return found if found is not None else _not_found("Concurrency limit not found")


@router.get("/concurrency_limits/{id:uuid}", tags=["Concurrency Limits"],
            responses={404: {"model": DetailBody}, **ERRORS}, response_model=ConcurrencyLimit)
async def read_concurrency_limit(
    gw: GatewayDep, limit_id: UUID = Path(..., alias="id")
) -> ConcurrencyLimit | JSONResponse:
    tag = await gw.reads.tag_of_limit(limit_id)
    found = await gw.reads.limit_by_tag(tag) if tag is not None else None
    return found if found is not None else _not_found("Concurrency limit not found")


async def _delete_limit(gw: Gateway, tag: str) -> JSONResponse | None:
    command = _command(DeleteConcurrencyLimitCommand, command_id=uuid.uuid4(), tag=tag)
    result = await _decide_limit(gw, command, f"the deletion of the concurrency limit of tag {tag!r}")
    return _error(result.error) if result.error is not None else None


@router.delete("/concurrency_limits/tag/{tag}", tags=["Concurrency Limits"],
               responses={**DECIDED, 404: {"model": DetailBody}}, response_model=None)
async def delete_concurrency_limit_by_tag(gw: GatewayDep, tag: str) -> JSONResponse | None:
    return await _delete_limit(gw, tag)


@router.delete("/concurrency_limits/{id:uuid}", tags=["Concurrency Limits"],
               responses={**DECIDED, 404: {"model": DetailBody}}, response_model=None)
async def delete_concurrency_limit(gw: GatewayDep, limit_id: UUID = Path(..., alias="id")) -> JSONResponse | None:
    tag = await gw.reads.tag_of_limit(limit_id)
    if tag is None:
        return _not_found("Concurrency limit not found")
    return await _delete_limit(gw, tag)
