"""OpenTelemetry tracing: the consumer's spans, the client's request span, the W3C
trace context they pass in Kafka headers, and the tracer provider the settings ask for.

Off by default (Settings.traces_exporter is None): then the service holds no tracer
and runs none of this, and the OpenTelemetry SDK is never imported.

The spans:
  runstate.request   the client, from producing a command to its result (kind CLIENT);
                     its context travels in the command record's `traceparent` header.
  runstate.command   the consumer, one per record, from the batch's start to its result
                     acknowledged; the child of the record's header context, else of the
                     proposal's `state_details.traceparent` (a Prefect client's), which is
                     linked when both are there. Its context is the result's `traceparent`.
  runstate.batch     the consumer, one per batch; each command span links to it, and its
                     children are the phases: runstate.parse, .snapshot (the database read, when
                     the batch needs one: pipeline/owned.py), .decide, .write (the database
                     write and commit) and .publish.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context, attach, detach
from opentelemetry.propagate import get_global_textmap
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from runstate import __version__
from runstate.config import Settings, SettingsError
from runstate.pipeline.ports import BatchOutcome, ServiceMetrics
from runstate.pipeline.records import BadRecord, ParsedCommand

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from runstate.messages import Command, OrchestrationResultEvent

log = logging.getLogger("runstate.tracing")

Headers = Sequence[tuple[str, Any]]

SYSTEM = {"messaging.system": "kafka"}
PHASE_ATTRIBUTES: dict[str, dict[str, str]] = {
    "snapshot": {"db.system.name": "postgresql", "db.operation.name": "SELECT"},
    "write": {"db.system.name": "postgresql", "db.operation.name": "INSERT"},
    "publish": {**SYSTEM, "messaging.operation.type": "send"},
}
_W3C = TraceContextTextMapPropagator()


# -- Kafka headers as a carrier ---------------------------------------------------------
class _HeaderGetter(Getter[Headers]):
    def get(self, carrier: Headers, key: str) -> list[str] | None:
        found = [_text(value) for name, value in carrier if name == key and value]
        return found or None

    def keys(self, carrier: Headers) -> list[str]:
        return [name for name, _ in carrier]


class _HeaderSetter(Setter[list[tuple[str, bytes]]]):
    def set(self, carrier: list[tuple[str, bytes]], key: str, value: str) -> None:
        carrier.append((key, value.encode()))


HEADER_GETTER = _HeaderGetter()
HEADER_SETTER = _HeaderSetter()


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def context_headers(span: Span) -> list[tuple[str, bytes]]:
    """The span's context as Kafka headers, by the configured propagator (W3C traceparent by default)."""
    headers: list[tuple[str, bytes]] = []
    get_global_textmap().inject(headers, context=trace.set_span_in_context(span), setter=HEADER_SETTER)
    return headers


def sent_context(headers: Headers | None) -> SpanContext | None:
    """The span context a record's headers carry, if a valid one."""
    if not headers:
        return None
    return _valid(get_global_textmap().extract(headers, getter=HEADER_GETTER))


def _valid(context: Context) -> SpanContext | None:
    span_context = trace.get_current_span(context).get_span_context()
    return span_context if span_context.is_valid else None


def traceparent_context(traceparent: object) -> SpanContext | None:
    """The span context of a W3C traceparent string (Prefect's state_details.traceparent)."""
    if not isinstance(traceparent, str) or not traceparent:
        return None
    return _valid(_W3C.extract({"traceparent": traceparent}))


def _details_traceparent(item: ParsedCommand | BadRecord) -> str | None:
    if not isinstance(item, ParsedCommand):
        return None
    proposal = getattr(item.command, "state", None)
    return getattr(getattr(proposal, "state_details", None), "traceparent", None)


def _ns_ago(perf_counter_mark: float) -> int:
    """A time.perf_counter() mark as epoch nanoseconds (what span timestamps are)."""
    return time.time_ns() - int((time.perf_counter() - perf_counter_mark) * 1e9)


# -- the consumer -------------------------------------------------------------------------
class ConsumerTracer:
    """The BatchTracer port of pipeline/service.py on an OpenTelemetry tracer."""

    def __init__(self, provider: trace.TracerProvider, topic: str) -> None:
        self.tracer = provider.get_tracer("runstate", __version__)
        self.topic = topic

    def begin(self, raw_records: Sequence[Any], items: Sequence[ParsedCommand | BadRecord],
              started: float) -> BatchTrace:
        return BatchTrace(self, raw_records, items, started)

    def metrics(self, inner: ServiceMetrics) -> ServiceMetrics:
        """`inner`, plus a span for each batch phase the service times."""
        return PhaseSpans(inner, self.tracer)


class BatchTrace:
    """One batch's spans; the batch span is the current span until `end`."""

    def __init__(self, owner: ConsumerTracer, raw_records: Sequence[Any],
                 items: Sequence[ParsedCommand | BadRecord], started: float) -> None:
        tracer = owner.tracer
        start = _ns_ago(started)
        self.items = items
        self.span = tracer.start_span(
            "runstate.batch", kind=SpanKind.CONSUMER, start_time=start,
            attributes={**SYSTEM, "messaging.destination.name": owner.topic, "messaging.operation.type": "process",
                        "messaging.batch.message_count": len(items)})
        batch_link = Link(self.span.get_span_context())
        self.commands: list[Span] = []
        for raw, item in zip(raw_records, items, strict=True):
            sent, proposed = _contexts_of(raw, item)
            links = [batch_link]
            if sent is not None:
                parent = trace.set_span_in_context(trace.NonRecordingSpan(sent))
                if proposed is not None and proposed.span_id != sent.span_id:
                    links.append(Link(proposed, {"runstate.link": "state_details.traceparent"}))
            elif proposed is not None:
                parent = trace.set_span_in_context(trace.NonRecordingSpan(proposed))
            else:
                parent, links = trace.set_span_in_context(self.span), []
            record = item.record
            attributes: dict[str, Any] = {
                **SYSTEM, "messaging.destination.name": record.topic, "messaging.operation.type": "process",
                "messaging.destination.partition.id": str(record.partition),
                "messaging.kafka.offset": record.offset,
                "runstate.command.kind": item.command.kind if isinstance(item, ParsedCommand) else item.command_kind,
            }
            command_id = item.command_id
            if command_id is not None:
                attributes["runstate.command.id"] = str(command_id)
            if item.stream_id is not None:
                attributes["runstate.run.id"] = str(item.stream_id)
            self.commands.append(tracer.start_span("runstate.command", context=parent, kind=SpanKind.CONSUMER,
                                                   start_time=start, links=links, attributes=attributes))
        self._token = attach(trace.set_span_in_context(self.span))

    def stored(self, outcome: BatchOutcome) -> None:
        """The batch is decided and stored: each result gets its command span's
        context as headers, and each command span its answer."""
        results = outcome.results
        if len(results) != len(self.commands):
            # Every record is answered once, in order; should that ever change,
            # results go without a trace context rather than with a wrong one.
            return
        events = {id(event.result_event): event for event in outcome.events}
        for span, publication in zip(self.commands, results, strict=True):
            publication.trace_headers = context_headers(span) or None
            event = events.get(id(publication.value))
            if event is not None:
                span.set_attribute("runstate.status", event.status or "")
                span.set_attribute("runstate.seq", event.seq)
            else:
                _answer_attributes(span, publication.value)

    def end(self, outcome: BatchOutcome | None, error: BaseException | None = None) -> None:
        """The batch's results are acknowledged (or `error` stopped it: it is delivered again)."""
        detach(self._token)
        finished = time.time_ns()
        if outcome is not None:
            self.span.set_attributes({"runstate.decided": len(outcome.events),
                                      "runstate.redelivered": outcome.duplicates,
                                      "runstate.dead_lettered": len(outcome.dead_letters)})
        if error is not None:
            self.span.record_exception(error)
            self.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: the batch is delivered again"))
        for span in self.commands:
            if error is not None:
                span.set_status(Status(StatusCode.ERROR, "not decided in this delivery"))
            span.end(finished)
        self.span.end(finished)


def _contexts_of(raw: Any, item: ParsedCommand | BadRecord) -> tuple[SpanContext | None, SpanContext | None]:
    """The trace contexts a record carries: its headers', its proposal's. Whatever it holds,
    tracing it must not fail the batch (a record that stalled its partition)."""
    try:
        return sent_context(getattr(raw, "headers", None)), traceparent_context(_details_traceparent(item))
    except Exception:  # noqa: BLE001 - a propagator's bug or a header it chokes on: traced without them
        log.debug("the trace context of %s[%d]@%d was not read", item.record.topic, item.record.partition,
                  item.record.offset, exc_info=True)
        return None, None


def _answer_attributes(span: Span, value: str) -> None:
    """A refusal's or a redelivered record's answer: status or error code from its JSON."""
    try:
        answer = json.loads(value)
    except ValueError:
        return
    if not isinstance(answer, dict):
        return
    error = answer.get("error")
    if isinstance(error, dict):
        code = str(error.get("code"))
        span.set_attribute("runstate.error.code", code)
        span.set_status(Status(StatusCode.ERROR, code))
    elif isinstance(answer.get("status"), str):
        span.set_attribute("runstate.status", answer["status"])
        span.set_attribute("runstate.redelivered", True)


class PhaseSpans:
    """A ServiceMetrics that also makes a span of each timed batch phase, under the batch span."""

    def __init__(self, inner: ServiceMetrics, tracer: trace.Tracer) -> None:
        self.inner = inner
        self.tracer = tracer

    def phase(self, name: str, seconds: float) -> None:
        self.inner.phase(name, seconds)
        if trace.get_current_span().is_recording():
            finished = time.time_ns()
            self.tracer.start_span(f"runstate.{name}", start_time=finished - int(seconds * 1e9),
                                   attributes=PHASE_ATTRIBUTES.get(name)).end(finished)

    def batch(self, outcome: BatchOutcome, records: int, decided_at: float,
              record_timestamps_ms: list[int]) -> None:
        self.inner.batch(outcome, records, decided_at, record_timestamps_ms)

    def outage(self, what: str | None) -> None:
        self.inner.outage(what)
        span = trace.get_current_span()
        if span.is_recording():
            span.add_event("runstate.outage" if what else "runstate.outage_over",
                           {"runstate.outage": what} if what else None)


# -- the client ---------------------------------------------------------------------------
def client_tracer(provider: trace.TracerProvider | None = None) -> trace.Tracer:
    """The client's tracer: of `provider`, else of the process's global provider (set by the
    application; without one, its spans are not recording and nothing is sent)."""
    return trace.get_tracer("runstate.client", __version__, tracer_provider=provider)


def start_request(tracer: trace.Tracer, command: Command, topic: str) -> tuple[Span | None, list[tuple[str, bytes]]]:
    """The request span of a command about to be produced, and the headers that carry it;
    (None, []) when the tracer does not record."""
    span = tracer.start_span("runstate.request", kind=SpanKind.CLIENT)
    if not span.is_recording():
        return None, []
    span.set_attributes({**SYSTEM, "messaging.destination.name": topic, "messaging.operation.type": "send",
                         "runstate.command.kind": command.kind, "runstate.command.id": str(command.command_id)})
    return span, context_headers(span)


def record_result(span: Span, event: OrchestrationResultEvent, headers: Headers | None) -> None:
    """The result that answers the request: its status, and a link to the span that decided it
    when that is in another trace (a resent command answered by its first decision)."""
    if event.error is not None:
        span.set_attribute("runstate.error.code", event.error.code)
        span.set_status(Status(StatusCode.ERROR, event.error.code))
    elif event.status is not None:
        span.set_attribute("runstate.status", str(event.status.value if hasattr(event.status, "value")
                                                  else event.status))
    decided = sent_context(headers)
    if decided is not None and decided.trace_id != span.get_span_context().trace_id:
        span.add_link(decided, {"runstate.link": "decided by"})


def end_request(span: Span, failure: BaseException | None) -> None:
    if failure is not None:
        span.record_exception(failure)
        span.set_status(Status(StatusCode.ERROR, type(failure).__name__))
    span.end()


# -- the provider ---------------------------------------------------------------------------
def tracer_provider(settings: Settings, service_name: str) -> TracerProvider | None:
    """The SDK's tracer provider with the exporter the settings name, or None when tracing is off.
    The SDK reads the rest of the standard variables itself (OTEL_SERVICE_NAME,
    OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER, OTEL_BSP_*, OTEL_EXPORTER_OTLP_HEADERS, ...)."""
    exporter = settings.traces_exporter
    if exporter is None:
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attributes: dict[str, str] = {SERVICE_VERSION: __version__}
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
            "OTEL_RESOURCE_ATTRIBUTES", ""):
        attributes[SERVICE_NAME] = service_name
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter == "otlp":
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(settings)))
    elif exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider


def _otlp_exporter(settings: Settings) -> SpanExporter:
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf")
    traces_endpoint, endpoint = settings.otel_exporter_otlp_traces_endpoint, settings.otel_exporter_otlp_endpoint
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter as GrpcExporter,
            )
        except ImportError:
            raise SettingsError("OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc"
                                " installed (runstate's otel extra brings the http/protobuf exporter)") from None
        return GrpcExporter(endpoint=traces_endpoint or endpoint)
    if protocol != "http/protobuf":
        raise SettingsError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: runstate exports http/protobuf or grpc")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # As the exporter derives it from the environment: the base URL plus the signal's path.
    if traces_endpoint is None and endpoint is not None:
        traces_endpoint = endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=traces_endpoint)
