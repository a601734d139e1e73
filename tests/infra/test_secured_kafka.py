"""The secured local stack (deploy/stack up, the default): what a worker's login may and may
not do on the real broker, what a client without the right login sees, and that no password
is shown or left readable by others."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

from runstate.client import RunstateClient
from runstate.config import Settings, WorkerSettings
from runstate.envfile import read_env_file
from runstate.kafka_security import KafkaConnectError, kafka_options
from runstate.pipeline.kafka import TopicSetupError, ensure_topics

pytestmark = [pytest.mark.kafka]

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / ".runstate"
KAFKA_VARIABLES = ("RUNSTATE_KAFKA_SECURITY_PROTOCOL", "RUNSTATE_KAFKA_SASL_MECHANISM", "RUNSTATE_KAFKA_USERNAME",
                   "RUNSTATE_KAFKA_PASSWORD", "RUNSTATE_KAFKA_SSL_CAFILE")


def login(path: Path, **changes: str | None) -> dict[str, str | None]:
    """The RUNSTATE_KAFKA_* values of an env file the stack wrote, every one of them explicit,
    so that neither the environment nor .runstate/env fills in another principal's."""
    values = read_env_file(path)
    found: dict[str, str | None] = {var: values.get(var) for var in KAFKA_VARIABLES}
    found.update({"RUNSTATE_KAFKA_SSL_CERTFILE": None, "RUNSTATE_KAFKA_SSL_KEYFILE": None, **changes})
    return found


@pytest.fixture(scope="module")
def stack_env(test_backend: str, kafka_bootstrap: str) -> dict[str, str]:
    if test_backend != "local":
        pytest.skip("RUNSTATE_TEST_BACKEND=testcontainers: the broker is a container, not deploy/stack's")
    env = read_env_file(STACK / "env")
    if env.get("KAFKA_BOOTSTRAP_SERVERS") != kafka_bootstrap:
        pytest.skip("the tests use a Kafka from the environment, not the local stack's")
    if env.get("RUNSTATE_KAFKA_SECURITY_PROTOCOL") != "SASL_SSL":
        pytest.skip("the local stack runs with RUNSTATE_STACK_SECURITY=plaintext")
    return env


@pytest.fixture(scope="module")
def worker(stack_env: dict[str, str], kafka_bootstrap: str) -> WorkerSettings:
    """The worker principal's settings, as .runstate/env gives them."""
    return WorkerSettings(kafka_bootstrap_servers=kafka_bootstrap, **login(STACK / "env"))


@pytest.fixture(scope="module")
def service(stack_env: dict[str, str], kafka_bootstrap: str) -> WorkerSettings:
    return WorkerSettings(kafka_bootstrap_servers=kafka_bootstrap, **login(STACK / "service.env"))


def test_the_env_files_are_the_owners_only_and_carry_one_principal_each(stack_env: dict[str, str]) -> None:
    worker_env, service_env = read_env_file(STACK / "env"), read_env_file(STACK / "service.env")
    for path in (STACK / "env", STACK / "service.env", STACK / "state.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert worker_env["RUNSTATE_KAFKA_USERNAME"] == "runstate-worker"
    assert service_env["RUNSTATE_KAFKA_USERNAME"] == "runstate-service"
    assert worker_env["RUNSTATE_KAFKA_PASSWORD"] != service_env["RUNSTATE_KAFKA_PASSWORD"]
    assert service_env["RUNSTATE_KAFKA_PASSWORD"] not in (STACK / "env").read_text()
    assert Path(worker_env["RUNSTATE_KAFKA_SSL_CAFILE"]).is_file()


def test_the_stack_command_line_shows_no_password(stack_env: dict[str, str]) -> None:
    passwords = [read_env_file(STACK / name)["RUNSTATE_KAFKA_PASSWORD"] for name in ("env", "service.env")]
    for command in ("status", "env"):
        result = subprocess.run([sys.executable, str(REPO / "deploy" / "stack"), command],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "127.0.0.1" in result.stdout
        for password in passwords:
            assert password not in result.stdout + result.stderr
    # `env` still names the variable, so the reader knows where the password is.
    assert "RUNSTATE_KAFKA_PASSWORD" in result.stdout


async def test_a_worker_sends_a_command_and_reads_its_result(worker: WorkerSettings) -> None:
    """Against the consumer service the stack started (logged in as the service principal)."""
    run_id = uuid.uuid4()
    async with RunstateClient(worker) as client:
        result = await client.create_task_run(run_id, name="secured", timeout=120)
    assert result.status == "ACCEPT" and result.stream_id == run_id and result.seq == 1


async def test_a_worker_reads_state_changes_in_its_own_group(worker: WorkerSettings) -> None:
    # A state change of its own (not the test above's: this one may run alone), read until it
    # arrives rather than for 10 s.
    run_id = uuid.uuid4()
    async with RunstateClient(worker) as client:
        await client.create_task_run(run_id, name="secured-reader", timeout=120)
    consumer = AIOKafkaConsumer(worker.state_change_topic, **kafka_options(worker),
                                group_id=f"runstate-worker-test-{uuid.uuid4().hex[:8]}",
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    keys: set[bytes] = set()
    try:
        deadline = asyncio.get_running_loop().time() + 120
        while str(run_id).encode() not in keys and asyncio.get_running_loop().time() < deadline:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                keys.update(record.key for record in records)
        await consumer.commit()  # needs Read on the group
        assert consumer.assignment(), "no state-change partition assigned to the worker's group"
    finally:
        await consumer.stop()
    assert str(run_id).encode() in keys


@pytest.mark.parametrize("topic", ["result_topic", "state_change_topic", "dead_letter_topic"])
async def test_a_worker_cannot_write_results_state_changes_or_dead_letters(worker: WorkerSettings,
                                                                           service: WorkerSettings,
                                                                           topic: str) -> None:
    name = getattr(worker, topic)
    before = await end_offsets(service, name)
    producer = AIOKafkaProducer(**kafka_options(worker), enable_idempotence=True, request_timeout_ms=20_000)
    await producer.start()
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await asyncio.wait_for(producer.send_and_wait(name, b'{"forged": true}', key=b"forged"), 60)
    finally:
        await producer.stop()
    assert await end_offsets(service, name) == before


async def test_a_worker_cannot_read_commands(worker: WorkerSettings) -> None:
    consumer = AIOKafkaConsumer(**kafka_options(worker), enable_auto_commit=False)
    await consumer.start()
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            consumer.assign([TopicPartition(worker.command_topic, 0)])
            consumer.seek(TopicPartition(worker.command_topic, 0), 0)
            await asyncio.wait_for(consumer.getone(), 120)
    finally:
        await consumer.stop()


async def test_a_worker_may_not_create_topics_and_is_told_so(worker: WorkerSettings, stack_env: dict[str, str]) -> None:
    token = uuid.uuid4().hex[:8]
    settings = Settings(**{**worker.model_dump(), "command_topic": f"runstate-worker-{token}.commands"},
                        database_url=stack_env["DATABASE_URL"], topic_replication_factor=1,
                        topic_min_insync_replicas=1)
    with pytest.raises(TopicSetupError) as refused:
        await ensure_topics(settings)
    assert "runstate-worker" in str(refused.value) and "not authorized" in str(refused.value)


async def test_topics_are_created_with_the_settings_and_a_single_replica_is_warned_of(
        service: WorkerSettings, stack_env: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    token = uuid.uuid4().hex[:8]
    topics = {"command_topic": f"t{token}.commands", "result_topic": f"t{token}.results",
              "state_change_topic": f"t{token}.state-changes", "dead_letter_topic": f"t{token}.dead-letter"}
    settings = Settings(**{**service.model_dump(), **topics}, database_url=stack_env["DATABASE_URL"], partitions=2, topic_replication_factor=1, topic_min_insync_replicas=1,
                        result_retention_ms=3_600_000, dead_letter_retention_ms=-1)
    with caplog.at_level(logging.WARNING, logger="runstate.kafka"):
        await ensure_topics(settings)
    assert any("replication factor of 1" in r.getMessage() for r in caplog.records)
    admin = AIOKafkaAdminClient(**kafka_options(settings))
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t) for t in (settings.result_topic, settings.dead_letter_topic)])
        configs = {r[3]: {e[0]: e[1] for e in r[4]} for response in responses for r in response.resources}
    finally:
        await admin.close()
    assert configs[settings.result_topic]["retention.ms"] == "3600000"
    assert configs[settings.dead_letter_topic]["retention.ms"] == "-1"
    assert configs[settings.result_topic]["min.insync.replicas"] == "1"


async def test_a_wrong_password_is_refused_with_a_message_that_says_what_was_tried(worker: WorkerSettings) -> None:
    wrong = "not-the-password-" + uuid.uuid4().hex
    settings = worker.replace(kafka_password=wrong)
    with pytest.raises(KafkaConnectError) as failed:
        async with RunstateClient(settings):
            pass
    message = str(failed.value)
    assert "SASL_SSL" in message and "SCRAM-SHA-512" in message and "'runstate-worker'" in message
    assert str(worker.kafka_ssl_cafile) in message and "credentials" in message
    assert wrong not in message
    assert worker.kafka_password is not None and worker.kafka_password.get_secret_value() not in message


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL"])
async def test_a_client_without_a_login_cannot_connect(worker: WorkerSettings, protocol: str) -> None:
    """Plaintext to the SASL_SSL port, and TLS without SASL: neither produces nor consumes."""
    files = {"kafka_ssl_cafile": str(worker.kafka_ssl_cafile)} if protocol == "SSL" else {"kafka_ssl_cafile": None}
    settings = worker.replace(kafka_security_protocol=protocol, kafka_username=None, kafka_password=None, **files)
    for client in (AIOKafkaProducer(**kafka_options(settings), request_timeout_ms=10_000),
                   AIOKafkaConsumer(worker.result_topic, **kafka_options(settings), request_timeout_ms=10_000)):
        with pytest.raises(KafkaConnectionError):
            await asyncio.wait_for(client.start(), 120)
        await client.stop()


async def end_offsets(settings: WorkerSettings, topic: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(**kafka_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()  # noqa: SLF001
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        assert tps, f"{topic} has no partitions"
        return {tp.partition: off for tp, off in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


def test_env_mode_is_private_even_when_the_umask_is_open(tmp_path: Path) -> None:
    from stack.envfile import write_env_file

    old = os.umask(0)
    try:
        write_env_file(tmp_path / "env", {"RUNSTATE_KAFKA_PASSWORD": "x"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "env").stat().st_mode) == 0o600


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"topic_replication_factor": 7, "topic_min_insync_replicas": 2}, "RUNSTATE_TOPIC_REPLICATION_FACTOR"),
    ({"create_topics": False}, "RUNSTATE_CREATE_TOPICS is false"),
])
async def test_topics_that_cannot_be_made_stop_the_start_with_a_reason(service: WorkerSettings,
                                                                       stack_env: dict[str, str],
                                                                       changes: dict, fragment: str) -> None:
    token = uuid.uuid4().hex[:8]
    topics = {"command_topic": f"t{token}.commands", "result_topic": f"t{token}.results",
              "state_change_topic": f"t{token}.state-changes", "dead_letter_topic": f"t{token}.dead-letter"}
    settings = Settings(**{**service.model_dump(), **topics}, database_url=stack_env["DATABASE_URL"], **changes)
    with pytest.raises(TopicSetupError, match=fragment):
        await ensure_topics(settings)
