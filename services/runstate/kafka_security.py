"""One place that turns the Kafka security settings into what each client takes: keyword
arguments for aiokafka's producer, consumer and admin client, and FastStream's security
object for its KafkaBroker. Only aiokafka, FastStream's security classes and ssl, so the
client library can use it."""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiokafka.errors import KafkaConnectionError
from aiokafka.helpers import create_ssl_context

if TYPE_CHECKING:
    from faststream.security import BaseSecurity

    from runstate.config import WorkerSettings

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


class KafkaOptions(dict[str, Any]):
    """aiokafka keyword arguments; shown without the password, since they end up in logs and tracebacks."""

    def __repr__(self) -> str:
        shown = {k: ("**********" if k == "sasl_plain_password" and v else v) for k, v in self.items()}
        return f"KafkaOptions({shown!r})"

    __str__ = __repr__


def uses_tls(settings: WorkerSettings) -> bool:
    return settings.kafka_security_protocol in ("SSL", "SASL_SSL")


def uses_sasl(settings: WorkerSettings) -> bool:
    return settings.kafka_security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")


def ssl_context(settings: WorkerSettings) -> ssl.SSLContext | None:
    """The TLS context (the CA file, else the system's trust store; an optional client
    certificate), verifying the broker's certificate and host name; None without TLS."""
    if not uses_tls(settings):
        return None
    context = create_ssl_context(
        cafile=settings.kafka_ssl_cafile,
        certfile=settings.kafka_ssl_certfile,
        keyfile=settings.kafka_ssl_keyfile,
    )
    if settings.kafka_ssl_cafile is None:
        context.load_default_certs()
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    return context


def kafka_options(settings: WorkerSettings) -> KafkaOptions:
    """Connection keyword arguments for AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient."""
    options = KafkaOptions(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        security_protocol=settings.kafka_security_protocol,
    )
    context = ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if uses_sasl(settings):
        assert settings.kafka_username is not None and settings.kafka_password is not None  # the settings check it
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_username
        options["sasl_plain_password"] = settings.kafka_password.get_secret_value()
    return options


def faststream_security(settings: WorkerSettings) -> BaseSecurity | None:
    """FastStream's security object for KafkaBroker(security=...); None for PLAINTEXT."""
    from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = ssl_context(settings)
    if protocol == "SSL":
        return BaseSecurity(ssl_context=context, use_ssl=True)
    assert settings.kafka_username is not None and settings.kafka_password is not None  # the settings check it
    sasl = {"PLAIN": SASLPlaintext, "SCRAM-SHA-256": SASLScram256, "SCRAM-SHA-512": SASLScram512}
    return sasl[settings.kafka_sasl_mechanism](
        username=settings.kafka_username,
        password=settings.kafka_password.get_secret_value(),
        ssl_context=context,
        use_ssl=protocol == "SASL_SSL",
    )


class KafkaConnectError(KafkaConnectionError):
    """No connection to the brokers, with what was tried (never the password) and the likely causes."""


def describe_login(settings: WorkerSettings) -> str:
    """How a client logs in, as a user may read it: protocol, mechanism, user, CA file."""
    protocol = settings.kafka_security_protocol
    parts = [f"security protocol {protocol}"]
    if uses_sasl(settings):
        parts.append(f"SASL {settings.kafka_sasl_mechanism} as user {settings.kafka_username!r}")
    if uses_tls(settings):
        parts.append(f"CA file {settings.kafka_ssl_cafile}" if settings.kafka_ssl_cafile else "the system's CAs")
        if settings.kafka_ssl_certfile:
            parts.append(f"client certificate {settings.kafka_ssl_certfile}")
    return ", ".join(parts)


class _Causes(logging.Handler):
    """aiokafka's own ERROR lines about the bootstrap servers: the only place it names a refused login."""

    def __init__(self, addresses: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.addresses = addresses
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            line = record.getMessage()
            if any(a in line for a in self.addresses) and len(self.lines) < 3:
                self.lines.append(line.splitlines()[0][:300])


async def start_client(client: Any, settings: WorkerSettings) -> None:
    """`await client.start()` for an aiokafka producer, consumer or admin client; "Unable to
    bootstrap" (which is also how aiokafka reports a refused login or certificate) becomes
    KafkaConnectError naming the login used and the likely causes."""
    addresses = [a.strip() for a in settings.kafka_bootstrap_servers.split(",") if a.strip()]
    causes = _Causes(addresses)
    logger = logging.getLogger("aiokafka")
    logger.addHandler(causes)
    try:
        await client.start()
    except KafkaConnectionError as exc:
        # A client whose start failed still holds its connections and tasks.
        with contextlib.suppress(Exception):
            await (client.close() if hasattr(client, "close") else client.stop())
        if isinstance(exc, KafkaConnectError):
            raise
        raise KafkaConnectError(connect_failure(settings, str(exc), causes.lines)) from exc
    finally:
        logger.removeHandler(causes)


def connect_failure(settings: WorkerSettings, error: str, causes: Sequence[str] = ()) -> str:
    """The message of KafkaConnectError: what was tried and what may be wrong, no password."""
    seen = f" (aiokafka: {'; '.join(causes)})" if causes else ""
    hint = "Check the brokers are up and the address is right"
    if settings.kafka_security_protocol != "PLAINTEXT":
        hint += ("; if they are, the credentials, the SASL mechanism, the security protocol or the CA file may be"
                 " wrong (aiokafka reports a refused login or certificate only as this), and the broker's log names"
                 " the cause")
    else:
        hint += "; if the brokers ask for TLS or a login, set RUNSTATE_KAFKA_SECURITY_PROTOCOL and the rest"
    return (f"cannot connect to Kafka at {settings.kafka_bootstrap_servers} with {describe_login(settings)}: "
            f"{error}{seen}. {hint} (RUNSTATE_KAFKA_* settings)")
