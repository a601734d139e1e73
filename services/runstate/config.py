"""Settings, from the environment and, for what it lacks, from `.runstate/env` (the file
`make up` writes), so every entry point finds the local stack.

WorkerSettings is what a client that only talks to Kafka needs (runstate.client); Settings is
the service's: WorkerSettings plus the database and the consumer's tuning. Both are
pydantic-settings models, so constructing one reads the environment and validates it;
`load()` turns what is wrong into SettingsError, one line naming the variables. The
variable of each field is its alias (KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL, RUNSTATE_*)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal, Self, get_args

from pydantic import (
    Field,
    FilePath,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from runstate.envfile import find_env_file, read_env_file

# Kafka's rule for topic names.
TOPIC_NAME = r"^[A-Za-z0-9._-]{1,249}$"
# Where `runstate serve` answers /metrics, /health and /ready unless told otherwise
# (the customary port range of Prometheus exporters).
DEFAULT_METRICS_PORT = 9464
DAY_MS = 24 * 3600 * 1000
HINT = "export it, or run `make up` to start the local stack"


class SettingsError(RuntimeError):
    """A setting is missing or invalid; the message is one line naming the variables."""


# The name the CLI catches (it predates invalid values being reported too).
MissingSetting = SettingsError


class EnvFileSource(EnvSettingsSource):
    """`.runstate/env` of the working directory or its nearest parent, read as the
    environment is (only the fields' variables; empty values count as unset)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        values = read_env_file(find_env_file())
        return {k if self.case_sensitive else k.lower(): v for k, v in values.items()
                if not (self.env_ignore_empty and v == "")}


class _RunstateSettings(BaseSettings):
    # field -> the field whose value it takes when not set
    defaults_from: ClassVar[dict[str, str]] = {}
    model_config = SettingsConfigDict(
        case_sensitive=True,
        env_ignore_empty=True,
        populate_by_name=True,  # fields by name in code, by their variable (alias) from the environment
        frozen=True,
        extra="forbid",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, EnvFileSource(settings_cls)

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Arguments, then the environment, then .runstate/env, then the defaults."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise SettingsError(cls.explain(exc)) from None

    def replace(self, **changes: Any) -> Self:
        """A validated copy with `changes` (model_copy(update=...) would skip validation)."""
        return type(self)(**{**self.model_dump(), **changes})

    @classmethod
    def variables(cls) -> dict[str, str]:
        """Field name -> environment variable."""
        return {name: str(field.validation_alias or name) for name, field in cls.model_fields.items()}

    @classmethod
    def explain(cls, exc: ValidationError) -> str:
        """One line: the variables not set, then each invalid one and why (secrets not shown).
        A field that defaults to another (see `defaults_from`) is not reported again for it."""
        variables = cls.variables()
        field_of = {var: name for name, var in variables.items()}
        errors = [(field_of.get(str(e["loc"][0]), str(e["loc"][0])) if e["loc"] else "", e) for e in exc.errors()]
        inputs = {name: e["input"] for name, e in errors}
        missing: list[str] = []
        invalid: list[str] = []
        for name, error in errors:
            source = cls.defaults_from.get(name)
            if source in inputs and (error["type"] == "missing" or error["input"] == inputs[source]):
                continue
            var = variables.get(name, name)
            if error["type"] == "missing":
                missing.append(var)
                continue
            field = cls.model_fields.get(name)
            secret = field is not None and SecretStr in (field.annotation, *get_args(field.annotation))
            message = str(error["msg"]).removeprefix("Value error, ")
            shown = "" if secret or not var else f"={error['input']!r}"
            invalid.append(f"{var}{shown}: {message[:1].lower()}{message[1:]}")
        parts = []
        if len(missing) == 1:
            parts.append(f"{missing[0]} is not set ({HINT})")
        elif missing:
            parts.append(f"{', '.join(missing)} are not set ({HINT.replace('export it', 'export them')})")
        return "; ".join(parts + invalid)


class WorkerSettings(_RunstateSettings):
    """What a Kafka-only client needs: where the brokers are and the topic names."""

    kafka_bootstrap_servers: str = Field(min_length=1, validation_alias="KAFKA_BOOTSTRAP_SERVERS")
    command_topic: str = Field("runstate.commands", pattern=TOPIC_NAME, validation_alias="RUNSTATE_COMMAND_TOPIC")
    result_topic: str = Field("runstate.results", pattern=TOPIC_NAME, validation_alias="RUNSTATE_RESULT_TOPIC")
    state_change_topic: str = Field(
        "runstate.state-changes", pattern=TOPIC_NAME, validation_alias="RUNSTATE_STATE_CHANGE_TOPIC"
    )
    dead_letter_topic: str = Field(
        "runstate.dead-letter", pattern=TOPIC_NAME, validation_alias="RUNSTATE_DEAD_LETTER_TOPIC"
    )
    # Workers refuse to send a larger command; the service dead-letters one as too_large.
    max_command_bytes: int = Field(1_048_576, ge=1, validation_alias="RUNSTATE_MAX_COMMAND_BYTES")
    # Kafka security: every client builds its connection from these (runstate.kafka_security).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", validation_alias="RUNSTATE_KAFKA_SECURITY_PROTOCOL"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", validation_alias="RUNSTATE_KAFKA_SASL_MECHANISM"
    )
    kafka_username: str | None = Field(None, min_length=1, validation_alias="RUNSTATE_KAFKA_USERNAME")
    kafka_password: SecretStr | None = Field(
        None, min_length=1, validate_default=True, validation_alias="RUNSTATE_KAFKA_PASSWORD"
    )
    kafka_ssl_cafile: FilePath | None = Field(None, validation_alias="RUNSTATE_KAFKA_SSL_CAFILE")
    kafka_ssl_certfile: FilePath | None = Field(None, validation_alias="RUNSTATE_KAFKA_SSL_CERTFILE")
    kafka_ssl_keyfile: FilePath | None = Field(
        None, validate_default=True, validation_alias="RUNSTATE_KAFKA_SSL_KEYFILE"
    )

    @field_validator("kafka_password")
    @classmethod
    def _sasl_needs_a_login(cls, password: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        protocol = info.data.get("kafka_security_protocol", "")
        if protocol.startswith("SASL_") and (password is None or not info.data.get("kafka_username")):
            raise ValueError(f"with {protocol}, RUNSTATE_KAFKA_USERNAME and RUNSTATE_KAFKA_PASSWORD must both be set")
        return password

    @field_validator("kafka_ssl_keyfile")
    @classmethod
    def _tls_files_need_tls(cls, keyfile: Path | None, info: ValidationInfo) -> Path | None:
        protocol = info.data.get("kafka_security_protocol", "")
        given = keyfile or info.data.get("kafka_ssl_certfile") or info.data.get("kafka_ssl_cafile")
        if given and protocol not in ("SSL", "SASL_SSL"):
            raise ValueError(f"the RUNSTATE_KAFKA_SSL_* files are set but {protocol} does not use TLS")
        if keyfile and not info.data.get("kafka_ssl_certfile"):
            raise ValueError("a client key needs its certificate (RUNSTATE_KAFKA_SSL_CERTFILE)")
        return keyfile


class Settings(WorkerSettings):
    """The service's settings (consumer, gateway, CLI tools): the worker's plus the database
    and the consumer's tuning. DATABASE_URL is the process's own role (the consumer's, the
    gateway's, an auditor's); the service never needs more. The owner's URL is for the
    migrations alone and defaults to DATABASE_URL (a server with a single role); see
    `migration_urls` for where `runstate db` finds the local stack's."""

    database_url: SecretStr = Field(validation_alias="DATABASE_URL")
    admin_database_url: SecretStr = Field(validation_alias="RUNSTATE_ADMIN_DATABASE_URL")
    partitions: int = Field(12, ge=1, validation_alias="RUNSTATE_PARTITIONS")
    consumer_group: str = Field("runstate", min_length=1, validation_alias="RUNSTATE_CONSUMER_GROUP")
    max_batch: int = Field(1000, ge=1, validation_alias="RUNSTATE_MAX_BATCH")
    batch_timeout_ms: int = Field(2, ge=0, validation_alias="RUNSTATE_BATCH_TIMEOUT_MS")
    lanes: int = Field(1, ge=1, validation_alias="RUNSTATE_LANES")
    # Task runs whose whole history the consumer wrote, remembered so that a batch of theirs is
    # decided without a snapshot read (pipeline/owned.py): a few times the runs a busy consumer has
    # in flight, about 2 kB each. 0 reads the store for every batch.
    owned_runs: int = Field(8192, ge=0, validation_alias="RUNSTATE_OWNED_RUNS")
    gateway_max_body_bytes: int = Field(1_048_576, ge=1, validation_alias="RUNSTATE_GATEWAY_MAX_BODY_BYTES")
    # What Prefect clients send as PREFECT_API_AUTH_STRING; unset, the gateway answers anyone.
    gateway_auth_string: SecretStr | None = Field(None, min_length=1, validation_alias="RUNSTATE_GATEWAY_AUTH_STRING")
    # After SIGTERM, how long the consumer waits for its batch in flight and each HTTP server (the
    # consumer's probes, the gateway) for its requests in flight before stopping anyway; a
    # supervisor's grace period before SIGKILL must be longer (deploy/compose.yaml).
    shutdown_timeout_ms: int = Field(15_000, ge=0, validation_alias="RUNSTATE_SHUTDOWN_TIMEOUT_MS")
    # The consumer's HTTP port (/metrics, /health, /ready); 0 turns it off (the test suite sets 0).
    metrics_port: int = Field(DEFAULT_METRICS_PORT, ge=0, le=65535, validation_alias="RUNSTATE_METRICS_PORT")
    metrics_host: str = Field("127.0.0.1", min_length=1, validation_alias="RUNSTATE_METRICS_HOST")
    # off: no Prometheus work per batch (the consumer's /metrics answers 404; probes and logs stay).
    metrics: Literal["on", "off"] = Field("on", validation_alias="RUNSTATE_METRICS")
    # OpenTelemetry tracing of the consumer and the gateway (runstate.obs.tracing). auto: on when
    # the standard OTEL_TRACES_EXPORTER names an exporter or an OTLP endpoint is set.
    tracing: Literal["auto", "on", "off"] = Field("auto", validation_alias="RUNSTATE_TRACING")
    # The standard OpenTelemetry variables runstate reads itself; the OTLP exporter reads the
    # rest of its own (OTEL_EXPORTER_OTLP_HEADERS, _PROTOCOL, _CERTIFICATE, ...) from the environment.
    otel_traces_exporter: Literal["otlp", "console", "none"] | None = Field(
        None, validation_alias="OTEL_TRACES_EXPORTER")
    otel_exporter_otlp_endpoint: str | None = Field(None, min_length=1, validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT")
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        None, min_length=1, validation_alias="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    otel_sdk_disabled: bool = Field(False, validation_alias="OTEL_SDK_DISABLED")

    # Topics runstate creates (existing topics are left as they are): defaults safe on a cluster
    # of three or more brokers; a single broker needs 1 and 1 (`make up` writes them).
    topic_replication_factor: int = Field(3, ge=1, validation_alias="RUNSTATE_TOPIC_REPLICATION_FACTOR")
    topic_min_insync_replicas: int = Field(2, ge=1, validation_alias="RUNSTATE_TOPIC_MIN_INSYNC_REPLICAS")
    # retention.ms of each topic (-1: kept forever). Dead letters point at their command's
    # offset, so the command topic keeps records as long as the dead-letter topic does.
    command_retention_ms: int = Field(30 * DAY_MS, ge=-1, validation_alias="RUNSTATE_COMMAND_RETENTION_MS")
    result_retention_ms: int = Field(7 * DAY_MS, ge=-1, validation_alias="RUNSTATE_RESULT_RETENTION_MS")
    state_change_retention_ms: int = Field(
        7 * DAY_MS, ge=-1, validation_alias="RUNSTATE_STATE_CHANGE_RETENTION_MS"
    )
    dead_letter_retention_ms: int = Field(30 * DAY_MS, ge=-1, validation_alias="RUNSTATE_DEAD_LETTER_RETENTION_MS")
    # False: the topics must exist (made by the cluster's operator); start-up refuses without them.
    create_topics: bool = Field(True, validation_alias="RUNSTATE_CREATE_TOPICS")

    defaults_from: ClassVar[dict[str, str]] = {"admin_database_url": "database_url"}

    @model_validator(mode="after")
    def _min_insync_fits(self) -> Self:
        if self.topic_min_insync_replicas > self.topic_replication_factor:
            raise ValueError(
                f"RUNSTATE_TOPIC_MIN_INSYNC_REPLICAS={self.topic_min_insync_replicas} is more than "
                f"RUNSTATE_TOPIC_REPLICATION_FACTOR={self.topic_replication_factor}: no write could succeed"
            )
        return self

    def topic_configs(self) -> dict[str, dict[str, str]]:
        """Topic name -> the configs runstate creates it with (max.message.bytes aside)."""
        isr = str(self.topic_min_insync_replicas)
        return {
            topic: {"min.insync.replicas": isr, "retention.ms": str(retention)}
            for topic, retention in (
                (self.command_topic, self.command_retention_ms),
                (self.result_topic, self.result_retention_ms),
                (self.state_change_topic, self.state_change_retention_ms),
                (self.dead_letter_topic, self.dead_letter_retention_ms),
            )
        }

    @model_validator(mode="before")
    @classmethod
    def _owner_url_defaults_to_app_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and not (data.get("admin_database_url") or data.get("RUNSTATE_ADMIN_DATABASE_URL")):
            app_url = data.get("database_url") or data.get("DATABASE_URL")
            if app_url:
                data = {**data, "admin_database_url": app_url}
        return data

    @property
    def shutdown_timeout_s(self) -> int:
        """RUNSTATE_SHUTDOWN_TIMEOUT_MS in whole seconds, rounded up (uvicorn takes seconds)."""
        return -(-self.shutdown_timeout_ms // 1000)

    @property
    def traces_exporter(self) -> str | None:
        """Where spans go when tracing is on (otlp, console, none: made and dropped); None when off."""
        if self.tracing == "off" or self.otel_sdk_disabled:
            return None
        configured = self.otel_traces_exporter
        if configured == "none":
            return "none" if self.tracing == "on" else None
        endpoint = self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_traces_endpoint
        if self.tracing == "on" or configured or endpoint:
            return configured or "otlp"
        return None

    @field_validator("database_url", "admin_database_url")
    @classmethod
    def _postgresql_url(cls, url: SecretStr) -> SecretStr:
        from sqlalchemy.exc import ArgumentError

        from runstate.database_urls import parse  # the database libraries: the service's, not a worker's

        try:
            backend = parse(url).get_backend_name()
        except (ArgumentError, ValueError):
            raise ValueError("not a database URL (postgresql+psycopg://user@host:port/database)") from None
        if backend != "postgresql":
            raise ValueError(f"not a PostgreSQL URL (it names {backend})")
        return url


# The local stack's file of the services' own credentials, next to .runstate/env.
SERVICE_ENV_FILE = "service.env"


def migration_urls(settings: Settings) -> tuple[SecretStr, SecretStr]:
    """(owner URL, service role URL) for `runstate db`. When RUNSTATE_ADMIN_DATABASE_URL is set
    nowhere the settings look (it then equals DATABASE_URL), the owner's URL of the local stack's
    .runstate/service.env is used, when it names the same database: only the migrations read that
    file, so no service ever holds the owner's password."""
    admin = settings.admin_database_url
    if admin.get_secret_value() == settings.database_url.get_secret_value():
        env_file = find_env_file()
        if env_file is not None:
            stack_admin = read_env_file(env_file.with_name(SERVICE_ENV_FILE)).get("RUNSTATE_ADMIN_DATABASE_URL")
            if stack_admin and _same_database(stack_admin, settings.database_url.get_secret_value()):
                admin = SecretStr(stack_admin)
    return admin, settings.database_url


def _same_database(a: str, b: str) -> bool:
    from runstate.database_urls import hosts, parse

    return (hosts(a), parse(a).database) == (hosts(b), parse(b).database)
