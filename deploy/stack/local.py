"""LocalStack: Kafka, PostgreSQL and the runstate services as plain processes under one folder.

`make up/down/status` drive the default one (.runstate) through `python deploy/stack`; the fault
suite starts a private one in a temporary folder and restarts its servers; the benchmark starts
the servers only and its own consumers."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from . import cluster, standby
from .envfile import shown
from .external import external_record, external_settings, wait_external
from .kafka import KafkaNode
from .layout import DEFAULT_ROOT, Layout, relative
from .output import StackError, say
from .ports import HOST, Ports
from .postgres import PostgresServer
from .processes import Launcher, is_up, kill_group, stop
from .records import Record, StateFiles
from .security import PLAINTEXT_ENV, SERVICE, stack_mode
from .security import prepare as prepare_kafka_security
from .services import SERVICES, Context, Service, start_service
from .tools import need_java

SHAPE_VARIABLE = "RUNSTATE_STACK"
SINGLE, REPLICATED = "single", "replicated"


def stack_shape(environ: Mapping[str, str] = os.environ) -> str:
    """single (the default: one Kafka node, one PostgreSQL) or replicated (three Kafka nodes,
    a PostgreSQL primary and synchronous standby), from RUNSTATE_STACK."""
    value = environ.get(SHAPE_VARIABLE, "").strip().lower() or SINGLE
    if value not in (SINGLE, REPLICATED):
        raise StackError(f"{SHAPE_VARIABLE}={value!r}: expected {SINGLE!r} (the default) or {REPLICATED!r}")
    return value


class Server(Protocol):
    """A Kafka node or a PostgreSQL server: started (again) by the stack, on fixed ports."""

    name: str

    def start(self, launcher: Launcher, apt_log: Path) -> Record: ...

    def env(self) -> dict[str, str]: ...


def _after(server: Server) -> bool:
    """Whether `server` starts once the others are up (a standby needs its primary)."""
    return isinstance(server, standby.PostgresNode) and not server.primary


class LocalStack:
    def __init__(self, root: Path = DEFAULT_ROOT, *, services: Sequence[Service] = SERVICES,
                 use_environment: bool = True, shape: str | None = None) -> None:
        """`use_environment`: servers named by KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are used
        instead of local ones (see external.py); a private stack turns it off. `shape`: single or
        replicated (default: RUNSTATE_STACK)."""
        self.shape = shape or stack_shape()
        self.layout = Layout(root)
        self.files = StateFiles(self.layout)
        self.services = list(services)
        self.use_environment = use_environment
        self._launcher = Launcher()
        self._servers: dict[str, Server] = {}  # what this object started, for restart()

    @property
    def env_file(self) -> Path:
        return self.layout.env_file

    @property
    def apt_log(self) -> Path:
        return self.layout.root / "apt.log"

    # ------------------------------------------------------------------ what is recorded

    def components(self) -> list[Record]:
        return self.files.components()

    def env(self) -> dict[str, str]:
        """The connection variables of the running stack (what .runstate/env exports)."""
        return self.files.env()

    def service_env(self) -> dict[str, str]:
        """The services' own credentials (what .runstate/service.env exports): the owner's URL
        as RUNSTATE_ADMIN_DATABASE_URL, each service role's RUNSTATE_<ROLE>_DATABASE_URL."""
        return self.files.service_env()

    def pid(self, name: str) -> int | None:
        return next((c.pid for c in self.components() if c.name == name), None)

    def status(self) -> list[tuple[Record, bool]]:
        """Each recorded component and whether it is up."""
        return [(c, is_up(c, HOST)) for c in self.components()]

    # ------------------------------------------------------------------ up and down

    def up(self, *, servers_only: bool = False) -> bool:
        """Start the stack unless it is already up. True when this call started it. On failure
        everything this call started is stopped and StackError raised.

        servers_only: Kafka and PostgreSQL without the runstate services, for benchmarks and
        fault tests that start consumers with settings of their own."""
        services = [] if servers_only else self.services
        with self.files.locked():
            comps = self.components()
            if comps and self.files.shape() != self.shape:
                say(f"the running stack is {self.files.shape()}, {self.shape} was asked for: stopping it first")
                self._stop(comps)
                self.files.clear()
                comps = []
            if comps:
                names = {c.name for c in comps}
                if all(is_up(c, HOST) for c in comps) and all(s.name in names for s in services):
                    say("already up (" + ", ".join(c.describe() for c in comps) + "); connection details in "
                        f"{relative(self.env_file)}")
                    return False
                say("the previous stack is partly down: stopping what is left of it first")
                self._stop(comps)
            self._up(services)
            return True

    def down(self) -> None:
        """Stop exactly what `up` recorded."""
        with self.files.locked():
            comps = self.components()
            if not comps:
                say(f"nothing to stop (no stack recorded in {relative(self.layout.state_file)})")
            else:
                self._stop(comps)
            self.files.clear()
        self._servers.clear()

    def restart(self, name: str, *, hard: bool = False, down_for: float = 0.0) -> float:
        """Stop a server this object started (its stop signal, or `hard`: SIGKILL of its whole
        process group), wait `down_for` s, start it again on the same ports. Returns the seconds
        from the stop to ready."""
        server = self._servers[name]
        t0 = time.monotonic()
        with self.files.locked():
            comps = self.components()
            old = next(c for c in comps if c.name == name)
            old.popen = next((r.popen for r in self._launcher.spawned if r.pid == old.pid), None)
            if hard:
                kill_group(old)
            else:
                stop(old, old.stop_signal)
            time.sleep(down_for)
            new = server.start(self._launcher, self.apt_log)
            self.files.save([new if c.name == name else c for c in comps], self.env())
        return time.monotonic() - t0

    def restart_all(self, names: list[str], *, hard: bool = False, down_for: float = 0.0) -> float:
        """Stop several servers (a whole Kafka cluster), wait `down_for` s, start them again side by
        side (a cluster's nodes become ready only together). Returns the seconds to ready."""
        t0 = time.monotonic()
        with self.files.locked():
            comps = self.components()
            chosen = [c for c in comps if c.name in names]
            for c in chosen:
                c.popen = next((r.popen for r in self._launcher.spawned if r.pid == c.pid), None)
            # Side by side: a cluster's last node alone could not finish its controlled shutdown.
            threads = [threading.Thread(target=kill_group if hard else stop,
                                        args=(c,) if hard else (c, c.stop_signal)) for c in chosen]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(down_for)
            started = {r.name: r for r in self._start_all([self._servers[n] for n in names], self._launcher)}
            self.files.save([started.get(c.name, c) for c in comps], self.env())
        return time.monotonic() - t0

    def server(self, name: str) -> Server:
        """A server this object started, by name (kafka-1, postgres-a, ...)."""
        return self._servers[name]

    def server_names(self) -> list[str]:
        return list(self._servers)

    def kill(self, name: str) -> None:
        """SIGKILL a server's whole process group and leave it down (start_again brings it back)."""
        with self.files.locked():
            old = next(c for c in self.components() if c.name == name)
            old.popen = next((r.popen for r in self._launcher.spawned if r.pid == old.pid), None)
            kill_group(old)

    def start_again(self, name: str) -> float:
        """Start a server that kill() stopped, on the same ports; returns the seconds to ready."""
        t0 = time.monotonic()
        with self.files.locked():
            comps = self.components()
            new = self._servers[name].start(self._launcher, self.apt_log)
            self.files.save([new if c.name == name else c for c in comps], self.env())
        return time.monotonic() - t0

    def _up(self, services: list[Service]) -> None:
        t_all = time.monotonic()
        last = self.files.last_run()
        ext = external_settings(os.environ, last) if self.use_environment else {}
        ports = Ports(last.get("ports", {}))
        externals: list[Record] = []
        servers: list[Server] = []
        kafka: KafkaNode | None = None
        if "KAFKA_BOOTSTRAP_SERVERS" in ext:
            externals.append(external_record("kafka", ext["KAFKA_BOOTSTRAP_SERVERS"]))
        elif self.shape == REPLICATED:
            security = prepare_kafka_security(self.layout.root, cluster.homes(self.layout.root), stack_mode(),
                                              cluster.SECURITY_FOLDER)
            nodes = cluster.cluster_nodes(self.layout.root, ports, security)
            kafka = nodes[0]
            servers.extend(nodes)
        else:
            home = self.layout.root / "kafka"
            security = prepare_kafka_security(self.layout.root, [home], stack_mode())
            kafka = KafkaNode(home, ports["kafka"], ports["kafka_controller"], security=security)
            servers.append(kafka)
        if "DATABASE_URL" in ext:
            externals.append(external_record("postgres", ext["DATABASE_URL"]))
        elif self.shape == REPLICATED:
            servers.extend(standby.replicated_postgres(self.layout.root, ports))
        else:
            servers.append(PostgresServer(self.layout.root / "postgres", ports["postgres"]))
        launcher = self._launcher = Launcher()
        try:
            for rec in externals:
                wait_external(rec)
            started = self._start_all(servers, launcher)
            # The owner's URL is for migrations only: never in .runstate/env.
            service_env = {k: ext.pop(k) for k in ("RUNSTATE_ADMIN_DATABASE_URL",) if k in ext}
            ctx = Context(env=dict(ext), ports=ports, layout=self.layout, service_env=service_env)
            for server in servers:
                ctx.env.update(server.env())
                ctx.service_env.update(getattr(server, "service_env", dict)())
            if kafka is not None and kafka.security is not None:
                bootstrap = kafka.cluster_bootstrap or kafka.bootstrap
                say(f"kafka: {kafka.security.ensure_acls(need_java(self.apt_log), bootstrap, self.apt_log)}")
                # The service processes log in as the service; .runstate/env carries the worker.
                ctx.service_env.update(kafka.security.client_env(SERVICE))
            elif kafka is not None:
                ctx.service_env.update(PLAINTEXT_ENV)
            components = externals + started
            for svc in services:
                components.append(start_service(svc, ctx, launcher))
            self.files.save(components, ctx.env, ctx.service_env, shape=self.shape)
            self.files.save_last_run(ports.chosen, {k: v for k, v in ctx.env.items() if k not in ext})
        except BaseException:
            launcher.stop_all(timeout=15)
            self.files.clear()
            raise
        self._servers = {s.name: s for s in servers}
        say(f"up in {time.monotonic() - t_all:.1f} s; connection details in {relative(self.env_file)}:")
        for k, v in ctx.env.items():
            say(f"  {k}={shown(k, v)}")
        if ctx.service_env:
            say(f"the services' own credentials ({', '.join(ctx.service_env)}) are in "
                f"{relative(self.layout.service_env_file)}")

    def _start_all(self, servers: list[Server], launcher: Launcher) -> list[Record]:
        """Start the servers side by side (a standby once the rest is up); the first failure is
        raised once all have finished."""
        results: dict[str, Record] = {}
        errors: list[StackError] = []

        def start(server: Server) -> None:
            try:
                results[server.name] = server.start(launcher, self.apt_log)
            except StackError as err:
                errors.append(err)
            except Exception as exc:  # noqa: BLE001 - reported as this server's failure
                errors.append(StackError(f"{server.name}: unexpected error: {type(exc).__name__}: {exc}"))

        for wave in ([s for s in servers if not _after(s)], [s for s in servers if _after(s)]):
            threads = [threading.Thread(target=start, args=(s,), name=s.name) for s in wave]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
        return [results[s.name] for s in servers]

    def _stop(self, comps: list[Record]) -> None:
        # services (recorded after the infrastructure) first, in reverse start order
        cluster_nodes = [c for c in comps if c.external is None and c.name.startswith("kafka-")]
        for c in reversed(comps):
            if c.external is not None:
                say(f"{c.name}: external ({c.probe_host}:{c.probe_port}), left alone")
                continue
            if c in cluster_nodes:
                continue
            how = stop(c, c.stop_signal)
            say(f"{c.name}: pid {c.pid} {how}")
        # A cluster's nodes side by side: the last one alone has no quorum for its controlled
        # shutdown and would wait for the SIGKILL.
        results: dict[str, str] = {}

        def stop_node(c: Record) -> None:
            results[c.name] = stop(c, c.stop_signal)

        threads = [threading.Thread(target=stop_node, args=(c,)) for c in cluster_nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in cluster_nodes:
            say(f"{c.name}: pid {c.pid} {results.get(c.name, 'not stopped')}")
