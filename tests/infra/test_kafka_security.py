"""The Kafka security settings as each client takes them: aiokafka's keyword arguments and
FastStream's security object, for every protocol and mechanism; the password never shown."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from runstate.config import SettingsError, WorkerSettings
from runstate.kafka_security import faststream_security, kafka_options

PASSWORD = "s3cret-kafka-password"


@pytest.fixture(scope="module")
def pem(tmp_path_factory) -> dict[str, Path]:
    """A throwaway self-signed certificate and its PKCS#8 key."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "ca.crt", folder / "ca.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=runstate-test-ca",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return {"cert": cert, "key": key}


# Explicit, so that neither the environment nor .runstate/env (the secured stack's) fills them in.
UNSET = {"kafka_security_protocol": "PLAINTEXT", "kafka_sasl_mechanism": "SCRAM-SHA-512", "kafka_username": None,
         "kafka_password": None, "kafka_ssl_cafile": None, "kafka_ssl_certfile": None, "kafka_ssl_keyfile": None}


def worker(**kw) -> WorkerSettings:
    return WorkerSettings.load(kafka_bootstrap_servers="broker:9093", **{**UNSET, **kw})


def test_plaintext_is_the_default_and_adds_nothing():
    s = worker()
    assert kafka_options(s) == {"bootstrap_servers": "broker:9093", "security_protocol": "PLAINTEXT"}
    assert faststream_security(s) is None


def test_ssl_verifies_the_broker_and_its_host_name(pem):
    s = worker(kafka_security_protocol="SSL", kafka_ssl_cafile=str(pem["cert"]))
    options = kafka_options(s)
    assert options["security_protocol"] == "SSL" and "sasl_mechanism" not in options
    context = options["ssl_context"]
    assert context.check_hostname is True and context.verify_mode == ssl.CERT_REQUIRED
    assert any(ca["subject"] == ((("commonName", "runstate-test-ca"),),) for ca in context.get_ca_certs())
    security = faststream_security(s)
    assert type(security) is BaseSecurity and security.use_ssl is True
    assert security.ssl_context.check_hostname is True


def test_ssl_takes_a_client_certificate(pem):
    s = worker(kafka_security_protocol="SSL", kafka_ssl_cafile=str(pem["cert"]),
               kafka_ssl_certfile=str(pem["cert"]), kafka_ssl_keyfile=str(pem["key"]))
    assert kafka_options(s)["ssl_context"].verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize(
    ("protocol", "mechanism", "faststream_class"),
    [
        ("SASL_PLAINTEXT", "PLAIN", SASLPlaintext),
        ("SASL_PLAINTEXT", "SCRAM-SHA-256", SASLScram256),
        ("SASL_PLAINTEXT", "SCRAM-SHA-512", SASLScram512),
        ("SASL_SSL", "PLAIN", SASLPlaintext),
        ("SASL_SSL", "SCRAM-SHA-256", SASLScram256),
        ("SASL_SSL", "SCRAM-SHA-512", SASLScram512),
    ],
)
def test_sasl_protocols_and_mechanisms(pem, protocol, mechanism, faststream_class):
    files = {"kafka_ssl_cafile": str(pem["cert"])} if protocol == "SASL_SSL" else {}
    s = worker(kafka_security_protocol=protocol, kafka_sasl_mechanism=mechanism,
               kafka_username="worker", kafka_password=PASSWORD, **files)
    options = kafka_options(s)
    assert {k: options[k] for k in ("security_protocol", "sasl_mechanism", "sasl_plain_username",
                                     "sasl_plain_password")} == {
        "security_protocol": protocol, "sasl_mechanism": mechanism,
        "sasl_plain_username": "worker", "sasl_plain_password": PASSWORD,
    }
    assert ("ssl_context" in options) is (protocol == "SASL_SSL")
    security = faststream_security(s)
    assert type(security) is faststream_class
    assert (security.username, security.password, security.use_ssl) == ("worker", PASSWORD, protocol == "SASL_SSL")
    # What FastStream hands aiokafka equals what our own clients get.
    from faststream.kafka.security import parse_security

    parsed = parse_security(security)
    assert {k: v for k, v in parsed.items() if k != "ssl_context"} == {
        k: v for k, v in options.items() if k not in ("ssl_context", "bootstrap_servers")
    }


def test_the_password_is_never_shown():
    s = worker(kafka_security_protocol="SASL_PLAINTEXT", kafka_username="worker", kafka_password=PASSWORD)
    options = kafka_options(s)
    for text in (repr(s), str(s), repr(options), str(options), repr(s.model_dump()), f"{options}"):
        assert PASSWORD not in text
    assert "worker" in repr(options)


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"kafka_security_protocol": "SASL_SSL"},
         "RUNSTATE_KAFKA_USERNAME and RUNSTATE_KAFKA_PASSWORD must both be set"),
        ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_username": "u"}, "must both be set"),
        ({"kafka_security_protocol": "SASL_PLAINTEXT", "kafka_password": PASSWORD}, "must both be set"),
        ({"kafka_security_protocol": "TLS"}, "RUNSTATE_KAFKA_SECURITY_PROTOCOL='TLS'"),
        ({"kafka_security_protocol": "SASL_SSL", "kafka_sasl_mechanism": "GSSAPI", "kafka_username": "u",
          "kafka_password": PASSWORD}, "RUNSTATE_KAFKA_SASL_MECHANISM='GSSAPI'"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/no/such/ca.pem"}, "RUNSTATE_KAFKA_SSL_CAFILE"),
        ({"kafka_ssl_cafile": "CERT"}, "does not use TLS"),
        ({"kafka_security_protocol": "SSL", "kafka_ssl_keyfile": "KEY"}, "needs its certificate"),
    ],
)
def test_invalid_security_settings_are_one_line(pem, settings, fragment):
    values = {k: str(pem["cert"]) if v == "CERT" else str(pem["key"]) if v == "KEY" else v for k, v in settings.items()}
    with pytest.raises(SettingsError) as caught:
        worker(**values)
    message = str(caught.value)
    assert fragment in message and "\n" not in message and PASSWORD not in message
