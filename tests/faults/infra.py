"""A private Kafka broker and PostgreSQL server for the restart scenarios, so
that restarting them never touches the servers other tests (or engineers) use:
a LocalStack of its own in a temporary folder, servers only, on fresh ports,
never the servers named by the environment."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import stack.kafka
import stack.postgres
from runstate.config import Settings
from runstate.envfile import read_env_file
from runstate.store.migrate import upgrade
from stack import LocalStack
from stack.local import REPLICATED


class PrivateStack:
    def __init__(self) -> None:
        # World-searchable: as root, PostgreSQL runs as the postgres user and must reach its folder.
        self.root = Path(tempfile.mkdtemp(prefix="runstate-faults-"))
        os.chmod(self.root, 0o755)
        self.stack = LocalStack(self.root, services=[], use_environment=False)
        # A server restarted on a busy machine may take longer than `make up` allows, and a
        # restart that gives up would fail the scenario for the machine's sake.
        stack.kafka.KAFKA_READY_TIMEOUT = max(stack.kafka.KAFKA_READY_TIMEOUT, 300.0)
        stack.postgres.PG_READY_TIMEOUT = max(stack.postgres.PG_READY_TIMEOUT, 120.0)
        self.env: dict[str, str] = {}
        self.restarts: list[tuple[str, str, float]] = []  # (server, how, seconds down)

    def start(self) -> PrivateStack:
        try:
            self.stack.up()
            # The consumers under test run as the consumer's role; the owner migrates.
            self.env = {**self.stack.env(), **self.stack.service_env()}
            self.env["DATABASE_URL"] = self.env["RUNSTATE_CONSUMER_DATABASE_URL"]
            upgrade(self.env["RUNSTATE_ADMIN_DATABASE_URL"], self.env["DATABASE_URL"])
        except BaseException:
            self.stop()
            raise
        return self

    def settings(self) -> Settings:
        """As this stack's service principal (its service.env), whatever the main stack's login is."""
        login = read_env_file(self.root / "service.env")
        kafka = {var: login.get(var) for var in ("RUNSTATE_KAFKA_USERNAME", "RUNSTATE_KAFKA_PASSWORD",
                                                 "RUNSTATE_KAFKA_SSL_CAFILE", "RUNSTATE_KAFKA_SSL_CERTFILE",
                                                 "RUNSTATE_KAFKA_SSL_KEYFILE")}
        kafka["RUNSTATE_KAFKA_SECURITY_PROTOCOL"] = login.get("RUNSTATE_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
        topics = {k: v for k, v in self.env.items() if k.startswith("RUNSTATE_TOPIC_")}
        return Settings(kafka_bootstrap_servers=self.env["KAFKA_BOOTSTRAP_SERVERS"],
                        database_url=self.env["DATABASE_URL"],
                        admin_database_url=self.env["RUNSTATE_ADMIN_DATABASE_URL"], **kafka, **topics)

    @property
    def replicated(self) -> bool:
        return self.stack.shape == REPLICATED

    def kafka_nodes(self) -> list[str]:
        return [n for n in self.stack.server_names() if n.split("-")[0] == "kafka"]

    def postgres_primary(self) -> str:
        """The PostgreSQL server that is the primary now (the only one of the single stack)."""
        if not self.replicated:
            return "postgres"
        return next(n for n in self.stack.server_names()
                    if n.startswith("postgres-") and getattr(self.stack.server(n), "primary", False))

    def restart_kafka(self, hard: bool = False, down_for: float = 0.0) -> float:
        """The Kafka node, or every node of the replicated cluster at once (the same outage)."""
        if self.replicated:
            took = self.stack.restart_all(self.kafka_nodes(), hard=hard, down_for=down_for)
        else:
            took = self.stack.restart("kafka", hard=hard, down_for=down_for)
        self.restarts.append(("kafka", "SIGKILL" if hard else "SIGTERM", took))
        return took

    def restart_postgres(self, hard: bool = False, down_for: float = 0.0) -> float:
        """The PostgreSQL server, or the replicated stack's primary (its standby reconnects)."""
        name = self.postgres_primary()
        took = self.stack.restart(name, hard=hard, down_for=down_for)
        self.restarts.append((name, "SIGKILL" if hard else "SIGINT", took))
        return took

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.stack.down()
        shutil.rmtree(self.root, ignore_errors=True)
