"""The consumer service: a FastStream app over the command topic.

Delivery contract, per batch:
  1. decide every command in memory against one snapshot read in the same
     PostgreSQL transaction that appends the events;
  2. commit that transaction;
  3. publish results, state changes and dead letters, and wait for the broker's
     acknowledgement (idempotent producer, acks=all);
  4. only then commit the consumer offsets (FastStream NACK_ON_ERROR: success
     acks, any exception seeks back to the batch's first record).
A crash anywhere before 4 redelivers the batch; the store recognises every
record already decided and its stored outcome is published again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from faststream import AckPolicy, FastStream
from faststream.asgi import AsgiFastStream
from faststream.kafka import KafkaBroker
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from faststream.specification import AsyncAPI

from runstate import __version__
from runstate.config import Settings
from runstate.kafka_security import faststream_security
from runstate.messages import OrchestrationResultEvent, StateChangeEvent
from runstate.obs.metrics import ConsumerMetrics, RefusalLog
from runstate.obs.probes import ConsumerProbes
from runstate.pipeline.consumer import CoalescingConsumer
from runstate.pipeline.kafka import KafkaPublisher, ensure_topics
from runstate.pipeline.service import OrchestrationService
from runstate.store.postgres import PostgresEventStore

_log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider


async def _parse_batch(records: tuple[Any, ...], original: Callable[..., Awaitable[Any]]) -> Any:
    """FastStream's batch parser decodes every header value as UTF-8 and so fails
    the whole batch on one binary or null header, before runstate sees a record.
    runstate reads no header of a command but the trace context: such values are
    passed on as text."""
    try:
        return await original(records)
    except Exception:  # noqa: BLE001 - any header the parser cannot take
        return await original(tuple(dataclasses.replace(r, headers=_text_headers(r.headers)) for r in records))


def _text_headers(headers: Any) -> list[tuple[str, bytes]]:
    return [(str(name), (value or b"").decode("utf-8", "replace").encode()) for name, value in headers or ()]


async def _records_of(message: Any) -> Any:
    # The batch's records go to the handler as they came: the service parses
    # them itself, so that a malformed one becomes a dead letter instead of
    # failing the whole batch. (Context("message") would cost a worker-thread
    # hop per batch: fast_depends resolves it synchronously.)
    return message.raw_message


def new_service(settings: Settings) -> OrchestrationService:
    """The batch service on PostgreSQL; `connect` gives it its Kafka publisher."""
    return OrchestrationService(settings, PostgresEventStore(settings.database_url, settings.lanes))


async def connect(service: OrchestrationService) -> None:
    """Create or check the topics, start the publisher sized for them, open the store."""
    limits = await ensure_topics(service.settings)
    publisher = KafkaPublisher(service.settings, limits)
    await publisher.start()
    service.publisher = publisher
    service.max_message_bytes = limits.outcome_bytes
    await service.store.open()


# Each step of a stop gets this long: what is decided is committed before its offsets, so a step
# that hangs (a broker or server gone while the process idled) is left rather than keeping the
# process alive past its supervisor's grace period.
STOP_STEP_SECONDS = 5.0


async def bounded_step(name: str, step: Awaitable[None], seconds: float = STOP_STEP_SECONDS) -> None:
    """Await one step of a stop for at most `seconds`; a failure or a timeout is logged, not raised,
    so the steps after it still run."""
    try:
        await asyncio.wait_for(step, seconds)
    except TimeoutError:
        _log.warning("stopping: %s did not finish within %.0f s; left", name, seconds)
    except Exception as exc:  # a stop that fails leaves nothing undone that a restart needs
        _log.warning("stopping: %s failed: %r", name, exc)


async def disconnect(service: OrchestrationService) -> None:
    if isinstance(service.publisher, KafkaPublisher):
        await bounded_step("the Kafka producer", service.publisher.stop())
    await bounded_step("the PostgreSQL pool", service.store.close())


def _trace(service: OrchestrationService, provider: TracerProvider) -> None:
    from runstate.obs.tracing import ConsumerTracer  # the OpenTelemetry API: only when tracing is on

    tracer = ConsumerTracer(provider, service.settings.command_topic)
    service.tracer = tracer
    service.metrics = tracer.metrics(service.metrics)


# The cyclic GC's young generation. Deciding allocates many short-lived objects (freed by
# their reference counts) and almost no cycles; what survives a collection is mostly the
# run heads this process remembers, so it is frozen at once (`freeze_survivors`) and never
# scanned again. At 50,000 a collection stalled the event loop 17-57 ms every ~7 s while
# those caches filled; at 10,000 with the survivors frozen, 7-14 ms every ~1.4 s.
GC_YOUNG_THRESHOLD = 10_000


def freeze_survivors(phase: str, info: dict[str, Any]) -> None:
    """A gc callback: after each collection, what survived it goes to the permanent
    generation. A cycle among objects that outlived one collection is then never freed;
    the consumer's collections find ~no cycles at all (26 objects, at start-up)."""
    if phase == "stop":
        gc.freeze()


def _build_coalescing_consumers(broker: KafkaBroker, linger_ms: int, on_commit: Any) -> None:
    """The subscribers build their aiokafka consumers through the broker config's
    factory (the hook FastStream's own test broker replaces); ours coalesces
    fetches and times commits. FastStream sets a plain factory again when the
    broker connects, so ours is put back right after."""
    config = broker.config.broker_config

    def install() -> None:
        config.builder = partial(CoalescingConsumer, linger_ms=linger_ms, on_commit=on_commit,
                                 **config.builder.keywords)  # type: ignore[attr-defined]  # a functools.partial

    connect = config.connect

    async def connect_then_install(**connection: Any) -> None:
        await connect(**connection)
        install()

    install()
    config.connect = connect_then_install  # type: ignore[method-assign]


def build_app(settings: Settings | None = None, *,
              tracer_provider: TracerProvider | None = None) -> FastStream | AsgiFastStream:
    """The composition root of `runstate serve`: the ports' adapters wired in.
    With a metrics port, FastStream's ASGI app, serving /metrics, /health and /ready.
    Spans go to `tracer_provider`, else to the one the settings ask for (none by default)."""
    settings = settings or Settings.load()
    metrics = ConsumerMetrics()
    metrics_on = settings.metrics == "on"
    # FastStream's access log ("Received", "Processed") goes to DEBUG: two
    # lines a batch are a visible part of a small batch's CPU.
    broker = KafkaBroker(
        # A cluster's comma-separated addresses as a list: FastStream takes one string for one host.
        [a.strip() for a in settings.kafka_bootstrap_servers.split(",") if a.strip()],
        security=faststream_security(settings),
        client_id="runstate-service",
        graceful_timeout=settings.shutdown_timeout_ms / 1000,
        log_level=logging.DEBUG,
        middlewares=[KafkaPrometheusMiddleware(registry=metrics.registry, app_name="runstate")] if metrics_on else [],
    )
    _build_coalescing_consumers(broker, settings.batch_timeout_ms,
                                partial(metrics.phase, "commit") if metrics_on else None)
    service = new_service(settings)
    service.metrics = metrics if metrics_on else RefusalLog()
    own_provider = None
    if tracer_provider is None and settings.traces_exporter is not None:
        from runstate.obs.tracing import tracer_provider as configured_provider

        tracer_provider = own_provider = configured_provider(settings, "runstate-consumer")
    if tracer_provider is not None:
        _trace(service, tracer_provider)

    # Declared for the AsyncAPI document; the service publishes through its
    # own producer so one batch's sends are in flight together.
    broker.publisher(
        settings.result_topic,
        title="orchestration-results",
        description="One orchestration result per decided command, keyed by run id.",
        schema=OrchestrationResultEvent,
    )
    broker.publisher(
        settings.state_change_topic,
        title="state-changes",
        description="Every appended state, keyed by task-run id, in per-run sequence order.",
        schema=StateChangeEvent,
    )
    broker.publisher(
        settings.dead_letter_topic,
        title="dead-letter",
        description="Commands that could not be decided: the original bytes, with x-error headers.",
        schema=bytes,
    )

    async def on_commands(records):  # noqa: ANN001 - untyped: nothing to validate
        await service.handle_records(records)

    # Each lane is one more member of the consumer group, with partitions of
    # its own: while one lane waits on PostgreSQL or the broker, another
    # decides, so one process keeps its core busy.
    subscribers = []
    for lane in range(settings.lanes):
        subscriber = broker.subscriber(
            settings.command_topic,
            group_id=settings.consumer_group,
            batch=True,
            max_records=settings.max_batch,
            batch_timeout_ms=settings.batch_timeout_ms,
            auto_offset_reset="earliest",
            ack_policy=AckPolicy.NACK_ON_ERROR,
            parser=_parse_batch,
            decoder=_records_of,
            title="commands",
            description=(
                "create_task_run / set_task_run_state / create_flow_run / set_flow_run_state, keyed by run id."
            ),
            include_in_schema=lane == 0,
        )
        subscriber(on_commands)
        subscribers.append(subscriber)

    probes = ConsumerProbes(service, metrics, lambda: [s.consumer for s in subscribers])
    specification = AsyncAPI(broker, title="runstate", version=__version__, description=__doc__)
    app: FastStream | AsgiFastStream
    if settings.metrics_port:
        app = AsgiFastStream(broker, asgi_routes=probes.routes(metrics=metrics_on), specification=specification)
    else:
        app = FastStream(broker, specification=specification)

    @app.on_startup
    async def start_service() -> None:
        await connect(service)
        # Deciding a batch allocates many short-lived objects and almost no
        # cycles: the cyclic GC's default thresholds made it a visible share of
        # a batch's CPU. What is imported by now lives as long as the process.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 100)
        if freeze_survivors not in gc.callbacks:
            gc.callbacks.append(freeze_survivors)

    @app.after_shutdown
    async def stop_service() -> None:
        if freeze_survivors in gc.callbacks:  # a test process goes on collecting as before
            gc.callbacks.remove(freeze_survivors)
        await bounded_step("the probes", probes.close())
        await disconnect(service)
        if own_provider is not None:  # exports the spans still buffered
            await bounded_step("the span exporter", asyncio.to_thread(own_provider.shutdown))

    app.state_service = service  # type: ignore[union-attr]
    app.probes = probes  # type: ignore[union-attr]
    return app
