"""A Kafka (KRaft) node started with `java` from the Maven jars: broker and controller in one
process on loopback. The stack runs one; the quorum fields (node id, voters, cluster id) let a
cluster of several be described the same way."""

from __future__ import annotations

import base64
import dataclasses
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from .kafka_probes import kafka_probe
from .layout import CACHE_DIR, REPO
from .output import StackError, say
from .ports import HOST, tcp_open
from .processes import Launcher, exited
from .records import Record
from .security import PLAINTEXT_ENV, WORKER, KafkaSecurity, write_private
from .tools import KAFKA_ARTIFACT, KAFKA_VERSION, need_java, need_maven

KAFKA_POM = REPO / "deploy" / "kafka" / "pom.xml"
KAFKA_LOG4J = REPO / "deploy" / "kafka" / "log4j2.properties"
KAFKA_HOME = CACHE_DIR / "kafka" / KAFKA_VERSION
KAFKA_LIBS = KAFKA_HOME / "libs"
MAVEN_REPO = CACHE_DIR / "maven"
KAFKA_HEAP = "-Xmx512m"
# A secured first start (TLS, SCRAM, ACLs) on a busy 2-core machine can take over a minute.
KAFKA_READY_TIMEOUT = 120.0


def fetch_kafka_jars(apt_log: Path) -> str:
    """Make sure .cache/kafka/<v>/libs holds the broker class path. Returns 'cached' or the time."""
    marker = KAFKA_HOME / "libs.complete"
    fingerprint = KAFKA_POM.read_text() + KAFKA_VERSION
    if marker.exists() and marker.read_text() == fingerprint and KAFKA_LIBS.is_dir():
        return "jars cached"
    mvn = need_maven(apt_log)
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


@dataclasses.dataclass
class KafkaNode:
    home: Path  # server.properties, data/, logs/
    port: int  # the client listener
    controller_port: int
    node_id: int = 1
    voters: dict[int, int] | None = None  # node id -> controller port of each quorum member; None: this node alone
    cluster_id: str = dataclasses.field(default_factory=kafka_cluster_id)  # used when the storage is formatted
    name: str = "kafka"
    security: KafkaSecurity | None = None  # None: a PLAINTEXT node (RUNSTATE_STACK_SECURITY=plaintext)
    heap: str = KAFKA_HEAP
    extra: dict[str, str] = dataclasses.field(default_factory=dict)  # applied over properties() (cluster.py)
    cluster_bootstrap: str | None = None  # every node's client address, for the clients (cluster.py)

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        """What a worker gets (.runstate/env): the worker principal's login on a secured node."""
        replicas = str(min(len(self.voters or {self.node_id: 0}), 3))
        env = {"KAFKA_BOOTSTRAP_SERVERS": self.cluster_bootstrap or self.bootstrap,
               "RUNSTATE_TOPIC_REPLICATION_FACTOR": replicas,
               "RUNSTATE_TOPIC_MIN_INSYNC_REPLICAS": str(max(1, int(replicas) - 1))}
        if self.security is None:
            # Empty values (read as unset) replace a secured run's login in a shell that loads this file.
            return {**env, **PLAINTEXT_ENV}
        return {**env, **self.security.client_env(WORKER)}

    def properties(self) -> dict[str, str]:
        voters = self.voters or {self.node_id: self.controller_port}
        data = self.home / "data"
        return {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": ",".join(f"{i}@{HOST}:{p}" for i, p in sorted(voters.items())),
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Kafka 4's group coordinator holds every offset commit up to 5 ms to batch its log
            # writes; runstate commits once per batch and waits for it before fetching on.
            "group.coordinator.append.linger.ms": "0",
            # Topics are made by runstate (ensure_topics) with their settings, never by a typo.
            "auto.create.topics.enable": "false",
            **(self.security.broker_properties(HOST, self.port, self.controller_port) if self.security else {}),
            **self.extra,
        }

    def log_file(self) -> Path:
        """The log that explains a failed start: the server log once it has content."""
        server_log = self.home / "logs" / "server.log"
        if server_log.exists() and server_log.stat().st_size > 0:
            return server_log
        return self.home / "stdout.log"

    def start(self, launcher: Launcher, apt_log: Path) -> Record:
        """Format the storage when new, start the node and wait until a client can use it."""
        t0 = time.monotonic()
        java = need_java(apt_log)
        jars = fetch_kafka_jars(apt_log)
        data, logs = self.home / "data", self.home / "logs"
        for d in (data, logs):
            d.mkdir(parents=True, exist_ok=True)
        props = self.home / "server.properties"
        # Private: a secured node's file holds the inter-broker password.
        write_private(props, "\n".join(["# Written by deploy/stack (KRaft broker+controller on loopback)",
                                        *(f"{k}={v}" for k, v in self.properties().items()), ""]))
        classpath = f"{KAFKA_LIBS}/*"
        logging_flags = [f"-Dlog4j2.configurationFile={KAFKA_LOG4J}", f"-Dkafka.logs.dir={logs}"]
        formatted = "data reused"
        if not (data / "meta.properties").exists():
            t_fmt = time.monotonic()
            log = self.home / "format.log"
            with open(log, "wb") as out:
                rc = subprocess.run([java, "-cp", classpath, *logging_flags, "kafka.tools.StorageTool", "format",
                                     f"--cluster-id={self.cluster_id}", "-c", str(props),
                                     *(self.security.format_args() if self.security else [])],
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
            if rc != 0:
                raise StackError(f"Kafka storage format failed (exit code {rc})", log)
            formatted = f"formatted in {time.monotonic() - t_fmt:.1f} s"
        t_start = time.monotonic()
        rec = launcher.spawn(self.name, [java, self.heap, "-XX:+UseG1GC", "-Djava.awt.headless=true",
                                         *logging_flags, "-cp", classpath, "kafka.Kafka", str(props)],
                             self.home / "stdout.log", cwd=self.home, port=self.port)
        rec.log = str(logs / "server.log")
        deadline = t_start + KAFKA_READY_TIMEOUT
        reason = "port closed"
        while True:
            code = exited(rec)
            if code is not None:
                raise StackError(f"Kafka exited during startup (exit code {code})", self.log_file())
            if tcp_open(HOST, self.port):
                reason = kafka_probe(self.bootstrap, self.security.client_options() if self.security else None)
                if reason is None:
                    break
            if time.monotonic() > deadline:
                raise StackError(f"Kafka did not become ready on port {self.port} within "
                                 f"{KAFKA_READY_TIMEOUT:.0f} s ({reason})", self.log_file())
            time.sleep(0.3)
        now = time.monotonic()
        say(f"{self.name}: ready on {self.bootstrap} in {now - t0:.1f} s ({jars}, {formatted}, "
            f"broker start {now - t_start:.1f} s; pid {rec.pid})")
        return rec
