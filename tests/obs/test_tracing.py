"""OpenTelemetry tracing: one trace from the client's request through the consumer's
decision to the result, over the real Kafka and PostgreSQL; and off by default."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaProducer
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pipeline.harness import ServiceProcess, isolated_settings, produce, read_all, read_topic
from runstate.client import RunstateClient, state
from runstate.config import Settings
from runstate.kafka_security import kafka_options
from runstate.messages import CreateTaskRunCommand, SetStateCommand
from runstate.obs.metrics import ConsumerMetrics, RefusalLog
from runstate.pipeline.app import build_app
from runstate.pipeline.kafka import ensure_topics

# A Prefect client's trace context, as it sets it in state_details.traceparent.
PREFECT_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
PREFECT_SPAN = 0xB7AD6B7169203331
PREFECT_TRACEPARENT = f"00-{PREFECT_TRACE:032x}-{PREFECT_SPAN:016x}-01"


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def traceparent_of(span: ReadableSpan) -> str:
    return f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-{span.context.trace_flags:02x}"


async def finished(exporter: InMemorySpanExporter, done: Callable[[list[ReadableSpan]], bool],
                   timeout: float = 60.0) -> list[ReadableSpan]:
    """The spans exported once `done` holds for them (or when `timeout` ran out)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        spans = list(exporter.get_finished_spans())
        if done(spans):
            break
        await asyncio.sleep(0.1)
    return list(exporter.get_finished_spans())


@pytest.fixture(scope="module")
async def traced(base_settings):
    """The consumer in this process, its spans and a client's in one in-memory exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = isolated_settings(base_settings, partitions=2)
    app = build_app(settings, tracer_provider=provider)
    await ensure_topics(settings)
    await app.start()
    try:
        yield settings, provider, exporter
    finally:
        await app.stop()


@pytest.mark.kafka
@pytest.mark.postgres
async def test_one_trace_crosses_client_consumer_and_result(traced):
    settings, provider, exporter = traced
    exporter.clear()
    run_id = uuid.uuid4()
    async with RunstateClient(settings, tracer_provider=provider) as client:
        await client.create_task_run(run_id)
        answer = await client.propose(run_id, state("RUNNING", traceparent=PREFECT_TRACEPARENT))
    assert answer.status is not None and answer.status.value == "ACCEPT"
    # The command span ends when the consumer's publish is acknowledged, which can be
    # after the client has read the result: wait for it rather than race it.
    spans = await finished(exporter, lambda spans: any(
        s.attributes["runstate.command.id"] == str(answer.command_id) for s in named(spans, "runstate.command")))

    (request,) = [s for s in named(spans, "runstate.request")
                  if s.attributes["runstate.command.id"] == str(answer.command_id)]
    (command,) = [s for s in named(spans, "runstate.command")
                  if s.attributes["runstate.command.id"] == str(answer.command_id)]
    # client → consumer: the command span is the request span's child, in its trace.
    assert command.context.trace_id == request.context.trace_id
    assert command.parent is not None and command.parent.span_id == request.context.span_id
    assert request.attributes["runstate.status"] == "ACCEPT"
    assert command.attributes["runstate.status"] == "ACCEPT"
    # Causal order only: the consumer began after the request was sent and before it was answered.
    assert request.start_time <= command.start_time <= request.end_time
    # The proposal's own trace context (a Prefect client's) is linked, not lost.
    linked = {(link.context.trace_id, link.context.span_id) for link in command.links}
    assert (PREFECT_TRACE, PREFECT_SPAN) in linked

    # The batch that decided it: linked from the command span, with the phases as children.
    batches = {s.context.span_id: s for s in named(spans, "runstate.batch")}
    (batch_id,) = [span_id for _, span_id in linked if span_id in batches]
    batch = batches[batch_id]
    phases = {s.name for s in spans if s.parent is not None and s.parent.span_id == batch_id}
    # runstate.snapshot only when the batch read the store: a run created by this consumer
    # is decided from memory (pipeline/owned.py).
    assert {"runstate.parse", "runstate.decide", "runstate.write", "runstate.publish"} <= phases
    assert batch.start_time <= command.start_time and batch.end_time >= command.end_time

    # consumer → result: the result record carries the command span's context.
    # The whole topic (the client read the result off it): the module's other tests share it.
    results = await read_all(settings, settings.result_topic)
    (result,) = [r for r in results if str(answer.command_id).encode() in r.value]
    headers = dict(result.headers)
    assert headers["traceparent"].decode() == traceparent_of(command)


@pytest.mark.kafka
@pytest.mark.postgres
async def test_without_a_header_the_proposals_traceparent_is_the_parent(traced):
    settings, _, exporter = traced
    exporter.clear()
    run_id = uuid.uuid4()
    key = str(run_id).encode()
    set_state = SetStateCommand(command_id=uuid.uuid4(), task_run_id=run_id,
                                state=state("RUNNING", traceparent=PREFECT_TRACEPARENT))
    untraced = CreateTaskRunCommand(command_id=uuid.uuid4(), id=run_id)
    # A producer that sends no trace headers (not runstate's client).
    await produce(settings, [(key, untraced.model_dump_json().encode()),
                             (key, set_state.model_dump_json().encode()),
                             (b"not-a-run", b"{not json")])
    wanted = {str(set_state.command_id), str(untraced.command_id)}
    spans = await finished(exporter, lambda spans: wanted <= {
        s.attributes.get("runstate.command.id") for s in named(spans, "runstate.command")} and any(
        s.attributes.get("runstate.error.code") for s in spans))
    commands = {s.attributes.get("runstate.command.id"): s for s in named(spans, "runstate.command")}

    proposed = commands[str(set_state.command_id)]
    assert proposed.context.trace_id == PREFECT_TRACE
    assert proposed.parent is not None and proposed.parent.span_id == PREFECT_SPAN
    # With neither, the command span is the batch span's child.
    created = commands[str(untraced.command_id)]
    batch_ids = {s.context.span_id for s in named(spans, "runstate.batch")}
    assert created.parent is not None and created.parent.span_id in batch_ids
    # A record that is no command is traced too, as an error answer.
    (refused,) = [s for s in named(spans, "runstate.command") if s.attributes.get("runstate.error.code")]
    assert refused.attributes["runstate.error.code"] == "invalid_command"


@pytest.mark.kafka
@pytest.mark.postgres
async def test_hostile_trace_headers_are_decided_all_the_same(traced):
    settings, _, exporter = traced
    exporter.clear()
    run_id = uuid.uuid4()
    create = CreateTaskRunCommand(command_id=uuid.uuid4(), id=run_id)
    headers = [("traceparent", b"\xff\xfe"), ("traceparent", b"00-" + b"z" * 100_000), ("tracestate", None),
               ("traceparent", b"00-00000000000000000000000000000000-0000000000000000-01")]
    producer = AIOKafkaProducer(**kafka_options(settings))
    await producer.start()
    try:
        await producer.send_and_wait(settings.command_topic, create.model_dump_json().encode(),
                                     key=str(run_id).encode(), headers=headers)
    finally:
        await producer.stop()
    spans = await finished(exporter, lambda spans: any(
        s.attributes.get("runstate.command.id") == str(create.command_id) for s in spans))
    (command,) = [s for s in named(spans, "runstate.command")
                  if s.attributes.get("runstate.command.id") == str(create.command_id)]
    assert command.attributes["runstate.status"] == "ACCEPT"
    batch_ids = {s.context.span_id for s in named(spans, "runstate.batch")}
    assert command.parent is not None and command.parent.span_id in batch_ids


@pytest.mark.postgres
def test_tracing_is_off_by_default_and_metrics_can_be_turned_off(base_settings):
    # The defaults, whatever OTEL_* variables this shell may have.
    base_settings = base_settings.replace(tracing="auto", otel_traces_exporter=None, otel_exporter_otlp_endpoint=None,
                                          otel_exporter_otlp_traces_endpoint=None, metrics="on")
    app = build_app(base_settings)
    service = app.state_service  # type: ignore[union-attr]
    assert service.tracer is None
    assert isinstance(service.metrics, ConsumerMetrics)

    off = build_app(base_settings.replace(metrics="off"))
    quiet = off.state_service  # type: ignore[union-attr]
    assert isinstance(quiet.metrics, RefusalLog)
    assert [path for path, _ in off.probes.routes(metrics=False)] == ["/health", "/ready"]  # type: ignore[union-attr]


@pytest.mark.parametrize(("env", "exporter"), [
    ({}, None),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
    ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
    ({"OTEL_TRACES_EXPORTER": "none"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "RUNSTATE_TRACING": "off"}, None),
    ({"RUNSTATE_TRACING": "on"}, "otlp"),
    ({"RUNSTATE_TRACING": "on", "OTEL_TRACES_EXPORTER": "none"}, "none"),
])
def test_the_standard_variables_turn_tracing_on(monkeypatch, env, exporter):
    for var in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_SDK_DISABLED", "RUNSTATE_TRACING"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    settings = Settings(kafka_bootstrap_servers="localhost:9092", database_url="postgresql+psycopg://u@h/d")
    assert settings.traces_exporter == exporter


@pytest.mark.parametrize(("env", "endpoint"), [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}, "http://collector:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/custom"}, "http://collector:4318/custom"),
])
def test_the_otlp_exporter_sends_where_the_variables_say(monkeypatch, env, endpoint):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    from runstate.obs.tracing import tracer_provider

    for var in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_SDK_DISABLED", "RUNSTATE_TRACING", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
                "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    settings = Settings(kafka_bootstrap_servers="localhost:9092", database_url="postgresql+psycopg://u@h/d")
    provider = tracer_provider(settings, "runstate-consumer")
    assert provider is not None
    try:
        assert provider.resource.attributes["service.name"] == "runstate-consumer"
        (processor,) = provider._active_span_processor._span_processors  # noqa: SLF001
        exporter = processor.span_exporter
        assert isinstance(exporter, OTLPSpanExporter)
        assert exporter._endpoint == endpoint  # noqa: SLF001
    finally:
        provider.shutdown()


@pytest.mark.kafka
@pytest.mark.postgres
async def test_runstate_serve_traces_when_the_standard_variables_say_so(base_settings, tmp_path):
    settings = isolated_settings(base_settings, partitions=1)
    log = tmp_path / "serve.log"
    proc = ServiceProcess(settings, log, OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="traced-consumer")
    proc.start()
    try:
        run_id = uuid.uuid4()
        create = CreateTaskRunCommand(command_id=uuid.uuid4(), id=run_id)
        await produce(settings, [(str(run_id).encode(), create.model_dump_json().encode())])
        (result,) = await read_topic(settings, settings.result_topic, 1, timeout=180)  # a process's start: slow when loaded
    finally:
        proc.stop()  # SIGTERM: the spans still buffered are exported on the way out
    assert "traceparent" in dict(result.headers)
    spans = [json.loads(block) for block in _json_blocks(log.read_text())]
    commands = [s for s in spans if s.get("name") == "runstate.command"]
    assert [s["attributes"]["runstate.command.id"] for s in commands] == [str(create.command_id)]
    assert commands[0]["resource"]["attributes"]["service.name"] == "traced-consumer"
    assert {"runstate.batch", "runstate.decide", "runstate.write", "runstate.publish"} <= {s["name"] for s in spans}


def _json_blocks(text: str) -> list[str]:
    """The console exporter's spans: indented JSON objects, one after another, among log lines."""
    blocks, current = [], []
    for line in text.splitlines():
        if line == "{":
            current = [line]
        elif current:
            current.append(line)
            if line == "}":
                blocks.append("\n".join(current))
                current = []
    return blocks
