"""Kafka records as the batch sees them, and parsing one into a command.

Parsing is total: any bytes, key and size give either a ParsedCommand or a
BadRecord that says why, never an exception.
"""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from pydantic import TypeAdapter, ValidationError

from runstate import strict_json
from runstate.messages import COMMAND_ADAPTER, Command, ErrorCode, ErrorInfo, SetStateCommand, stream_id_of

log = logging.getLogger("runstate.records")

RECORD_NAMESPACE = UUID("5d1f6a0e-8f1c-4c7e-9a57-2c4f1b7d0e11")
_UUID_SERIALIZER = TypeAdapter(UUID).serializer


@dataclass(frozen=True, slots=True)
class IncomingRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None  # the record's Kafka timestamp, for latency only
    # What the record holds, so that a redelivery is told apart from a new
    # record at a reused position (a recreated topic, an offset reset).
    digest: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", record_digest(self.key, self.value))

    def derived_id(self) -> UUID:
        """Stable id of this record: a redelivery gets the same one, a new
        record at the same position another."""
        return uuid.uuid5(RECORD_NAMESPACE, f"{self.topic}/{self.partition}/{self.offset}/{self.digest.hex()}")

    def legacy_derived_id(self) -> UUID:
        """The id derived before digests were stored: from the position alone."""
        return uuid.uuid5(RECORD_NAMESPACE, f"{self.topic}/{self.partition}/{self.offset}")


def record_digest(key: bytes | None, value: bytes | None) -> bytes:
    """128 bits of SHA-256 over the key and the value, each told apart from absent."""
    h = hashlib.sha256()
    for part in (key, value):
        h.update(b"-" if part is None else b"%d:" % len(part))
        h.update(part or b"")
    return h.digest()[:16]


@dataclass(slots=True)
class ParsedCommand:
    record: IncomingRecord
    command: Command
    command_id: UUID
    stream_id: UUID
    # The record's value as parsed (I-JSON, so it writes back as the same values): what the
    # stored command is written from (message_json.stored_command_json).
    document: Any = None

    @property
    def transition_id(self) -> UUID | None:
        """The idempotency key of a set_state: the proposal's transition_id or,
        when the sender gave none, the command id (itself derived from the
        Kafka record when absent), so a redelivery is always recognised."""
        if isinstance(self.command, SetStateCommand):
            return self.command.state.state_details.transition_id or self.command_id
        return None


@dataclass(slots=True)
class BadRecord:
    record: IncomingRecord
    error: ErrorInfo
    stream_id: UUID | None
    command_kind: str
    command_id: UUID | None = None


# "\u0000" preceded by an even number of backslashes: the escape itself, not the
# text "\\u0000". The log keeps the payload as json (which would take it), but
# the projections, the audit's jsonb and Prefect's text columns cannot.
NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
# Error messages quote little of what they refuse: they travel in results and headers.
MAX_ERROR_MESSAGE = 1000
# A bad record's own key is echoed on its answer only when it is plausibly an id.
MAX_ECHOED_KEY = 256


def parse_record(record: IncomingRecord, max_bytes: int) -> ParsedCommand | BadRecord:
    """Validate one record; bad input is described, never raised."""
    try:
        return _parse(record, max_bytes)
    except Exception as exc:  # noqa: BLE001 - a parser bug must not stall the partition
        log.exception("parsing the record at %s[%d]@%d failed", record.topic, record.partition, record.offset)
        return _bad(record, "orchestration_failed", f"{type(exc).__name__}: {exc}", "unknown")


def _parse(record: IncomingRecord, max_bytes: int) -> ParsedCommand | BadRecord:
    value = record.value
    if value is None:
        return _bad(record, "invalid_command", "a tombstone (a record without a value) is not a command", "unknown")
    if len(value) > max_bytes:
        return _bad(record, "too_large", f"command is {len(value)} bytes; the limit is {max_bytes}", "unknown")
    try:
        document = strict_json.loads(value)
    except strict_json.StrictJSONError as exc:
        return _bad(record, "invalid_command", str(exc), "unknown")
    kind = _kind_of(document)
    if b"\\u0000" in value and NUL_ESCAPE.search(value):
        return _bad(record, "invalid_command", "a string holds U+0000, which PostgreSQL text cannot store", kind)
    try:
        command = COMMAND_ADAPTER.validate_python(document)
    except ValidationError as exc:
        return _bad(record, "invalid_command", _describe(exc), kind)
    stream_id = stream_id_of(command)
    # Keyed by anything but the run's id, the record sits in a partition other
    # than its run's: deciding it would race that run's own commands.
    if record.key != _UUID_SERIALIZER.to_json(stream_id)[1:-1]:  # the id's canonical text, unquoted
        return BadRecord(
            record,
            ErrorInfo(code="key_mismatch", message=_key_mismatch(record.key, stream_id)),
            stream_id,
            command.kind,
            command.command_id,
        )
    return ParsedCommand(record, command, command.command_id or record.derived_id(), stream_id, document)


def _bad(record: IncomingRecord, code: ErrorCode, message: str, command_kind: str) -> BadRecord:
    # The key is read only for a bad record: a good one names its run itself.
    return BadRecord(record, ErrorInfo(code=code, message=message[:MAX_ERROR_MESSAGE]),
                     _stream_id_from_key(record.key), command_kind)


def _key_mismatch(key: bytes | None, stream_id: UUID) -> str:
    shown = "no key" if key is None else f"the key {key[:64]!r}"
    return f"the record has {shown}; commands of run {stream_id} must be keyed by {str(stream_id)!r}"


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_input=False, include_url=False)[:5]:
        where = ".".join(str(p)[:64] for p in error["loc"]) or "<body>"
        parts.append(f"{where}: {error['msg'][:200]}")
    more = exc.error_count() - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _kind_of(document: Any) -> str:
    kind = document.get("kind") if isinstance(document, dict) else None
    return kind if isinstance(kind, str) and len(kind) < 64 else "unknown"


def _stream_id_from_key(key: bytes | None) -> UUID | None:
    if not key or len(key) > 64:
        return None
    try:
        return UUID(key.decode())
    except (ValueError, UnicodeDecodeError):
        return None
