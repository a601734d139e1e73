"""The local Kafka secured as a real cluster is: TLS and SCRAM logins on the client listener,
mutual TLS on the controller listener, KRaft's StandardAuthorizer with ACLs.

    <root>/kafka-security/ca.crt, ca.key        a throwaway CA made with openssl on first `up`
    <root>/kafka-security/broker.pem            the brokers' PKCS#8 key + certificate (CN=localhost)
    <root>/kafka-security/secrets.json          the SCRAM passwords (mode 0600; never printed)
    <root>/kafka-security/admin.properties      AclCommand's login as the super user (0600)
    <root>/kafka-security/mode                  what the Kafka data was formatted for

Principals (SCRAM-SHA-512 users made when the storage is formatted): `admin` (super user: the
stack's own readiness checks and ACL set-up), `runstate-service` (the consumer and gateway the
stack starts; every topic and group, so tests and benchmarks can run it on throwaway topics),
`runstate-worker` (what .runstate/env carries: write commands, read results and state changes,
its own `runstate-worker*` consumer groups; refused on results, state changes and dead letters).

RUNSTATE_STACK_SECURITY=plaintext gives the old PLAINTEXT stack instead."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .layout import CACHE_DIR, relative
from .output import StackError, say
from .tools import KAFKA_VERSION, need_maven

MODE_VARIABLE = "RUNSTATE_STACK_SECURITY"
SECURED, PLAINTEXT = "sasl_ssl", "plaintext"
MECHANISM = "SCRAM-SHA-512"
ADMIN, SERVICE, WORKER = "admin", "runstate-service", "runstate-worker"
USERS = (ADMIN, SERVICE, WORKER)
# The broker's certificate: the principal its controller connections arrive as (mutual TLS).
BROKER_CN = "localhost"
BROKER_PRINCIPAL = f"User:CN={BROKER_CN}"
# Consumer groups the worker may use: state_changes(group_id="runstate-worker-...").
WORKER_GROUP_PREFIX = "runstate-worker"
TOOLS_ARTIFACT = f"org.apache.kafka:kafka-tools:{KAFKA_VERSION}"
TOOLS_JAR = CACHE_DIR / "kafka" / KAFKA_VERSION / "tools" / f"kafka-tools-{KAFKA_VERSION}.jar"
PLAINTEXT_ENV = {"RUNSTATE_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT", "RUNSTATE_KAFKA_USERNAME": "",
                 "RUNSTATE_KAFKA_PASSWORD": "", "RUNSTATE_KAFKA_SSL_CAFILE": ""}


def stack_mode(environ: Mapping[str, str] = os.environ) -> str:
    """sasl_ssl (the default) or plaintext, from RUNSTATE_STACK_SECURITY."""
    value = environ.get(MODE_VARIABLE, "").strip().lower() or SECURED
    if value not in (SECURED, PLAINTEXT):
        raise StackError(f"{MODE_VARIABLE}={value!r}: expected {SECURED!r} (the default) or {PLAINTEXT!r}")
    return value


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read, atomically, never briefly world-readable."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)



def topic_names(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """runstate's topic names (the defaults of runstate.config.WorkerSettings, or the environment's)."""
    defaults = {"RUNSTATE_COMMAND_TOPIC": "runstate.commands", "RUNSTATE_RESULT_TOPIC": "runstate.results",
                "RUNSTATE_STATE_CHANGE_TOPIC": "runstate.state-changes",
                "RUNSTATE_DEAD_LETTER_TOPIC": "runstate.dead-letter"}
    return {k: environ.get(k) or v for k, v in defaults.items()}


def environment_client_options(environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """aiokafka security options from the RUNSTATE_KAFKA_* variables, for probing a Kafka named
    by the environment the way runstate will connect to it; None when none is set."""
    if not any(k.startswith("RUNSTATE_KAFKA_") and v for k, v in environ.items()):
        return None
    from runstate.config import WorkerSettings
    from runstate.kafka_security import kafka_options

    options = dict(kafka_options(WorkerSettings.load(kafka_bootstrap_servers="unused")))
    options.pop("bootstrap_servers")
    return options


def _openssl(args: list[str], log: Path) -> None:
    with open(log, "ab") as out:
        rc = subprocess.run(["openssl", *args], stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL).returncode
    if rc != 0:
        raise StackError(f"openssl {args[0]} failed (exit code {rc}) making the local Kafka certificates", log)


def make_certificates(folder: Path, nodes: int = 1) -> None:
    """A throwaway CA and a broker certificate for localhost/127.0.0.1 (server and client auth:
    the brokers show it on the controller listener too), keys in PKCS#8 as Kafka's PEM store needs;
    with several nodes, one certificate each (broker.pem, broker-2.pem, ...), all signed by the CA."""
    if shutil.which("openssl") is None:
        raise StackError("openssl not found (the secured local Kafka makes its certificates with it; "
                         f"or run with {MODE_VARIABLE}=plaintext)")
    log = folder / "openssl.log"
    log.write_text("")
    ca_key, ca_crt = folder / "ca.key", folder / "ca.crt"
    _openssl(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(ca_key)], log)
    os.chmod(ca_key, 0o600)
    _openssl(["req", "-x509", "-new", "-key", str(ca_key), "-days", "3650", "-subj", "/CN=runstate local CA",
              "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
              "-out", str(ca_crt)], log)
    for node in range(1, nodes + 1):
        _node_certificate(folder, keystore_name(node), log)


def keystore_name(node: int) -> str:
    return "broker.pem" if node == 1 else f"broker-{node}.pem"


def _node_certificate(folder: Path, name: str, log: Path) -> None:
    """One broker's key and certificate (CN=localhost, so every node is the same principal)."""
    ca_key, ca_crt = folder / "ca.key", folder / "ca.crt"
    key, csr, crt = folder / "broker.key", folder / "broker.csr", folder / name.replace(".pem", ".crt")
    ext = folder / "broker.ext"
    ext.write_text(f"subjectAltName=DNS:{BROKER_CN},IP:127.0.0.1\n"
                   "basicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    _openssl(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key)], log)
    os.chmod(key, 0o600)
    _openssl(["req", "-new", "-key", str(key), "-subj", f"/CN={BROKER_CN}", "-out", str(csr)], log)
    _openssl(["x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
              "-set_serial", str(secrets.randbits(63)), "-days", "825", "-extfile", str(ext), "-out", str(crt)], log)
    write_private(folder / name, key.read_text() + crt.read_text() + ca_crt.read_text())
    for f in (csr, ext, key):
        f.unlink()


@dataclasses.dataclass
class KafkaSecurity:
    """The secured stack's files and passwords, and what brokers, tools and clients make of them."""

    folder: Path
    passwords: dict[str, str]

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def keystore(self) -> Path:
        return self.folder / "broker.pem"

    def keystore_of(self, node: int) -> Path:
        """Node `node`'s key and certificate (a cluster's nodes have one each)."""
        return self.folder / keystore_name(node)

    @property
    def acls_marker(self) -> Path:
        return self.folder / "acls.done"

    # ------------------------------------------------------------------ broker

    def broker_properties(self, host: str, port: int, controller_port: int) -> dict[str, str]:
        """What server.properties sets differently from a PLAINTEXT node (applied over it)."""
        jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required"
        return {
            "listeners": f"SASL_SSL://{host}:{port},CONTROLLER://{host}:{controller_port}",
            "advertised.listeners": f"SASL_SSL://{host}:{port}",
            "inter.broker.listener.name": "SASL_SSL",
            "listener.security.protocol.map": "SASL_SSL:SASL_SSL,CONTROLLER:SSL",
            "sasl.enabled.mechanisms": MECHANISM,
            "sasl.mechanism.inter.broker.protocol": MECHANISM,
            f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config":
                f'{jaas} username="{ADMIN}" password="{self.passwords[ADMIN]}";',
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self.keystore),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self.ca_file),
            # With an unauthenticated controller listener the node's own registrations arrive
            # as User:ANONYMOUS and are refused; mutual TLS makes them User:CN=localhost.
            "listener.name.controller.ssl.client.auth": "required",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": f"User:{ADMIN};{BROKER_PRINCIPAL}",
            "allow.everyone.if.no.acl.found": "false",
        }

    def format_args(self) -> list[str]:
        """StorageTool format arguments that create the SCRAM users."""
        args: list[str] = []
        for user in USERS:
            args += ["--add-scram", f"{MECHANISM}=[name={user},password={self.passwords[user]}]"]
        return args

    # ------------------------------------------------------------------ clients

    def client_env(self, user: str) -> dict[str, str]:
        """The RUNSTATE_KAFKA_* variables every runstate client reads, for `user`."""
        return {
            "RUNSTATE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "RUNSTATE_KAFKA_SASL_MECHANISM": MECHANISM,
            "RUNSTATE_KAFKA_USERNAME": user,
            "RUNSTATE_KAFKA_PASSWORD": self.passwords[user],
            "RUNSTATE_KAFKA_SSL_CAFILE": str(self.ca_file),
        }

    def client_options(self, user: str = ADMIN) -> dict[str, Any]:
        """aiokafka keyword arguments for `user` (the stack's readiness checks log in as admin)."""
        from aiokafka.helpers import create_ssl_context

        return {"security_protocol": "SASL_SSL", "ssl_context": create_ssl_context(cafile=str(self.ca_file)),
                "sasl_mechanism": MECHANISM, "sasl_plain_username": user,
                "sasl_plain_password": self.passwords[user]}

    # ------------------------------------------------------------------ ACLs

    def acl_commands(self, environ: Mapping[str, str] = os.environ) -> list[list[str]]:
        """AclCommand arguments (after --bootstrap-server/--command-config) for the two principals."""
        t = topic_names(environ)
        worker, service = f"User:{WORKER}", f"User:{SERVICE}"
        return [
            ["--add", "--allow-principal", worker, "--operation", "Write", "--operation", "Describe",
             "--topic", t["RUNSTATE_COMMAND_TOPIC"]],
            ["--add", "--allow-principal", worker, "--operation", "Read", "--operation", "Describe",
             "--topic", t["RUNSTATE_RESULT_TOPIC"], "--topic", t["RUNSTATE_STATE_CHANGE_TOPIC"]],
            ["--add", "--allow-principal", worker, "--operation", "Read", "--operation", "Describe",
             "--resource-pattern-type", "prefixed", "--group", WORKER_GROUP_PREFIX],
            ["--add", "--allow-principal", service, "--operation", "All", "--topic", "*", "--group", "*"],
        ]

    def ensure_acls(self, java: str, bootstrap: str, apt_log: Path) -> str:
        """Create the ACLs once per formatted cluster (AclCommand from the kafka-tools jar)."""
        if self.acls_marker.exists():
            return "ACLs in place"
        t0 = time.monotonic()
        from .kafka import KAFKA_LIBS, KAFKA_LOG4J

        tools = fetch_tools_jar(apt_log)
        config = self.folder / "admin.properties"
        write_private(config, "\n".join([
            "security.protocol=SASL_SSL", f"sasl.mechanism={MECHANISM}",
            "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{ADMIN}" password="{self.passwords[ADMIN]}";',
            "ssl.truststore.type=PEM", f"ssl.truststore.location={self.ca_file}", ""]))
        base = [java, "-Xmx96m", "-XX:TieredStopAtLevel=1", f"-Dlog4j2.configurationFile={KAFKA_LOG4J}",
                f"-Dkafka.logs.dir={self.folder / 'acl-logs'}", "-cp", f"{KAFKA_LIBS}/*:{tools}",
                "org.apache.kafka.tools.AclCommand", "--bootstrap-server", bootstrap, "--command-config", str(config)]
        log = self.folder / "acls.log"
        log.write_text("")
        failures: list[int] = []
        lock = threading.Lock()

        def run(args: list[str]) -> None:
            out = subprocess.run([*base, *args], capture_output=True, stdin=subprocess.DEVNULL)
            with lock, open(log, "ab") as fh:
                fh.write(out.stdout + out.stderr)
                if out.returncode != 0:
                    failures.append(out.returncode)

        # Side by side: each is a JVM start, which is most of the time.
        threads = [threading.Thread(target=run, args=(a,)) for a in self.acl_commands()]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if failures:
            raise StackError(f"creating the Kafka ACLs failed (AclCommand exit code {failures[0]})", log)
        self.acls_marker.write_text("")
        return f"ACLs created in {time.monotonic() - t0:.1f} s"


def fetch_tools_jar(apt_log: Path) -> Path:
    """kafka-tools (AclCommand), beside the broker jars in .cache: the broker's own jar set lacks it."""
    if TOOLS_JAR.exists():
        return TOOLS_JAR
    mvn = need_maven(apt_log)
    from .kafka import MAVEN_REPO

    staging = TOOLS_JAR.parent.with_name("tools.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    log = staging / "maven.log"
    with open(log, "wb") as out:
        rc = subprocess.run([mvn, "-B", f"-Dmaven.repo.local={MAVEN_REPO}", "dependency:copy",
                             f"-Dartifact={TOOLS_ARTIFACT}", "-Dtransitive=false", f"-DoutputDirectory={staging}"],
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=staging).returncode
    if rc != 0 or not (staging / TOOLS_JAR.name).exists():
        raise StackError(f"Maven could not fetch {TOOLS_ARTIFACT}", log)
    shutil.rmtree(TOOLS_JAR.parent, ignore_errors=True)
    staging.replace(TOOLS_JAR.parent)
    return TOOLS_JAR


def prepare(root: Path, homes: list[Path], mode: str, folder_name: str = "kafka-security") -> KafkaSecurity | None:
    """The security of the Kafka nodes under `homes` for this `up`: None for plaintext. Data
    formatted for the other mode (or whose passwords are lost) is discarded: SCRAM users are
    made only when the storage is formatted. The replicated stack keeps its own `folder_name`,
    so the single node's passwords stay valid for its data."""
    folder = root / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    # Clients read ca.crt; the keys and passwords are the files only their owner may read.
    os.chmod(folder, 0o755)
    marker, secrets_file = folder / "mode", folder / "secrets.json"
    formatted = [h for h in homes if (h / "data" / "meta.properties").exists()]
    before = marker.read_text().strip() if marker.exists() else PLAINTEXT
    keystores = all((folder / keystore_name(n)).exists() for n in range(1, len(homes) + 1))
    if formatted and (before != mode or (mode == SECURED and not (secrets_file.exists() and keystores))):
        say(f"kafka: the local data was formatted for {before}; formatting it again for {mode} "
            f"(the local topics are discarded)")
        for h in homes:
            shutil.rmtree(h / "data", ignore_errors=True)
        formatted = []
    marker.write_text(mode + "\n")
    if mode == PLAINTEXT:
        return None
    if formatted:
        passwords = json.loads(secrets_file.read_text())
        return KafkaSecurity(folder, passwords)
    for f in ("acls.done", "admin.properties"):
        (folder / f).unlink(missing_ok=True)
    make_certificates(folder, len(homes))
    passwords = {user: secrets.token_urlsafe(24) for user in USERS}
    write_private(secrets_file, json.dumps(passwords))
    say(f"kafka: made a throwaway CA, broker certificate and SCRAM users in {relative(folder)}")
    return KafkaSecurity(folder, passwords)
