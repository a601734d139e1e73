"""deploy/compose.yaml, read as Docker Compose would read it (no Docker engine here to run it):
three KRaft nodes in one quorum keeping their data in their volumes, a PostgreSQL primary with a
synchronous standby, and runstate's services given settings that runstate really reads, with
the role, addresses, ports, probes and stop grace period that its own code implies."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import typer.main
import yaml
from psycopg.conninfo import conninfo_to_dict

from runstate.cli import app as cli_app
from runstate.config import Settings
from runstate.database_urls import libpq_dsn, parse
from runstate.gateway import create_app
from runstate.gateway.auth import OPEN_PATHS
from runstate.pipeline.app import STOP_STEP_SECONDS, build_app

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
RUNSTATE_IMAGE_USERS = ("migrate", "consumer", "gateway")
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, $NAME, and $$ (a literal $).
VARIABLE = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<braced>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>\w+))")
DURATION = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)")
UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def interpolate(text: str) -> str:
    """Compose's interpolation with an empty environment: every variable must have a default."""
    def value(match: re.Match[str]) -> str:
        if match["dollar"]:
            return "$"
        assert match["braced"] and match["op"] in (":-", "-"), f"{match[0]} has no default value"
        return match["arg"]

    return VARIABLE.sub(value, text)


def resolved(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: resolved(value) for key, value in node.items()}
    if isinstance(node, list):
        return [resolved(value) for value in node]
    return interpolate(node) if isinstance(node, str) else node


RAW: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
SPEC: dict[str, Any] = resolved(RAW)
SERVICES: dict[str, dict[str, Any]] = SPEC["services"]


def env(service: str) -> dict[str, str]:
    """The service's environment as its process sees it (compose passes every value as text)."""
    values = SERVICES[service].get("environment", {})
    assert isinstance(values, dict), f"{service}: environment as a mapping"
    return {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in values.items()}


def seconds(duration: str) -> float:
    parts = DURATION.findall(duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a compose duration: {duration!r}"
    return sum(float(n) * UNIT_S[u] for n, u in parts)


def kafka_nodes() -> dict[str, dict[str, str]]:
    return {name: env(name) for name, s in SERVICES.items() if str(s.get("image", "")).startswith("apache/kafka")}


def postgres_servers() -> tuple[str, str]:
    """(primary, standby): the primary is the one the image initialises from initdb.d."""
    servers = [name for name, s in SERVICES.items() if str(s.get("image", "")).startswith("postgres:")]
    assert len(servers) == 2, servers
    primary = [n for n in servers if any("/docker-entrypoint-initdb.d/" in v for v in SERVICES[n]["volumes"])]
    assert len(primary) == 1, primary
    return primary[0], next(n for n in servers if n != primary[0])


def mounted_file(service: str, target_pattern: str) -> Path:
    """The repository file a bind mount puts at the one target matching `target_pattern`."""
    found = [volume.split(":")[0] for volume in SERVICES[service]["volumes"]
             if fnmatch.fnmatch(volume.split(":")[1], target_pattern)]
    assert len(found) == 1 and found[0].startswith("./"), (service, target_pattern, found)
    return DEPLOY / found[0]


def one_shot_jobs() -> set[str]:
    """Services others wait on to have finished (compose's service_completed_successfully)."""
    return {dep for s in SERVICES.values() for dep, cond in (s.get("depends_on") or {}).items()
            if cond.get("condition") == "service_completed_successfully"}


def healthcheck_url(service: str) -> tuple[int, str]:
    """(port, path) of the http://127.0.0.1:PORT/PATH the service's health check opens."""
    found = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]*)", " ".join(SERVICES[service]["healthcheck"]["test"]))
    assert found, f"{service}: its health check opens no local URL"
    return int(found[1]), found[2]


@pytest.fixture
def bare(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Settings see only what compose gives a container: no runstate variable of this shell,
    no .runstate/env of this checkout."""
    for var in Settings.variables().values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    yield


def settings_of(service: str) -> Settings:
    return Settings(**env(service))


# -- Kafka -------------------------------------------------------------------------------------


def test_three_kafka_nodes_form_one_quorum() -> None:
    nodes = kafka_nodes()
    assert len(nodes) == 3
    assert {SERVICES[name]["image"] for name in nodes} == {"apache/kafka:4.1.1"}
    ids = {name: int(e["KAFKA_NODE_ID"]) for name, e in nodes.items()}
    assert len(set(ids.values())) == 3, ids
    assert len({e["KAFKA_CONTROLLER_QUORUM_VOTERS"] for e in nodes.values()}) == 1
    assert len({e["CLUSTER_ID"] for e in nodes.values()}) == 1
    voters = next(iter(nodes.values()))["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    for name, e in nodes.items():
        assert e["KAFKA_PROCESS_ROLES"] == "broker,controller"
        controller = e["KAFKA_CONTROLLER_LISTENER_NAMES"]
        port = next(urlsplit(listener).port for listener in e["KAFKA_LISTENERS"].split(",")
                    if listener.startswith(f"{controller}://"))
        # Each node is a voter under its own id, at its own controller listener.
        assert f"{ids[name]}@{name}:{port}" in voters
    assert len(voters) == 3


def test_kafka_replicates_every_topic_three_times_and_never_elects_an_unclean_leader() -> None:
    for name, e in kafka_nodes().items():
        for var in ("KAFKA_DEFAULT_REPLICATION_FACTOR", "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
                    "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                    "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR"):
            assert e.get(var) == "3", (name, var)
        for var in ("KAFKA_MIN_INSYNC_REPLICAS", "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
                    "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR"):
            assert e.get(var) == "2", (name, var)
        assert e.get("KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE") == "false", name


def test_kafka_keeps_its_data_in_its_own_mounted_volume() -> None:
    named_volumes = set(SPEC["volumes"])
    sources = []
    for name, e in kafka_nodes().items():
        mounts = dict(v.split(":")[:2] for v in SERVICES[name]["volumes"])
        log_dirs = e["KAFKA_LOG_DIRS"].split(",")
        for log_dir in log_dirs:
            source = next((s for s, target in mounts.items() if Path(log_dir).is_relative_to(target)), None)
            assert source in named_volumes, f"{name}: {log_dir} is in no named volume"
            sources.append(source)
    assert len(sources) == len(set(sources)) == 3


def test_every_client_gets_every_broker_on_the_listener_they_speak() -> None:
    advertised, protocols = set(), set()
    for e in kafka_nodes().values():
        protocol_of = dict(pair.split(":") for pair in e["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
        for listener in e["KAFKA_ADVERTISED_LISTENERS"].split(","):
            name, address = listener.split("://")
            advertised.add(address)
            protocols.add(protocol_of[name])
    assert len(advertised) == 3 and len(protocols) == 1
    for service in RUNSTATE_IMAGE_USERS:
        assert set(env(service)["KAFKA_BOOTSTRAP_SERVERS"].split(",")) == advertised, service
        assert {env(service)["RUNSTATE_KAFKA_SECURITY_PROTOCOL"]} == protocols, service


# -- PostgreSQL --------------------------------------------------------------------------------


def test_the_primary_waits_for_its_standby_which_copies_it_with_pg_basebackup() -> None:
    primary, standby = postgres_servers()
    assert {SERVICES[primary]["image"], SERVICES[standby]["image"]} == {"postgres:15"}
    assert "synchronous_commit=on" in SERVICES[primary]["command"]
    setup = mounted_file(primary, "/docker-entrypoint-initdb.d/*.sh").read_text()
    names = re.search(r"synchronous_standby_names = 'FIRST 1 \((\w+)\)'", setup)
    role = re.search(r"CREATE ROLE (\w+) LOGIN REPLICATION", setup)
    assert names and role
    assert f"host replication {role[1]} all scram-sha-256" in setup
    # The standby connects under the name the primary waits for.
    assert f"cluster_name={names[1]}" in SERVICES[standby]["command"]
    assert SERVICES[standby]["command"][0] == "bash"
    script = mounted_file(standby, SERVICES[standby]["command"][1]).read_text()
    # The command, not a comment: a line that runs it (as the postgres user), with its continuations.
    basebackup = re.search(r"^\s*(?:gosu \w+ )?pg_basebackup ([^\n]*\\\n)*[^\n]*", script, re.MULTILINE)
    assert basebackup, "the standby is not made with pg_basebackup"
    options = basebackup[0].split()
    assert "-R" in options and options[options.index("-U") + 1] == role[1]
    assert options[options.index("-h") + 1] == '"$primary"'
    assert env(standby)["RUNSTATE_PRIMARY_HOST"] == primary
    assert env(standby)["PGPASSWORD"] == env(primary)["RUNSTATE_REPLICATION_PASSWORD"]
    assert SERVICES[standby]["depends_on"][primary]["condition"] == "service_healthy"


def test_postgresql_health_checks_go_over_tcp() -> None:
    for server in postgres_servers():
        test = SERVICES[server]["healthcheck"]["test"]
        assert "pg_isready" in test and test[test.index("-h") + 1] == "127.0.0.1", server


def test_each_service_connects_to_both_servers_as_its_own_role() -> None:
    primary, standby = postgres_servers()
    expected = {"migrate": ("runstate_owner", "runstate_consumer"), "consumer": (None, "runstate_consumer"),
                "gateway": (None, "runstate_gateway")}
    for service, (owner, role) in expected.items():
        e = env(service)
        assert parse(e["DATABASE_URL"]).username == role
        assert (parse(e["RUNSTATE_ADMIN_DATABASE_URL"]).username if "RUNSTATE_ADMIN_DATABASE_URL" in e else None) == owner
        for url in (e["DATABASE_URL"], e.get("RUNSTATE_ADMIN_DATABASE_URL")):
            if url is None:
                continue
            dsn = conninfo_to_dict(libpq_dsn(url))
            assert set(dsn["host"].split(",")) == {primary, standby}, service
            assert len(str(dsn["port"]).split(",")) == 2, service
            assert dsn["target_session_attrs"] == "read-write", service
    # The migrations only need the consumer's role name to grant it: no password given.
    assert parse(env("migrate")["DATABASE_URL"]).password is None


def test_the_roles_are_created_with_the_passwords_the_services_log_in_with() -> None:
    primary, _ = postgres_servers()
    sql = mounted_file(primary, "/docker-entrypoint-initdb.d/*.sql").read_text()
    assert not re.search(r"PASSWORD\s+'", sql), "a password written in the init SQL"
    from_env = dict(re.findall(r"^\\getenv (\w+) (\w+)$", sql, re.MULTILINE))
    password_var = dict(re.findall(r"^CREATE ROLE (\w+) .*PASSWORD :'(\w+)';$", sql, re.MULTILINE))
    assert set(password_var) == {"runstate_owner", "runstate_consumer", "runstate_gateway", "runstate_auditor"}
    passwords = {role: env(primary)[from_env[var]] for role, var in password_var.items()}
    for service in RUNSTATE_IMAGE_USERS:
        for key in ("DATABASE_URL", "RUNSTATE_ADMIN_DATABASE_URL"):
            url = parse(env(service)[key]) if key in env(service) else None
            if url is not None and url.password is not None:
                assert url.password == passwords[str(url.username)], (service, key)


def test_passwords_are_compose_variables_with_placeholder_defaults() -> None:
    text = COMPOSE.read_text()
    assert "CHANGE THE PASSWORDS" in text
    for name, service in RAW["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key or "AUTH_STRING" in key:
                assert re.fullmatch(r"\$\{\w+:-[^}]+\}", str(value)), (name, key)
            if key.endswith("DATABASE_URL"):
                userinfo = str(value).split("://", 1)[1].split("@", 1)[0]
                assert ":" not in userinfo or re.fullmatch(r"\w+:\$\{\w+:-[^}]+\}", userinfo), (name, key)


# -- runstate's services -----------------------------------------------------------------------


def test_runstate_services_are_given_only_variables_runstate_reads(bare: None) -> None:
    known = set(Settings.variables().values())
    for service in RUNSTATE_IMAGE_USERS:
        unknown = set(env(service)) - known
        assert not unknown, f"{service}: {unknown} are not runstate settings"
        settings_of(service)  # and they validate as the container would load them


def test_runstate_services_run_commands_and_options_the_cli_has() -> None:
    cli = typer.main.get_command(cli_app)
    for service in RUNSTATE_IMAGE_USERS:
        program, *words = SERVICES[service]["command"]
        assert program == "runstate", service
        command = cli
        while words and not words[0].startswith("-"):
            command = command.commands[words.pop(0)]  # type: ignore[attr-defined]
        options = {opt for param in command.params for opt in param.opts}
        given = {word for word in words if word.startswith("--")}
        assert given <= options, f"{service}: {given - options} are not options of {command.name}"


def test_the_locally_built_image_is_never_pulled() -> None:
    built = {SERVICES[name]["image"] for name, s in SERVICES.items() if "build" in s}
    assert built == {"runstate:local"}
    users = [name for name, s in SERVICES.items() if s.get("image") in built]
    assert sorted(users) == sorted(RUNSTATE_IMAGE_USERS)
    for name in users:
        assert SERVICES[name].get("pull_policy") == "never", name


def test_every_long_running_service_has_a_health_check() -> None:
    jobs = one_shot_jobs()
    assert jobs == {"migrate"}
    for name, service in SERVICES.items():
        if name in jobs:
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), name


def test_stop_grace_period_outlasts_the_services_own_shutdown(bare: None) -> None:
    for service in ("consumer", "gateway"):
        timeout_s = settings_of(service).shutdown_timeout_ms / 1000
        # The HTTP server drains its requests, then the consumer its batch: each up to the timeout;
        # then each of the four closing steps up to STOP_STEP_SECONDS.
        assert seconds(SERVICES[service]["stop_grace_period"]) > 2 * timeout_s + 4 * STOP_STEP_SECONDS, service
    for name in [*kafka_nodes(), *postgres_servers()]:
        # Longer than Docker's 10 s default, after which a broker or server is SIGKILLed.
        assert seconds(SERVICES[name]["stop_grace_period"]) > 10, name


def test_the_consumer_probes_answer_on_the_published_port(bare: None) -> None:
    settings = settings_of("consumer")
    assert settings.metrics_host == "0.0.0.0"
    port, path = healthcheck_url("consumer")
    assert port == settings.metrics_port
    assert path in dict(build_app(settings).routes)  # type: ignore[union-attr]
    assert f"127.0.0.1:{port}:{port}" in SERVICES["consumer"]["ports"]


def test_the_gateway_listens_on_every_interface_of_its_container(bare: None) -> None:
    command = SERVICES["gateway"]["command"]
    assert command[:2] == ["runstate", "gateway"]
    options = {opt for param in typer.main.get_command(cli_app).commands["gateway"].params  # type: ignore[attr-defined]
               for opt in param.opts}
    assert {"--host", "--port"} <= options
    assert command[command.index("--host") + 1] == "0.0.0.0"
    port = int(command[command.index("--port") + 1])
    health_port, path = healthcheck_url("gateway")
    assert health_port == port
    assert path in create_app(settings_of("gateway")).openapi()["paths"]
    # The gateway requires a login (RUNSTATE_GATEWAY_AUTH_STRING): its probe must not.
    assert path in OPEN_PATHS
    assert f"127.0.0.1:{port}:{port}" in SERVICES["gateway"]["ports"]


def test_the_docker_build_context_leaves_out_local_state_but_not_what_the_image_copies() -> None:
    build = SERVICES["migrate"]["build"]
    context = (DEPLOY / build["context"]).resolve()
    assert context == REPO
    patterns = [line.strip() for line in (context / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for needed in (".venv", ".runstate", ".cache", ".git"):
        assert needed in patterns
    copied = [src for line in (context / build["dockerfile"]).read_text().splitlines()
              if line.startswith("COPY ") for src in line.split()[1:-1]]
    assert "services" in copied
    for src in copied:
        assert (context / src).exists(), src
        assert not any(fnmatch.fnmatch(src, p) for p in patterns), f"{src} is copied but ignored"
