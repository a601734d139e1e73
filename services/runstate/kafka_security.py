"""One place that turns the Kafka security settings into what each client takes: keyword
arguments for aiokafka's producer, consumer and admin client, and FastStream's security
object for its KafkaBroker. Only aiokafka, FastStream's security classes and ssl, so the
client library can use it."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

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
