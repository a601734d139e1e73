"""Settings, read from the environment and, as a fallback, from `.runstate/env`
(the file `make up` writes), so every entry point finds the local stack."""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path


def _env_file_values() -> dict[str, str]:
    here = Path.cwd()
    for folder in (here, *here.parents):
        candidate = folder / ".runstate" / "env"
        if candidate.is_file():
            values: dict[str, str] = {}
            for line in candidate.read_text().splitlines():
                line = line.strip()
                if line.startswith("export "):
                    line = line[len("export ") :]
                if "=" not in line or line.startswith("#"):
                    continue
                key, _, raw = line.partition("=")
                parts = shlex.split(raw)
                values[key.strip()] = parts[0] if parts else ""
            return values
    return {}


class MissingSetting(RuntimeError):
    pass


@dataclass(frozen=True)
class Settings:
    kafka_bootstrap_servers: str
    database_url: str
    admin_database_url: str
    command_topic: str = "runstate.commands"
    result_topic: str = "runstate.results"
    state_change_topic: str = "runstate.state-changes"
    dead_letter_topic: str = "runstate.dead-letter"
    partitions: int = 12
    consumer_group: str = "runstate"
    max_batch: int = 1000
    batch_timeout_ms: int = 2
    max_command_bytes: int = 1_048_576
    lanes: int = 1
    gateway_max_body_bytes: int = 1_048_576
    extra: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def load(cls, **overrides: object) -> "Settings":
        file_values = _env_file_values()

        def get(name: str, default: str | None = None) -> str | None:
            return os.environ.get(name) or file_values.get(name) or default

        def required(name: str) -> str:
            value = get(name)
            if not value:
                raise MissingSetting(
                    f"{name} is not set (export it, or run `make up` to start the local stack)"
                )
            return value

        database_url = required("DATABASE_URL")
        values: dict[str, object] = dict(
            kafka_bootstrap_servers=required("KAFKA_BOOTSTRAP_SERVERS"),
            database_url=database_url,
            admin_database_url=get("RUNSTATE_ADMIN_DATABASE_URL", database_url),
            command_topic=get("RUNSTATE_COMMAND_TOPIC", cls.command_topic),
            result_topic=get("RUNSTATE_RESULT_TOPIC", cls.result_topic),
            state_change_topic=get("RUNSTATE_STATE_CHANGE_TOPIC", cls.state_change_topic),
            dead_letter_topic=get("RUNSTATE_DEAD_LETTER_TOPIC", cls.dead_letter_topic),
            partitions=int(get("RUNSTATE_PARTITIONS", str(cls.partitions))),
            consumer_group=get("RUNSTATE_CONSUMER_GROUP", cls.consumer_group),
            max_batch=int(get("RUNSTATE_MAX_BATCH", str(cls.max_batch))),
            batch_timeout_ms=int(get("RUNSTATE_BATCH_TIMEOUT_MS", str(cls.batch_timeout_ms))),
            max_command_bytes=int(get("RUNSTATE_MAX_COMMAND_BYTES", str(cls.max_command_bytes))),
            lanes=int(get("RUNSTATE_LANES", str(cls.lanes))),
            gateway_max_body_bytes=int(get("RUNSTATE_GATEWAY_MAX_BODY_BYTES", str(cls.gateway_max_body_bytes))),
        )
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]
