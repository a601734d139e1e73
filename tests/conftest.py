"""Session fixtures for the real servers: Kafka and PostgreSQL.

RUNSTATE_TEST_BACKEND selects where they come from:

* ``local`` (default): the servers `make up` / `make test` started (deploy/stack), or any
  servers named by KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL / RUNSTATE_ADMIN_DATABASE_URL. The
  variables are read from the environment (`make test` exports .runstate/env) and, when
  missing there, from .runstate/env and .runstate/service.env (the services' own database
  roles: RUNSTATE_CONSUMER_DATABASE_URL, RUNSTATE_GATEWAY_DATABASE_URL, ...).
* ``testcontainers``: Kafka and PostgreSQL are started in Docker with testcontainers' Kafka and
  Postgres modules for the test session. Needs a Docker engine — untested on the project's
  machines, which have none.

Nothing is skipped silently: unreachable servers fail the tests that need them, with a message
that says what was tried and how to start the stack.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from runstate.envfile import read_env_file

REPO = Path(__file__).resolve().parent.parent
# The local stack's package (`from stack import LocalStack, free_port`) for every test module.
sys.path.append(str(REPO / "deploy"))
ENV_FILE = REPO / ".runstate" / "env"
# The service principal's Kafka login (deploy/stack writes it, mode 0600): the tests start the
# service, which a worker's login (.runstate/env) may not be.
SERVICE_ENV_FILE = REPO / ".runstate" / "service.env"
BACKEND = os.environ.get("RUNSTATE_TEST_BACKEND", "local").strip().lower() or "local"
CONNECT_TIMEOUT_S = 5.0
# The consumers that tests start serve no HTTP port unless a test asks for one (runstate.config).
os.environ.setdefault("RUNSTATE_METRICS_PORT", "0")
if BACKEND == "local":
    for _key, _value in read_env_file(SERVICE_ENV_FILE).items():
        if _key.startswith("RUNSTATE_KAFKA_"):
            os.environ[_key] = _value


def _setting(name: str) -> str | None:
    return os.environ.get(name) or read_env_file(ENV_FILE).get(name) or read_env_file(SERVICE_ENV_FILE).get(name)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def _require(name: str, value: str | None, host_port: tuple[str, int] | None) -> str:
    hint = "start the stack with `make up` (or run `make test`, which starts and stops it)"
    if not value:
        pytest.fail(f"{name} is not set and {ENV_FILE} does not define it: {hint}", pytrace=False)
    if host_port and not _reachable(*host_port):
        pytest.fail(f"{name}={value}: nothing accepts connections on {host_port[0]}:{host_port[1]}: {hint}",
                    pytrace=False)
    return value


def _kafka_host_port(bootstrap: str) -> tuple[str, int]:
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    return host.strip("[]"), int(port)


def _db_host_port(url: str) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(url)
    # A multi-host URL (primary and standby) names its servers in ?host=h:p; the first is probed.
    listed = urllib.parse.parse_qs(parsed.query).get("host")
    if not parsed.hostname and listed:
        host, _, port = listed[0].rpartition(":")
        return host or "127.0.0.1", int(port or 5432)
    return parsed.hostname or "127.0.0.1", parsed.port or 5432


# --------------------------------------------------------------------------- testcontainers


class _Containers:
    """Kafka + PostgreSQL in Docker for one test session (RUNSTATE_TEST_BACKEND=testcontainers).

    Untested on the project's machines (no Docker engine there)."""

    KAFKA_IMAGE = "confluentinc/cp-kafka:7.6.0"
    POSTGRES_IMAGE = "postgres:15"

    def __init__(self) -> None:
        try:  # imported lazily: the local backend must not need Docker or these modules
            from testcontainers.community.kafka import KafkaContainer
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # older testcontainers layout
            from testcontainers.kafka import KafkaContainer  # type: ignore[no-redef]
            from testcontainers.postgres import PostgresContainer  # type: ignore[no-redef]
        self.kafka = KafkaContainer(self.KAFKA_IMAGE).with_kraft()
        self.postgres = PostgresContainer(self.POSTGRES_IMAGE, username="runstate_owner", password="runstate",
                                          dbname="runstate", driver="psycopg")
        self.kafka.start()
        try:
            self.postgres.start()
        except BaseException:
            self.kafka.stop()
            raise
        self.kafka_bootstrap = self.kafka.get_bootstrap_server()
        self.admin_database_url = self.postgres.get_connection_url()
        self._create_roles()
        self.database_url = self.role_url("runstate_consumer")
        # Code under test that reads the environment sees the containers too.
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = self.kafka_bootstrap
        os.environ["DATABASE_URL"] = self.database_url
        os.environ["RUNSTATE_ADMIN_DATABASE_URL"] = self.admin_database_url

    def role_url(self, role: str) -> str:
        parsed = urllib.parse.urlsplit(self.admin_database_url)
        return urllib.parse.urlunsplit(parsed._replace(netloc=f"{role}:runstate@{parsed.hostname}:{parsed.port}"))

    def _create_roles(self) -> None:
        import sqlalchemy as sa

        engine = sa.create_engine(self.admin_database_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                for role in ("runstate_consumer", "runstate_gateway", "runstate_auditor"):
                    conn.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD 'runstate'"))
        finally:
            engine.dispose()

    def stop(self) -> None:
        for container in (self.postgres, self.kafka):
            with contextlib.suppress(Exception):  # best effort at session end
                container.stop()


@pytest.fixture(scope="session")
def _containers() -> Iterator[_Containers | None]:
    if BACKEND == "local":
        yield None
        return
    if BACKEND != "testcontainers":
        pytest.fail(f"RUNSTATE_TEST_BACKEND={BACKEND!r}: expected 'local' or 'testcontainers'", pytrace=False)
    containers = _Containers()
    try:
        yield containers
    finally:
        containers.stop()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def test_backend() -> str:
    return BACKEND


@pytest.fixture(scope="session")
def kafka_bootstrap(_containers: _Containers | None) -> str:
    """Bootstrap servers of the real Kafka broker, e.g. '127.0.0.1:40813'."""
    if _containers is not None:
        return _containers.kafka_bootstrap
    value = _setting("KAFKA_BOOTSTRAP_SERVERS")
    return _require("KAFKA_BOOTSTRAP_SERVERS", value, _kafka_host_port(value) if value else None)


@pytest.fixture(scope="session")
def database_url(_containers: _Containers | None) -> str:
    """SQLAlchemy URL of the runstate database as the consumer's role (runstate_consumer:
    appends events, writes projections); DATABASE_URL where the stack made no such role."""
    if _containers is not None:
        return _containers.database_url
    value = _setting("RUNSTATE_CONSUMER_DATABASE_URL") or _setting("DATABASE_URL")
    return _require("DATABASE_URL", value, _db_host_port(value) if value else None)


@pytest.fixture(scope="session")
def gateway_database_url(_containers: _Containers | None) -> str:
    """SQLAlchemy URL as the gateway's read-only role (runstate_gateway)."""
    if _containers is not None:
        return _containers.role_url("runstate_gateway")
    value = _setting("RUNSTATE_GATEWAY_DATABASE_URL")
    return _require("RUNSTATE_GATEWAY_DATABASE_URL", value, _db_host_port(value) if value else None)


@pytest.fixture(scope="session")
def auditor_database_url(_containers: _Containers | None) -> str:
    """SQLAlchemy URL as the auditor's read-only role (runstate_auditor)."""
    if _containers is not None:
        return _containers.role_url("runstate_auditor")
    value = _setting("RUNSTATE_AUDITOR_DATABASE_URL")
    return _require("RUNSTATE_AUDITOR_DATABASE_URL", value, _db_host_port(value) if value else None)


@pytest.fixture(scope="session")
def admin_database_url(_containers: _Containers | None) -> str:
    """SQLAlchemy URL of the runstate database as its owner (runstate_owner: migrations, DDL)."""
    if _containers is not None:
        return _containers.admin_database_url
    value = _setting("RUNSTATE_ADMIN_DATABASE_URL") or _setting("DATABASE_URL")
    return _require("RUNSTATE_ADMIN_DATABASE_URL", value, _db_host_port(value) if value else None)


@pytest.fixture(scope="session")
def base_settings(kafka_bootstrap: str, database_url: str, admin_database_url: str):
    """runstate Settings for the real servers, with the migrations applied; tests derive
    isolated topic names from it (tests/pipeline/harness.py: isolated_settings)."""
    from runstate.config import Settings
    from runstate.store.migrate import upgrade

    upgrade(admin_database_url, database_url)
    return Settings(
        kafka_bootstrap_servers=kafka_bootstrap,
        database_url=database_url,
        admin_database_url=admin_database_url,
    )
