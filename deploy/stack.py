#!/usr/bin/env python3
"""Local runstate stack: a single-node Kafka (KRaft) and a throwaway PostgreSQL cluster,
started as plain processes from the repository, plus the long-running runstate services
registered in SERVICES.

    python deploy/stack.py up       start everything (or report "already up"), write .runstate/env
    python deploy/stack.py down     stop exactly the processes that `up` recorded
    python deploy/stack.py status   show what is running (exit 0 = all up, 3 = not up)
    python deploy/stack.py env      print .runstate/env (shell `export` lines)

Run it with the project's virtualenv Python (`make up` does): the Kafka readiness check uses
aiokafka. Everything else is the standard library.

Layout (all git-ignored):
    .cache/maven                Maven's local repository (jar download cache)
    .cache/kafka/<v>/libs       the Kafka broker's class path
    .runstate/kafka             server.properties, data/, logs/server.log
    .runstate/postgres          data/ (the cluster), sock/ (unix socket), postgres.log
    .runstate/env               KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL, RUNSTATE_ADMIN_DATABASE_URL, ...
    .runstate/pids              "<name> <pid>" per started process
    .runstate/state.json        what `up` started (pids, process start times, ports), read by down/status

If KAFKA_BOOTSTRAP_SERVERS and/or DATABASE_URL are set when `up` runs, those servers are used
(and written through to .runstate/env) instead of starting local ones.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
STATE_DIR = REPO / ".runstate"
CACHE_DIR = REPO / ".cache"
ENV_FILE = STATE_DIR / "env"
PIDS_FILE = STATE_DIR / "pids"
STATE_FILE = STATE_DIR / "state.json"
LAST_FILE = STATE_DIR / "last.json"  # ports and local URLs of the previous run, reused when free
LOCK_FILE = STATE_DIR / ".lock"

KAFKA_VERSION = "4.1.1"
KAFKA_ARTIFACT = f"org.apache.kafka:kafka_2.13:{KAFKA_VERSION}"
KAFKA_POM = REPO / "deploy" / "kafka" / "pom.xml"
KAFKA_LOG4J = REPO / "deploy" / "kafka" / "log4j2.properties"
KAFKA_HOME = CACHE_DIR / "kafka" / KAFKA_VERSION
KAFKA_LIBS = KAFKA_HOME / "libs"
MAVEN_REPO = CACHE_DIR / "maven"
KAFKA_HEAP = "-Xmx512m"
KAFKA_READY_TIMEOUT = 60.0
PG_READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

PG_PREFERRED_MAJOR = "15"
DB_NAME = "runstate"
OWNER_ROLE = "runstate_owner"
APP_ROLE = "runstate_app"
HOST = "127.0.0.1"
LOG_TAIL_LINES = 40


class StackError(Exception):
    """A bring-up failure: `line` is the one-line cause, `log` the file whose tail explains it."""

    def __init__(self, line: str, log: Path | None = None):
        super().__init__(line)
        self.line = line
        self.log = log


_print_lock = threading.Lock()


def say(msg: str) -> None:
    """Progress output; never fails (a closed stdout must not abort a half-started stack)."""
    with _print_lock:
        try:
            print(msg, flush=True)
        except (BrokenPipeError, OSError):
            pass


# Every process spawned by this run of `up`, appended the moment it exists, so that a failure
# anywhere (in any thread, of any kind) stops all of them.
_SPAWNED: list[dict] = []


# --------------------------------------------------------------------------- processes


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks) of a live process, else None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # after the comm field: [0]=state [2]=pgrp [19]=starttime
    return fields[0], int(fields[2]), int(fields[19])


def is_alive(pid: int, start_time: int | None = None) -> bool:
    """True if `pid` runs and (when given) is the very process that started at `start_time`."""
    st = proc_stat(pid)
    if st is None:
        if not Path("/proc").is_dir():  # not Linux: fall back to a plain signal probe
            try:
                os.kill(pid, 0)
                return True
            except OSError:
                return False
        return False
    state, _pgrp, started = st
    if state in ("Z", "X"):
        return False
    return start_time is None or started == start_time


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = proc_stat(int(entry.name))
            if st and st[1] == pgid and st[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def spawn(argv: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None,
          run_as: tuple[int, int] | None = None) -> dict:
    """Start a long-running process in its own session (so its whole group can be stopped),
    output appended to `log`. Returns the record kept in state.json."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        kwargs: dict = {}
        if run_as is not None:
            kwargs.update(user=run_as[0], group=run_as[1], extra_groups=[])
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=cwd, env=env, start_new_session=True, **kwargs)
    st = proc_stat(proc.pid)
    rec = {"pid": proc.pid, "start_time": st[2] if st else None, "pgid": proc.pid,
           "argv": argv, "log": str(log), "_popen": proc, "stop_signal": int(signal.SIGTERM)}
    _SPAWNED.append(rec)
    return rec


def stop_process(rec: dict, sig: int, timeout: float = STOP_TIMEOUT) -> str:
    """Stop one recorded process: `sig`, wait up to `timeout`, then SIGKILL its process group.
    Only touches the recorded PID (checked against its recorded start time) and its own group."""
    pid, start = rec["pid"], rec.get("start_time")
    pgid = rec.get("pgid", pid)
    if not is_alive(pid, start):
        leftovers = group_members(pgid) if Path("/proc").is_dir() else []
        if leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            return "was not running (killed leftover group members)"
        return "was not running"
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    how = f"stopped ({signal.Signals(sig).name})"
    while time.monotonic() < deadline and is_alive(pid, start):
        _reap(rec)
        time.sleep(0.1)
    if is_alive(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        how = f"killed (SIGKILL after {timeout:.0f} s)"
    # the leader is gone: nothing of its group may stay behind
    deadline = time.monotonic() + 10
    while Path("/proc").is_dir() and group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if Path("/proc").is_dir() and group_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    _reap(rec)
    return how


def _reap(rec: dict) -> None:
    p = rec.get("_popen")
    if p is not None:
        with contextlib.suppress(Exception):
            p.poll()


def exited(rec: dict) -> int | None:
    """Exit code if a process started by this very `up` has exited, else None."""
    p = rec.get("_popen")
    return p.poll() if p is not None else None


# --------------------------------------------------------------------------- ports and probes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the servers do: a port whose last connections linger in TIME_WAIT is still usable
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None or not Path(path).exists():
        return ""
    data = Path(path).read_bytes()[-65536:].decode("utf-8", "replace").splitlines()
    return "\n".join(data[-lines:])


def kafka_probe(bootstrap: str, group: str = "runstate-readiness") -> str | None:
    """None when the broker answers a metadata request and can coordinate a consumer group,
    else a short reason. Needs aiokafka (run with the project's virtualenv)."""
    import logging

    try:
        from aiokafka.client import AIOKafkaClient, CoordinationType
    except ImportError:
        raise StackError("aiokafka is not importable: run deploy/stack.py with the project's "
                         "virtualenv Python (make up)") from None
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    async def probe() -> str | None:
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=5000,
                                client_id="runstate-stack-readiness")
        try:
            await asyncio.wait_for(client.bootstrap(), 10)
            if not client.cluster.brokers():
                return "metadata lists no broker"
            await asyncio.wait_for(client.coordinator_lookup(CoordinationType.GROUP, group), 10)
            return None
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            return f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(Exception):
                await client.close()

    return asyncio.run(probe())


# --------------------------------------------------------------------------- tools


def apt_install(packages: list[str], why: str) -> bool:
    """Install Debian packages when we are root and apt-get exists. Returns success."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    STATE_DIR.mkdir(exist_ok=True)
    log = STATE_DIR / "apt.log"
    say(f"{why}: installing {' '.join(packages)} with apt-get (log: {log.relative_to(REPO)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with open(log, "ab") as out:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *packages]):
            if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL).returncode:
                return False
    return True


def need_java() -> str:
    java = shutil.which("java")
    if java is None and apt_install(["openjdk-17-jre-headless"], "java not found"):
        java = shutil.which("java")
    if java is None:
        raise StackError("java not found (Kafka needs a Java 17+ runtime on PATH)")
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    try:
        version = out.split('"')[1]
        major = int(version.split(".")[0]) if not version.startswith("1.") else int(version.split(".")[1])
    except (IndexError, ValueError):
        major = 0
    if major and major < 17:
        raise StackError(f"java {version} found, but Kafka {KAFKA_VERSION} needs Java 17+")
    return java


def need_maven() -> str:
    mvn = shutil.which("mvn")
    if mvn is None and apt_install(["maven"], "mvn not found"):
        mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(f"mvn not found (Maven is needed once, to fetch {KAFKA_ARTIFACT})")
    return mvn


def pg_bindir() -> Path | None:
    if os.environ.get("RUNSTATE_PG_BINDIR"):
        return Path(os.environ["RUNSTATE_PG_BINDIR"])
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        majors = sorted((d for d in root.iterdir() if (d / "bin" / "postgres").exists()),
                        key=lambda d: (d.name != PG_PREFERRED_MAJOR, -int(d.name) if d.name.isdigit() else 0))
        if majors:
            return majors[0] / "bin"
    found = shutil.which("postgres")
    return Path(found).parent if found and shutil.which("initdb") else None


def need_pg_bindir() -> Path:
    bindir = pg_bindir()
    if bindir is None:
        # Debian's postgresql package would create and start a system "main" cluster; we only
        # want the binaries.
        conf = Path("/etc/postgresql-common/createcluster.conf")
        if os.geteuid() == 0 and not conf.exists():
            conf.parent.mkdir(parents=True, exist_ok=True)
            conf.write_text("create_main_cluster = false\n")
        if apt_install(["postgresql"], "PostgreSQL server binaries not found"):
            bindir = pg_bindir()
    if bindir is None:
        raise StackError("PostgreSQL server binaries not found (initdb/postgres): apt-get install -y postgresql")
    return bindir


# --------------------------------------------------------------------------- state files


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def save_state(state: dict) -> None:
    clean = {"components": [{k: v for k, v in c.items() if not k.startswith("_")}
                            for c in state["components"]],
             "env": state["env"]}
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(clean, indent=2))
    tmp.replace(STATE_FILE)
    PIDS_FILE.write_text("".join(f"{c['name']} {c['pid']}\n" for c in state["components"] if c.get("pid")))
    lines = ["# Written by deploy/stack.py up. Load with: set -a; . .runstate/env; set +a"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in state["env"].items()]
    ENV_FILE.write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def locked():
    STATE_DIR.mkdir(exist_ok=True)
    with open(LOCK_FILE, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def component_up(c: dict) -> bool:
    if c.get("external"):
        return c.get("probe_host") is None or tcp_open(c["probe_host"], c["probe_port"])
    return is_alive(c["pid"], c.get("start_time")) and (c.get("port") is None or tcp_open(HOST, c["port"]))


# --------------------------------------------------------------------------- services


@dataclasses.dataclass
class Context:
    """What a service sees when `up` starts it."""

    env: dict[str, str]  # connection variables so far (infrastructure + earlier services' exports)
    ports: dict[str, int]  # ports chosen for this run, by name

    def port(self, name: str) -> int:
        """A free port for `name`, the previous run's one when it is still free."""
        if name not in self.ports:
            last = load_json(LAST_FILE).get("ports", {}).get(name)
            self.ports[name] = last if last and port_is_free(last) else free_port()
        return self.ports[name]

    def dir(self, name: str) -> Path:
        d = STATE_DIR / name
        d.mkdir(parents=True, exist_ok=True)
        return d


@dataclasses.dataclass
class Service:
    """A long-running runstate process that `up` starts after Kafka and PostgreSQL are ready,
    in list order, and `down` stops in reverse order.

    exports(ctx) -> extra variables for .runstate/env (e.g. RUNSTATE_HTTP_URL); computed before
    the start so that argv can use them. prepare(ctx) -> one-shot commands run to completion
    before the start (e.g. the migrations). argv(ctx) -> the command (run with the environment of
    `up` plus ctx.env). ready(ctx) -> True once the service serves; polled for `timeout` s.
    `port`, if given, names a ctx port that status checks."""

    name: str
    argv: Callable[[Context], list[str]]
    ready: Callable[[Context], bool]
    exports: Callable[[Context], dict[str, str]] = lambda ctx: {}
    prepare: Callable[[Context], list[list[str]]] = lambda ctx: []
    timeout: float = 30.0
    stop_signal: int = signal.SIGTERM
    port: str | None = None


def runstate_cli(*args: str) -> list[str]:
    """The project's CLI, run by this interpreter (the virtualenv's, under make)."""
    return [sys.executable, "-m", "runstate.cli", *args]


def kafka_group_stable(bootstrap: str, group: str) -> bool:
    """True when consumer group `group` is Stable with at least one member."""
    import logging

    from aiokafka.admin import AIOKafkaAdminClient

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await admin.start()
            for response in await asyncio.wait_for(admin.describe_consumer_groups([group]), 10):
                for g in response.groups:  # (error_code, group_id, state, protocol_type, protocol, members, ...)
                    if g[1] == group and g[0] == 0 and g[2] == "Stable" and len(g[5]) > 0:
                        return True
            return False
        except Exception:  # noqa: BLE001 - not ready yet
            return False
        finally:
            with contextlib.suppress(Exception):
                await admin.close()

    return asyncio.run(probe())


# The long-running runstate processes, in start order.
SERVICES: list[Service] = [
    # The consumer service (`runstate serve`): applies the migrations first, then joins the
    # consumer group on the command topic; ready once the group is Stable with a member.
    Service(
        name="consumer",
        prepare=lambda ctx: [runstate_cli("db", "upgrade")],
        argv=lambda ctx: runstate_cli("serve"),
        ready=lambda ctx: kafka_group_stable(ctx.env["KAFKA_BOOTSTRAP_SERVERS"],
                                             os.environ.get("RUNSTATE_CONSUMER_GROUP") or "runstate"),
        timeout=60.0,
    ),
    # The Prefect-compatible HTTP gateway; PREFECT_API_URL can point at RUNSTATE_HTTP_URL.
    Service(
        name="gateway",
        argv=lambda ctx: runstate_cli("gateway", "--host", HOST, "--port", str(ctx.port("gateway")),
                                      "--log-level", "WARNING"),
        ready=lambda ctx: tcp_open(HOST, ctx.port("gateway")),
        port="gateway",
        exports=lambda ctx: {"RUNSTATE_HTTP_URL": f"http://{HOST}:{ctx.port('gateway')}/api"},
        timeout=60.0,
    ),
]


def start_service(svc: Service, ctx: Context) -> dict:
    t0 = time.monotonic()
    ctx.env.update(svc.exports(ctx))
    log = ctx.dir(svc.name) / f"{svc.name}.log"
    env = {**os.environ, **ctx.env}
    for argv in svc.prepare(ctx):
        with open(log, "ab") as out:
            out.write(f"$ {shlex.join(argv)}\n".encode())
            out.flush()
            rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                                env=env).returncode
        if rc != 0:
            raise StackError(f"{svc.name}: `{shlex.join(argv[1:] if argv[0] == sys.executable else argv)}` "
                             f"failed (exit code {rc})", log)
    rec = spawn(svc.argv(ctx), log, cwd=REPO, env={**os.environ, **ctx.env})
    rec.update(name=svc.name, stop_signal=int(svc.stop_signal),
               port=ctx.ports.get(svc.port) if svc.port else None)
    deadline = time.monotonic() + svc.timeout
    while not svc.ready(ctx):
        code = exited(rec)
        if code is not None:
            raise StackError(f"{svc.name} exited during startup (exit code {code})", log)
        if time.monotonic() > deadline:
            raise StackError(f"{svc.name} did not become ready within {svc.timeout:.0f} s", log)
        time.sleep(0.5)
    say(f"{svc.name}: ready in {time.monotonic() - t0:.1f} s (pid {rec['pid']})")
    return rec


# --------------------------------------------------------------------------- Kafka


def fetch_kafka_jars() -> str:
    """Make sure .cache/kafka/<v>/libs holds the broker class path. Returns 'cached' or the time."""
    marker = KAFKA_HOME / "libs.complete"
    fingerprint = KAFKA_POM.read_text() + KAFKA_VERSION
    if marker.exists() and marker.read_text() == fingerprint and KAFKA_LIBS.is_dir():
        return "jars cached"
    mvn = need_maven()
    t0 = time.monotonic()
    KAFKA_HOME.mkdir(parents=True, exist_ok=True)
    staging = KAFKA_HOME / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    log = KAFKA_HOME / "maven.log"
    cmd = [mvn, "-B", "-f", str(KAFKA_POM), f"-Dmaven.repo.local={MAVEN_REPO}", f"-Dkafka.version={KAFKA_VERSION}",
           "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={staging}"]
    with open(log, "wb") as out:
        rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=KAFKA_HOME).returncode
    if rc != 0 or not any(staging.glob(f"kafka_2.13-{KAFKA_VERSION}.jar")):
        raise StackError(f"Maven could not fetch {KAFKA_ARTIFACT}", log)
    shutil.rmtree(KAFKA_LIBS, ignore_errors=True)
    staging.replace(KAFKA_LIBS)
    marker.write_text(fingerprint)
    return f"jars fetched in {time.monotonic() - t0:.1f} s"


def kafka_cluster_id() -> str:
    # Kafka's format: 22 base64url characters. One in 32 starts with "-", which the
    # storage tool's parser takes for an option unless the id is attached with "=".
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def kafka_up(ports: dict[str, int]) -> dict:
    t0 = time.monotonic()
    java = need_java()
    jars = fetch_kafka_jars()
    kdir = STATE_DIR / "kafka"
    data, logs = kdir / "data", kdir / "logs"
    for d in (data, logs):
        d.mkdir(parents=True, exist_ok=True)
    port, cport = ports["kafka"], ports["kafka_controller"]
    props = kdir / "server.properties"
    props.write_text("\n".join([
        "# Written by deploy/stack.py (single-node KRaft broker+controller on loopback)",
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@{HOST}:{cport}",
        f"listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{cport}",
        f"advertised.listeners=PLAINTEXT://{HOST}:{port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        f"log.dirs={data}",
        "num.partitions=1",
        "offsets.topic.replication.factor=1",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        "group.initial.rebalance.delay.ms=0",
        # Kafka 4's group coordinator holds every offset commit up to 5 ms to
        # batch its log writes; runstate commits once per batch and waits for
        # it before fetching on, so the linger was a third of a command's
        # round trip at low load.
        "group.coordinator.append.linger.ms=0",
        "",
    ]))
    classpath = f"{KAFKA_LIBS}/*"
    formatted = "data reused"
    if not (data / "meta.properties").exists():
        t_fmt = time.monotonic()
        log = kdir / "format.log"
        with open(log, "wb") as out:
            rc = subprocess.run([java, "-cp", classpath, f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
                                 f"-Dkafka.logs.dir={logs}", "kafka.tools.StorageTool", "format",
                                 f"--cluster-id={kafka_cluster_id()}", "-c", str(props)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        if rc != 0:
            raise StackError(f"Kafka storage format failed (exit code {rc})", log)
        formatted = f"formatted in {time.monotonic() - t_fmt:.1f} s"
    server_log = logs / "server.log"
    t_start = time.monotonic()
    rec = spawn([java, KAFKA_HEAP, "-XX:+UseG1GC", "-Djava.awt.headless=true",
                 f"-Dlog4j2.configurationFile={KAFKA_LOG4J}", f"-Dkafka.logs.dir={logs}",
                 "-cp", classpath, "kafka.Kafka", str(props)], kdir / "stdout.log", cwd=kdir)
    rec.update(name="kafka", port=port, stop_signal=int(signal.SIGTERM), log=str(server_log))
    bootstrap = f"{HOST}:{port}"
    deadline = t_start + KAFKA_READY_TIMEOUT
    reason = "port closed"
    while True:
        code = exited(rec)
        if code is not None:
            raise StackError(f"Kafka exited during startup (exit code {code})", _kafka_log(kdir))
        if tcp_open(HOST, port):
            reason = kafka_probe(bootstrap)
            if reason is None:
                break
        if time.monotonic() > deadline:
            raise StackError(f"Kafka did not become ready on port {port} within "
                             f"{KAFKA_READY_TIMEOUT:.0f} s ({reason})", _kafka_log(kdir))
        time.sleep(0.3)
    now = time.monotonic()
    say(f"kafka: ready on {bootstrap} in {now - t0:.1f} s ({jars}, {formatted}, "
        f"broker start {now - t_start:.1f} s; pid {rec['pid']})")
    rec["_env"] = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap}
    return rec


def _kafka_log(kdir: Path) -> Path:
    server_log = kdir / "logs" / "server.log"
    stdout_log = kdir / "stdout.log"
    if server_log.exists() and server_log.stat().st_size > 0:
        return server_log
    return stdout_log


# --------------------------------------------------------------------------- PostgreSQL


def postgres_up(ports: dict[str, int]) -> dict:
    t0 = time.monotonic()
    bindir = need_pg_bindir()
    pgdir = STATE_DIR / "postgres"
    data, sock = pgdir / "data", pgdir / "sock"
    log = pgdir / "postgres.log"
    pgdir.mkdir(parents=True, exist_ok=True)
    sock.mkdir(exist_ok=True)
    run_as = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use the postgres system user
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise StackError("running as root and there is no 'postgres' system user to run PostgreSQL as") from None
        run_as = (pw.pw_uid, pw.pw_gid)
        for p in (pgdir, sock):  # data/ is created and owned by postgres itself (initdb)
            os.chown(p, *run_as)
        probe = subprocess.run(["test", "-w", str(pgdir)], user=run_as[0], group=run_as[1], extra_groups=[])
        if probe.returncode != 0:
            raise StackError(f"user postgres cannot write {pgdir} (a parent folder is not searchable for it)")
    port = ports["postgres"]

    def run(argv: list[str], logname: str, what: str) -> None:
        out_log = pgdir / logname
        with open(out_log, "wb") as out:
            kwargs = dict(user=run_as[0], group=run_as[1], extra_groups=[]) if run_as else {}
            rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=pgdir, **kwargs).returncode
        if rc != 0:
            raise StackError(f"{what} failed (exit code {rc})", out_log)

    initdb = "cluster reused"
    if not (data / "PG_VERSION").exists():
        t_init = time.monotonic()
        shutil.rmtree(data, ignore_errors=True)
        run([str(bindir / "initdb"), "-D", str(data), "-U", OWNER_ROLE, "--auth=trust",
             "-E", "UTF8", "--locale=C"], "initdb.log", "initdb")
        (data / "pg_hba.conf").write_text(
            "# Written by deploy/stack.py: trust, loopback and the cluster's own socket only\n"
            "local all all trust\n"
            f"host  all all {HOST}/32 trust\n")
        if run_as:
            os.chown(data / "pg_hba.conf", *run_as)
        initdb = f"initdb {time.monotonic() - t_init:.1f} s"
    t_start = time.monotonic()
    rec = spawn([str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(sock),
                 "-c", f"listen_addresses={HOST}", "-c", "shared_buffers=256MB", "-c", "max_connections=200",
                 "-c", "synchronous_commit=on", "-c", "logging_collector=off"],
                log, cwd=pgdir, run_as=run_as)
    rec.update(name="postgres", port=port, stop_signal=int(signal.SIGINT))  # SIGINT = fast shutdown
    isready = bindir / "pg_isready"
    deadline = t_start + PG_READY_TIMEOUT
    while True:
        code = exited(rec)
        if code is not None:
            raise StackError(f"PostgreSQL exited during startup (exit code {code})", log)
        if subprocess.run([str(isready), "-q", "-h", HOST, "-p", str(port), "-U", OWNER_ROLE, "-d", "postgres",
                           "-t", "1"], stdin=subprocess.DEVNULL).returncode == 0:
            break
        if time.monotonic() > deadline:
            raise StackError(f"PostgreSQL did not accept connections on port {port} within "
                             f"{PG_READY_TIMEOUT:.0f} s", log)
        time.sleep(0.1)
    started = time.monotonic() - t_start
    provision(bindir, port, pgdir)
    now = time.monotonic()
    say(f"postgres: ready on {HOST}:{port} in {now - t0:.1f} s ({initdb}, server start {started:.1f} s; "
        f"pid {rec['pid']})")
    rec["_env"] = {
        "DATABASE_URL": f"postgresql+psycopg://{APP_ROLE}@{HOST}:{port}/{DB_NAME}",
        "RUNSTATE_ADMIN_DATABASE_URL": f"postgresql+psycopg://{OWNER_ROLE}@{HOST}:{port}/{DB_NAME}",
    }
    return rec


def provision(bindir: Path, port: int, pgdir: Path) -> None:
    """Database `runstate` owned by runstate_owner; LOGIN role runstate_app without privileges
    (the migrations grant what it needs). Idempotent."""
    psql = bindir / "psql"
    if not psql.exists():
        psql = Path(shutil.which("psql") or "psql")
    log = pgdir / "provision.log"

    def sql(query: str) -> str:
        res = subprocess.run([str(psql), "-X", "-q", "-h", HOST, "-p", str(port), "-U", OWNER_ROLE, "-d", "postgres",
                              "-v", "ON_ERROR_STOP=1", "-tAc", query], capture_output=True, text=True,
                             stdin=subprocess.DEVNULL)
        with open(log, "a") as out:
            out.write(f"> {query}\n{res.stdout}{res.stderr}")
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["psql failed"])[-1]
            raise StackError(f"could not provision PostgreSQL: {last}", log)
        return res.stdout.strip()

    if sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}'") != "1":
        sql(f"CREATE ROLE {APP_ROLE} LOGIN")
    if sql(f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'") != "1":
        sql(f"CREATE DATABASE {DB_NAME} OWNER {OWNER_ROLE}")


# --------------------------------------------------------------------------- commands


def external_settings(last: dict) -> dict[str, str]:
    """Connection variables from the environment that point at servers we should use instead of
    starting our own. A value equal to what a previous local stack wrote to .runstate/env (a
    stale `. .runstate/env` in the caller's shell) does not count."""
    local_before = last.get("local_env", {})
    ext = {}
    for key in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"):
        val = os.environ.get(key)
        if val and val != local_before.get(key):
            ext[key] = val
    if "DATABASE_URL" in ext:
        ext["RUNSTATE_ADMIN_DATABASE_URL"] = os.environ.get("RUNSTATE_ADMIN_DATABASE_URL") or ext["DATABASE_URL"]
    return ext


def _external_component(name: str, url: str) -> dict:
    if name == "kafka":
        host, _, port = url.split(",")[0].strip().rpartition(":")
    else:
        parsed = urllib.parse.urlsplit(url)
        host, port = parsed.hostname or HOST, parsed.port or 5432
    return {"name": name, "external": url, "probe_host": host.strip("[]") or HOST, "probe_port": int(port)}


def wait_external(comp: dict) -> None:
    name, url = comp["name"], comp["external"]
    timeout = KAFKA_READY_TIMEOUT if name == "kafka" else PG_READY_TIMEOUT
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    reason = "port closed"
    while True:
        if tcp_open(comp["probe_host"], comp["probe_port"]):
            reason = kafka_probe(url) if name == "kafka" else None
            if reason is None:
                break
        if time.monotonic() > deadline:
            what = "Kafka did not become ready" if name == "kafka" else "PostgreSQL did not accept connections"
            raise StackError(f"{what} at {comp['probe_host']}:{comp['probe_port']} (from the environment) "
                             f"within {timeout:.0f} s ({reason})")
        time.sleep(0.5)
    say(f"{name}: using the existing server from the environment ({comp['probe_host']}:{comp['probe_port']}, "
        f"reachable after {time.monotonic() - t0:.1f} s)")


def cmd_up(args) -> int:
    # --servers-only: Kafka and PostgreSQL without the runstate services, for
    # benchmarks and fault tests that start consumers with settings of their own.
    services = [] if getattr(args, "servers_only", False) else SERVICES
    with locked():
        state = load_json(STATE_FILE)
        comps = state.get("components", [])
        if comps:
            names = {c["name"] for c in comps}
            if all(component_up(c) for c in comps) and all(s.name in names for s in services):
                say("already up (" + ", ".join(_describe(c) for c in comps) + f"); connection details in "
                    f"{ENV_FILE.relative_to(REPO)}")
                return 0
            say("the previous stack is partly down: stopping what is left of it first")
            _stop_all(comps)
        return _up(services)


def _up(services: list[Service]) -> int:
    t_all = time.monotonic()
    last = load_json(LAST_FILE)
    ext = external_settings(last)
    ports: dict[str, int] = {}
    ctx = Context(env={}, ports=ports)
    for name in ("kafka", "kafka_controller", "postgres"):
        ctx.port(name)
    started: list[dict] = []
    results: dict[str, dict] = {}
    errors: list[StackError] = []

    def worker(name: str, fn: Callable[[dict], dict]) -> None:
        try:
            results[name] = fn(ports)
        except StackError as err:
            errors.append(err)
        except Exception as exc:  # noqa: BLE001
            errors.append(StackError(f"{name}: unexpected error: {type(exc).__name__}: {exc}"))

    plan: list[tuple[str, Callable[[dict], dict]]] = []
    externals: list[dict] = []
    if "KAFKA_BOOTSTRAP_SERVERS" in ext:
        externals.append(_external_component("kafka", ext["KAFKA_BOOTSTRAP_SERVERS"]))
    else:
        plan.append(("kafka", kafka_up))
    if "DATABASE_URL" in ext:
        externals.append(_external_component("postgres", ext["DATABASE_URL"]))
    else:
        plan.append(("postgres", postgres_up))

    state = {"components": [], "env": {}}
    try:
        for comp in externals:
            wait_external(comp)
        threads = [threading.Thread(target=worker, args=p, name=p[0]) for p in plan]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        started = [results[name] for name, _ in plan if name in results]
        if errors:
            raise errors[0]
        env = dict(ext)
        for rec in started:
            env.update(rec.pop("_env", {}))
        ctx.env.update(env)
        state["components"] = externals + started
        for svc in services:
            state["components"].append(start_service(svc, ctx))
        state["env"] = {**ctx.env}
        save_state(state)
        local_env = {k: v for k, v in ctx.env.items() if k not in ext}
        LAST_FILE.write_text(json.dumps({"ports": ports, "local_env": local_env}, indent=2))
    except BaseException as err:
        for rec in reversed(_SPAWNED):
            stop_process(rec, rec.get("stop_signal", signal.SIGTERM), timeout=15)
        for f in (STATE_FILE, PIDS_FILE, ENV_FILE):
            f.unlink(missing_ok=True)
        if isinstance(err, StackError):
            print(f"error: {err.line}", file=sys.stderr, flush=True)
            if err.log is not None:
                text = tail(err.log)
                if text:
                    print(f"--- last lines of {err.log} ---\n{text}\n---", file=sys.stderr, flush=True)
            return 1
        raise
    say(f"up in {time.monotonic() - t_all:.1f} s; connection details in {ENV_FILE.relative_to(REPO)}:")
    for k, v in state["env"].items():
        say(f"  {k}={v}")
    return 0


def _describe(c: dict) -> str:
    if c.get("external"):
        return f"{c['name']} external {c['probe_host']}:{c['probe_port']}"
    return f"{c['name']} pid {c['pid']}" + (f" port {c['port']}" if c.get("port") else "")


def _stop_all(comps: list[dict]) -> None:
    # services (registered after the infrastructure) first, in reverse start order
    for c in reversed(comps):
        if c.get("external"):
            say(f"{c['name']}: external ({c['probe_host']}:{c['probe_port']}), left alone")
            continue
        how = stop_process(c, c.get("stop_signal", signal.SIGTERM))
        say(f"{c['name']}: pid {c['pid']} {how}")


def cmd_down(_args) -> int:
    with locked():
        state = load_json(STATE_FILE)
        comps = state.get("components", [])
        if not comps:
            say("nothing to stop (no stack recorded in .runstate/state.json)")
        else:
            _stop_all(comps)
        for f in (STATE_FILE, PIDS_FILE, ENV_FILE):
            f.unlink(missing_ok=True)
    return 0


def cmd_status(_args) -> int:
    state = load_json(STATE_FILE)
    comps = state.get("components", [])
    if not comps:
        say("down (no stack recorded)")
        return 3
    all_up = True
    for c in comps:
        up = component_up(c)
        all_up &= up
        if c.get("external"):
            where = f"external {c['probe_host']}:{c['probe_port']}"
        else:
            where = f"pid {c['pid']}" + (f"  {HOST}:{c['port']}" if c.get("port") else "")
        say(f"{c['name']:<10} {'up' if up else 'DOWN':<5} {where}")
    return 0 if all_up else 3


def cmd_env(_args) -> int:
    if not ENV_FILE.exists():
        print("the stack is not up (.runstate/env missing): run 'make up'", file=sys.stderr)
        return 1
    sys.stdout.write(ENV_FILE.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/stack.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in (("up", cmd_up, "start the stack (no-op when already up)"),
                           ("down", cmd_down, "stop exactly what `up` started"),
                           ("status", cmd_status, "show the stack; exit 0 when everything is up, 3 otherwise"),
                           ("env", cmd_env, "print .runstate/env")):
        command = sub.add_parser(name, help=text)
        command.set_defaults(fn=fn)
        if name == "up":
            command.add_argument("--servers-only", action="store_true",
                                 help="start Kafka and PostgreSQL only, not the runstate services")
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
