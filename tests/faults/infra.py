"""A private Kafka broker and PostgreSQL server for the restart scenarios, so
that restarting them never touches the servers other tests (or engineers) use.

deploy/stack.py has no API for a second stack: its kafka_up/postgres_up write
under the module-level STATE_DIR. This loads a private copy of the module,
points that copy's STATE_DIR at a temporary folder and calls those functions,
with ports of our own; only the processes started here are ever stopped."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from runstate.config import Settings
from runstate.store.migrate import upgrade

REPO = Path(__file__).resolve().parents[2]


def _private_stack_module():
    spec = importlib.util.spec_from_file_location(f"runstate_faults_private_stack_{id(object())}", REPO / "deploy" / "stack.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class PrivateStack:
    def __init__(self) -> None:
        self.stack = _private_stack_module()
        # World-searchable: as root, PostgreSQL runs as the postgres user and must reach its folder.
        self.root = Path(tempfile.mkdtemp(prefix="runstate-faults-"))
        os.chmod(self.root, 0o755)
        self.stack.STATE_DIR = self.root
        self.ports = {name: self.stack.free_port() for name in ("kafka", "kafka_controller", "postgres")}
        self.kafka: dict | None = None
        self.postgres: dict | None = None
        self.env: dict[str, str] = {}
        self.restarts: list[tuple[str, str, float]] = []  # (server, how, seconds down)

    def start(self) -> PrivateStack:
        try:
            self.kafka = self.stack.kafka_up(self.ports)
            self.env.update(self.kafka.pop("_env"))
            self.postgres = self.stack.postgres_up(self.ports)
            self.env.update(self.postgres.pop("_env"))
            upgrade(self.env["RUNSTATE_ADMIN_DATABASE_URL"], self.env["DATABASE_URL"])
        except BaseException:
            self.stop()
            raise
        return self

    def settings(self) -> Settings:
        return Settings(kafka_bootstrap_servers=self.env["KAFKA_BOOTSTRAP_SERVERS"],
                        database_url=self.env["DATABASE_URL"],
                        admin_database_url=self.env["RUNSTATE_ADMIN_DATABASE_URL"])

    def _kill(self, rec: dict, hard: bool) -> None:
        if hard:  # the whole process group at once: a power cut, crash recovery on restart
            with contextlib.suppress(ProcessLookupError):
                os.killpg(rec.get("pgid", rec["pid"]), signal.SIGKILL)
            deadline = time.monotonic() + 20
            while self.stack.group_members(rec.get("pgid", rec["pid"])) and time.monotonic() < deadline:
                time.sleep(0.1)
            self.stack._reap(rec)
        else:
            self.stack.stop_process(rec, rec.get("stop_signal", signal.SIGTERM))

    def restart_kafka(self, hard: bool = False, down_for: float = 0.0) -> float:
        assert self.kafka is not None
        t0 = time.monotonic()
        self._kill(self.kafka, hard)
        self.kafka = None
        time.sleep(down_for)
        self.kafka = self.stack.kafka_up(self.ports)
        self.kafka.pop("_env", None)
        took = time.monotonic() - t0
        self.restarts.append(("kafka", "SIGKILL" if hard else "SIGTERM", took))
        return took

    def restart_postgres(self, hard: bool = False, down_for: float = 0.0) -> float:
        assert self.postgres is not None
        t0 = time.monotonic()
        self._kill(self.postgres, hard)
        self.postgres = None
        time.sleep(down_for)
        self.postgres = self.stack.postgres_up(self.ports)
        self.postgres.pop("_env", None)
        took = time.monotonic() - t0
        self.restarts.append(("postgres", "SIGKILL" if hard else "SIGINT", took))
        return took

    def stop(self) -> None:
        for rec in (self.postgres, self.kafka):
            if rec is not None:
                with contextlib.suppress(Exception):
                    self.stack.stop_process(rec, rec.get("stop_signal", signal.SIGTERM), timeout=20)
        self.postgres = self.kafka = None
        shutil.rmtree(self.root, ignore_errors=True)
