"""deploy/stack's Kafka security without a broker: the switch, what each mode puts in
server.properties and .runstate/env, the certificates openssl makes, and that data formatted
for the other mode is not reused (SCRAM users exist only from the format)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from stack.envfile import shown
from stack.kafka import KafkaNode
from stack.output import StackError
from stack.security import (
    ADMIN,
    PLAINTEXT,
    SECURED,
    SERVICE,
    WORKER,
    KafkaSecurity,
    make_certificates,
    prepare,
    stack_mode,
)


def test_the_stack_is_secured_unless_told_plaintext() -> None:
    assert stack_mode({}) == SECURED
    assert stack_mode({"RUNSTATE_STACK_SECURITY": "PLAINTEXT"}) == PLAINTEXT
    assert stack_mode({"RUNSTATE_STACK_SECURITY": " sasl_ssl "}) == SECURED
    with pytest.raises(StackError, match="RUNSTATE_STACK_SECURITY='tls'"):
        stack_mode({"RUNSTATE_STACK_SECURITY": "tls"})


def test_a_plaintext_node_has_no_login_and_never_creates_topics_by_itself(tmp_path: Path) -> None:
    node = KafkaNode(tmp_path, 19092, 19093)
    props = node.properties()
    assert props["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert props["auto.create.topics.enable"] == "false"
    assert "authorizer.class.name" not in props
    env = node.env()
    assert env["RUNSTATE_KAFKA_SECURITY_PROTOCOL"] == "PLAINTEXT"
    # empty (read as unset): loading the file clears a secured run's login from a shell
    assert env["RUNSTATE_KAFKA_PASSWORD"] == env["RUNSTATE_KAFKA_USERNAME"] == ""
    assert env["RUNSTATE_TOPIC_REPLICATION_FACTOR"] == "1"


def test_a_secured_node_authenticates_every_listener_and_denies_by_default(tmp_path: Path) -> None:
    security = KafkaSecurity(tmp_path, {ADMIN: "a" * 8, SERVICE: "s" * 8, WORKER: "w" * 8})
    node = KafkaNode(tmp_path, 19092, 19093, security=security)
    props = node.properties()
    assert props["listeners"] == "SASL_SSL://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert props["listener.security.protocol.map"] == "SASL_SSL:SASL_SSL,CONTROLLER:SSL"
    assert props["listener.name.controller.ssl.client.auth"] == "required"
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == "User:admin;User:CN=localhost"
    assert "PLAINTEXT" not in props["listeners"]
    args = security.format_args()
    assert args.count("--add-scram") == 3 and f"SCRAM-SHA-512=[name={WORKER},password={'w' * 8}]" in args
    env = node.env()
    assert env["RUNSTATE_KAFKA_USERNAME"] == WORKER and env["RUNSTATE_KAFKA_PASSWORD"] == "w" * 8
    assert security.client_env(SERVICE)["RUNSTATE_KAFKA_USERNAME"] == SERVICE
    assert shown("RUNSTATE_KAFKA_PASSWORD", env["RUNSTATE_KAFKA_PASSWORD"]) == "***"


def test_the_worker_acls_grant_no_write_on_outputs(tmp_path: Path) -> None:
    security = KafkaSecurity(tmp_path, {})
    worker_writes = [c for c in security.acl_commands({}) if f"User:{WORKER}" in c and "Write" in c]
    assert len(worker_writes) == 1
    topics = [worker_writes[0][i + 1] for i, a in enumerate(worker_writes[0]) if a == "--topic"]
    assert topics == ["runstate.commands"]


def test_the_certificates_are_what_kafka_and_python_accept(tmp_path: Path) -> None:
    make_certificates(tmp_path)
    pem = (tmp_path / "broker.pem").read_text()
    assert pem.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8: Kafka refuses PKCS#1
    for secret in ("broker.pem", "ca.key"):
        assert stat.S_IMODE((tmp_path / secret).stat().st_mode) == 0o600
    text = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "broker.crt"), "-noout", "-text"],
                          capture_output=True, text=True, check=True).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text
    assert "TLS Web Server Authentication" in text and "TLS Web Client Authentication" in text
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "broker.crt")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_data_formatted_for_the_other_mode_is_formatted_again(tmp_path: Path) -> None:
    home = tmp_path / "kafka"
    (home / "data").mkdir(parents=True)
    (home / "data" / "meta.properties").write_text("formatted\n")
    secured = prepare(tmp_path, [home], SECURED)  # data from before the switch existed: plaintext
    assert secured is not None and not (home / "data").exists()
    (home / "data").mkdir()
    (home / "data" / "meta.properties").write_text("formatted\n")
    again = prepare(tmp_path, [home], SECURED)
    assert again is not None and again.passwords == secured.passwords and (home / "data").exists()
    assert stat.S_IMODE((tmp_path / "kafka-security" / "secrets.json").stat().st_mode) == 0o600
    assert prepare(tmp_path, [home], PLAINTEXT) is None
    assert not (home / "data").exists()
