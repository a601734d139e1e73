"""The local PostgreSQL is secured as a real one is: TLS verified against the stack's CA,
SCRAM passwords, loopback only, and each runstate role holds only its privileges (revision
0008). Against the real stack (`make up`)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from runstate.database_urls import libpq_dsn, parse

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[2]
TABLES = ("events", "task_runs", "flow_runs", "task_cache", "tag_concurrency_limits", "tag_leases")


@pytest.fixture(autouse=True)
def _local_only(test_backend: str) -> None:
    if test_backend != "local":
        pytest.skip("RUNSTATE_TEST_BACKEND=testcontainers: the container's PostgreSQL is not deploy/stack's")


@pytest.fixture
def tls_stack(database_url: str) -> None:
    """The TLS tests need the secured stack (RUNSTATE_STACK_SECURITY=plaintext turns TLS off)."""
    if "sslmode" not in parse(database_url).query:
        pytest.skip("the stack runs without TLS (RUNSTATE_STACK_SECURITY=plaintext)")


@pytest.fixture(scope="module")
def migrated(base_settings):
    """The shared database at the head revision (base_settings applies the migrations)."""
    return base_settings


def dsn(url: str, **changes: str | None) -> str:
    params = conninfo_to_dict(libpq_dsn(url))
    params.update(changes)
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


def connect(url: str, **changes: str | None) -> psycopg.Connection:
    return psycopg.connect(dsn(url, connect_timeout="10", **changes))


def refused(url: str, **changes: str | None) -> str:
    with pytest.raises(psycopg.OperationalError) as err:
        connect(url, **changes).close()
    return str(err.value)


# --------------------------------------------------------------------------- connections


@pytest.mark.usefixtures("tls_stack")
def test_the_urls_ask_for_a_verified_tls_connection(database_url: str, gateway_database_url: str,
                                                     admin_database_url: str) -> None:
    for url in (database_url, gateway_database_url, admin_database_url):
        query = parse(url).query
        assert query.get("sslmode") == "verify-full", url
        assert Path(str(query.get("sslrootcert"))).is_file(), url


@pytest.mark.usefixtures("tls_stack")
def test_a_connection_is_encrypted_and_scram_authenticated(database_url: str) -> None:
    with connect(database_url, channel_binding="require") as conn:
        ssl, version = conn.execute("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        method = conn.execute("SHOW password_encryption").fetchone()[0]
    assert ssl is True and version.startswith("TLSv1.")
    assert method == "scram-sha-256"


@pytest.mark.usefixtures("tls_stack")
def test_a_connection_without_tls_is_refused(database_url: str) -> None:
    message = refused(database_url, sslmode="disable", sslrootcert=None)
    assert "no pg_hba.conf entry" in message and "no encryption" in message, message


@pytest.mark.usefixtures("tls_stack")
def test_a_server_certificate_not_signed_by_a_trusted_ca_is_refused(database_url: str) -> None:
    # The system's CAs did not sign the stack's certificate: verify-full must not be satisfied by them.
    message = refused(database_url, sslrootcert="system")
    assert "certificate verify failed" in message, message


def test_a_wrong_password_is_refused(database_url: str) -> None:
    message = refused(database_url, password="not-" + uuid.uuid4().hex)
    assert "password authentication failed" in message, message


def test_a_connection_without_a_password_is_refused(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", os.devnull)
    message = refused(database_url, password=None)
    assert "no password supplied" in message, message


def test_the_superuser_cannot_log_in_without_its_password(admin_database_url: str) -> None:
    message = refused(admin_database_url, user="postgres", password="postgres")
    assert "password authentication failed" in message, message


@pytest.mark.usefixtures("tls_stack")
def test_the_server_listens_on_loopback_only_with_tls_on(admin_database_url: str) -> None:
    with connect(admin_database_url) as conn:
        settings = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('listen_addresses', 'ssl', 'password_encryption')"
        ).fetchall())
    assert settings == {"listen_addresses": "127.0.0.1", "ssl": "on", "password_encryption": "scram-sha-256"}


# --------------------------------------------------------------------------- roles


def test_the_owner_is_not_a_superuser(admin_database_url: str, migrated) -> None:
    with connect(admin_database_url) as conn:
        user, superuser, createrole, bypassrls = conn.execute(
            "SELECT rolname, rolsuper, rolcreaterole, rolbypassrls FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
        owner = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'events'").fetchone()[0]
    assert (user, superuser, createrole, bypassrls) == ("runstate_owner", False, False, False)
    assert owner == "runstate_owner"


@pytest.mark.parametrize("role_url", ["database_url", "gateway_database_url", "auditor_database_url"])
def test_the_service_roles_have_no_special_attributes_and_own_nothing(role_url: str, request, migrated) -> None:
    url = request.getfixturevalue(role_url)
    with connect(url) as conn:
        flags = conn.execute("SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls"
                             " FROM pg_roles WHERE rolname = current_user").fetchone()
        owned = conn.execute("SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner"
                             " WHERE r.rolname = current_user AND c.relpersistence = 'p'").fetchone()[0]
    assert flags == (False, False, False, False, False)
    assert owned == 0


def _denied(url: str, statement: str) -> None:
    """`statement` fails with a privilege error (and changes nothing: it is rolled back)."""
    with connect(url) as conn:
        with pytest.raises((errors.InsufficientPrivilege,)) as err:
            conn.execute(statement)
        conn.rollback()
    assert "permission denied" in str(err.value) or "must be owner" in str(err.value), (statement, err.value)


@pytest.mark.parametrize("role_url", ["gateway_database_url", "auditor_database_url"])
@pytest.mark.parametrize("table", TABLES)
def test_a_read_only_role_reads_but_cannot_write(role_url: str, table: str, request, migrated) -> None:
    url = request.getfixturevalue(role_url)
    with connect(url) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] >= 0
    _denied(url, f"INSERT INTO {table} DEFAULT VALUES")
    _denied(url, f"DELETE FROM {table} WHERE false")
    column = "stream_id" if table == "events" else ("tag" if table == "tag_concurrency_limits" else
                                                     "cache_key" if table == "task_cache" else "id")
    _denied(url, f"UPDATE {table} SET {column} = {column} WHERE false")
    _denied(url, f"TRUNCATE {table}")
    _denied(url, f"DROP TABLE {table}")


@pytest.mark.parametrize("role_url", ["database_url", "gateway_database_url", "auditor_database_url"])
def test_no_service_role_can_create_or_alter_tables(role_url: str, request, migrated) -> None:
    url = request.getfixturevalue(role_url)
    _denied(url, f"CREATE TABLE intruder_{uuid.uuid4().hex[:8]} (x int)")
    _denied(url, "ALTER TABLE events DISABLE TRIGGER USER")
    _denied(url, "SET session_replication_role = replica")


def test_the_consumer_appends_to_the_log_but_cannot_rewrite_or_drop_it(database_url: str, migrated) -> None:
    stream = uuid.uuid4()
    with connect(database_url) as conn:
        conn.execute(
            "INSERT INTO events (stream_id, seq, stream_type, event_type, command_id, payload)"
            " VALUES (%s, 1, 'task_run', 'probe', %s, '{}')", (stream, uuid.uuid4()))
        assert conn.execute("SELECT count(*) FROM events WHERE stream_id = %s", (stream,)).fetchone()[0] == 1
        conn.rollback()  # the probe is not kept: the shared log stays the pipeline's
    for statement in ("UPDATE events SET event_type = 'rewritten' WHERE false",
                      "DELETE FROM events WHERE false",
                      "TRUNCATE events",
                      "DROP TABLE events",
                      "DROP TABLE task_runs"):
        _denied(database_url, statement)


def test_the_consumer_writes_projections(database_url: str, migrated) -> None:
    run = uuid.uuid4()
    with connect(database_url) as conn:
        conn.execute("INSERT INTO task_runs (id, last_seq, view) VALUES (%s, 1, '{}')", (run,))
        conn.execute("UPDATE task_runs SET last_seq = 2 WHERE id = %s", (run,))
        conn.execute("DELETE FROM task_runs WHERE id = %s", (run,))
        conn.rollback()


async def test_the_pipeline_decides_with_the_consumers_role_alone(base_settings, database_url: str) -> None:
    """The consumer service with nothing but its own role: no owner URL anywhere in its settings."""
    from pipeline.harness import InProcessService, isolated_settings
    from runstate.client import RunstateClient, state

    settings = isolated_settings(base_settings.replace(database_url=database_url, admin_database_url=database_url))
    assert parse(settings.admin_database_url).username == "runstate_consumer"
    run = uuid.uuid4()
    async with InProcessService(settings), RunstateClient(settings) as client:
        await client.create_task_run(run, name="least-privilege")
        answer = await client.propose(run, state("RUNNING"))
    assert answer.status == "ACCEPT", answer
    with connect(database_url) as conn:
        seqs = [r[0] for r in conn.execute("SELECT seq FROM events WHERE stream_id = %s ORDER BY seq", (run,))]
        state_type = conn.execute("SELECT state_type FROM task_runs WHERE id = %s", (run,)).fetchone()
    assert seqs == [1, 2]
    assert state_type == ("RUNNING",)


# --------------------------------------------------------------------------- the stack's services


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.parametrize(("service", "role"), [("consumer", "runstate_consumer"), ("gateway", "runstate_gateway")])
def test_each_service_runs_as_its_own_role_without_the_owners_url(service: str, role: str) -> None:
    from stack import LocalStack

    pid = LocalStack().pid(service)
    assert pid is not None, f"the stack records no {service}: start it with `make up`"
    env = _environ(pid)
    assert parse(env["DATABASE_URL"]).username == role
    assert not any("runstate_owner" in v for v in env.values())
    assert "RUNSTATE_ADMIN_DATABASE_URL" not in env


def _passwords_file() -> str:
    """Where the running stack keeps the cluster's passwords (RUNSTATE_STACK=replicated: shared by both servers)."""
    import json

    shape = json.loads((REPO / ".runstate" / "state.json").read_text()).get("shape", "single")
    return "postgres-keys/passwords.json" if shape == "replicated" else "postgres/passwords.json"


def _passwords() -> list[str]:
    import json

    data = json.loads((REPO / ".runstate" / _passwords_file()).read_text())
    return list(data.values())


@pytest.mark.parametrize("args", [["status"], ["env"]])
def test_the_stack_prints_no_password(args: list[str]) -> None:
    result = subprocess.run([sys.executable, str(REPO / "deploy" / "stack"), *args], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    assert "DATABASE_URL" in out or args == ["status"]
    for password in _passwords():
        assert password not in out


def test_runstate_config_shows_no_password() -> None:
    result = subprocess.run([sys.executable, "-m", "runstate.cli", "config", "show"], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "runstate_gateway:***@" in result.stdout
    for password in _passwords():
        assert password not in result.stdout + result.stderr


def test_the_files_with_passwords_are_readable_by_their_owner_only() -> None:
    for name in ("env", "service.env", "state.json", "last.json", _passwords_file()):
        mode = (REPO / ".runstate" / name).stat().st_mode & 0o777
        assert mode == 0o600, (name, oct(mode))


def test_no_log_of_the_stack_holds_a_password() -> None:
    logs = [f for f in (REPO / ".runstate").rglob("*.log") if f.is_file()]
    assert any(f.name == "provision.log" for f in logs), "the stack wrote no provision.log"
    for log in logs:
        text = log.read_text(errors="replace")
        for password in _passwords():
            assert password not in text, log


def test_runstate_db_finds_the_owner_in_service_env_for_the_same_database_only(tmp_path: Path, monkeypatch) -> None:
    from runstate.config import Settings, migration_urls

    (tmp_path / ".runstate").mkdir()
    (tmp_path / ".runstate" / "env").write_text("export KAFKA_BOOTSTRAP_SERVERS=k:9092\n")
    (tmp_path / ".runstate" / "service.env").write_text(
        "export RUNSTATE_ADMIN_DATABASE_URL='postgresql+psycopg://runstate_owner:o@127.0.0.1:5999/runstate'\n")
    monkeypatch.chdir(tmp_path)
    for var in ("DATABASE_URL", "RUNSTATE_ADMIN_DATABASE_URL"):
        monkeypatch.delenv(var, raising=False)
    same = Settings(kafka_bootstrap_servers="k:9092",
                    database_url="postgresql+psycopg://runstate_gateway:g@127.0.0.1:5999/runstate")
    assert parse(migration_urls(same)[0]).username == "runstate_owner"
    other = Settings(kafka_bootstrap_servers="k:9092",
                     database_url="postgresql+psycopg://app:a@db.example.com:5432/runstate")
    assert parse(migration_urls(other)[0]).username == "app"
    explicit = other.replace(admin_database_url="postgresql+psycopg://boss:b@db.example.com:5432/runstate")
    assert parse(migration_urls(explicit)[0]).username == "boss"
