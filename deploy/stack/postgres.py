"""A throwaway PostgreSQL cluster, secured as a real one is: initdb on first use with a
SCRAM-SHA-256 superuser password, the server on loopback only with TLS (a certificate signed
by a throwaway CA, pg_tls), pg_hba accepting only `hostssl ... scram-sha-256`, and the
database and login roles runstate expects (pg_roles: database `runstate` owned by
runstate_owner, not a superuser; runstate_consumer, runstate_gateway, runstate_auditor, each
granted its privileges by the migrations). RUNSTATE_STACK_SECURITY=plaintext turns TLS off
(the same roles and passwords, `host ... scram-sha-256`): the benchmark's switch."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from . import pg_roles
from .output import StackError, say
from .pg_tls import ServerTLS, server_tls
from .ports import HOST
from .processes import Launcher, exited
from .records import Record
from .tools import need_pg_bindir

PG_READY_TIMEOUT = 30.0
# Sized for a write-heavy log on a small machine: the pages the consumer writes stay in shared
# buffers (at 256MB its backends wrote evicted pages themselves, ~0.2 a command), and a few
# minutes of full load hold no checkpoint (at 1GB of WAL one was requested every ~3 minutes,
# each followed by full-page images of every page touched again). Recovery after a crash
# replays up to this much WAL.
WRITE_HEAVY = ("-c", "shared_buffers=1GB", "-c", "max_wal_size=4GB", "-c", "checkpoint_timeout=15min")
DB_NAME = pg_roles.DB_NAME
OWNER_ROLE = pg_roles.OWNER_ROLE
# Only TLS over loopback, only SCRAM passwords; no socket (`local`) entry, so no peer or trust.
HBA = ("# Written by deploy/stack: TLS and SCRAM-SHA-256 passwords on loopback, nothing else\n"
       f"hostssl all all {HOST}/32 scram-sha-256\n")
HBA_PLAINTEXT = ("# Written by deploy/stack (RUNSTATE_STACK_SECURITY=plaintext): SCRAM-SHA-256 passwords on "
                 f"loopback, no TLS\nhost all all {HOST}/32 scram-sha-256\n")


def tls_wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """TLS unless RUNSTATE_STACK_SECURITY=plaintext (the stack's switch, shared with Kafka's)."""
    return environ.get("RUNSTATE_STACK_SECURITY", "").strip().lower() != "plaintext"


def database_env(host: str, port: int | list[int], home: Path, ca: Path | None) -> dict[str, str]:
    """DATABASE_URL for .runstate/env: the read-only gateway role, password and TLS included."""
    passwords = pg_roles.load_passwords(home) or {}
    role = pg_roles.PUBLIC_ROLE
    if role not in passwords:
        return {}
    return {"DATABASE_URL": pg_roles.url(role, passwords[role], host, port, ca)}


def database_service_env(host: str, port: int | list[int], home: Path, ca: Path | None) -> dict[str, str]:
    """Each runstate role's URL (the owner's as RUNSTATE_ADMIN_DATABASE_URL), for
    .runstate/service.env and the service processes."""
    passwords = pg_roles.load_passwords(home) or {}
    return {var: pg_roles.url(role, passwords[role], host, port, ca)
            for role, var in pg_roles.SERVICE_URL_VARS.items() if role in passwords}


def postgres_user() -> tuple[int, int] | None:
    """(uid, gid) to run the server as: PostgreSQL refuses to run as root."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise StackError("running as root and there is no 'postgres' system user to run PostgreSQL as") from None
    return pw.pw_uid, pw.pw_gid


@dataclasses.dataclass
class PostgresServer:
    home: Path  # data/ (the cluster), sock/, postgres.log
    port: int
    name: str = "postgres"
    tls: bool = dataclasses.field(default_factory=tls_wanted)
    # The replicated stack's two servers share one folder of passwords and TLS files (standby.py).
    keys: Path | None = None
    # The ports the clients' URLs name: this server's alone, or a multi-host URL's (standby.py).
    client_ports: list[int] | None = None
    extra_options: list[str] = dataclasses.field(default_factory=list)
    extra_hba: str = ""
    _tls: ServerTLS | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def keys_home(self) -> Path:
        return self.keys or self.home

    def _client_port(self) -> int | list[int]:
        return self.client_ports or self.port

    def env(self) -> dict[str, str]:
        return database_env(HOST, self._client_port(), self.keys_home, self._ca())

    def service_env(self) -> dict[str, str]:
        return database_service_env(HOST, self._client_port(), self.keys_home, self._ca())

    def start(self, launcher: Launcher, apt_log: Path) -> Record:
        """Create the cluster when new, start the server, wait for it and provision it."""
        t0 = time.monotonic()
        bindir = need_pg_bindir(apt_log)
        sock = self.home / "sock"
        self.home.mkdir(parents=True, exist_ok=True)
        sock.mkdir(exist_ok=True)
        run_as = postgres_user()
        if run_as is not None:
            for p in (self.home, sock):  # data/ is created and owned by postgres itself (initdb)
                os.chown(p, *run_as)
            probe = subprocess.run(["test", "-w", str(self.home)], user=run_as[0], group=run_as[1], extra_groups=[])
            if probe.returncode != 0:
                raise StackError(f"user postgres cannot write {self.home} (a parent folder is not searchable for it)")
        initdb = self._create_cluster(bindir, run_as)
        self._write_hba(run_as)
        self._tls = server_tls(self.keys_home, run_as) if self.tls else None
        t_start = time.monotonic()
        rec = self._spawn(launcher, bindir, run_as)
        self._wait_ready(rec, bindir, t_start)
        started = time.monotonic() - t_start
        self._provision(bindir)
        now = time.monotonic()
        say(f"{self.name}: ready on {HOST}:{self.port} in {now - t0:.1f} s ({initdb}, server start {started:.1f} s; "
            f"pid {rec.pid})")
        return rec

    def _run(self, argv: list[str], logname: str, what: str, run_as: tuple[int, int] | None) -> None:
        out_log = self.home / logname
        with open(out_log, "wb") as out:
            kwargs: dict = dict(user=run_as[0], group=run_as[1], extra_groups=[]) if run_as else {}
            rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=self.home, **kwargs).returncode
        if rc != 0:
            raise StackError(f"{what} failed (exit code {rc})", out_log)

    def _create_cluster(self, bindir: Path, run_as: tuple[int, int] | None) -> str:
        data = self.home / "data"
        if (data / "PG_VERSION").exists() and pg_roles.load_passwords(self.keys_home) is not None:
            return "cluster reused"
        if (data / "PG_VERSION").exists():
            say(f"{self.name}: the cluster in {data} predates password authentication: making a new one")
        t_init = time.monotonic()
        shutil.rmtree(data, ignore_errors=True)
        passwords = pg_roles.new_passwords(self.keys_home)
        self._initdb(bindir, run_as, passwords[pg_roles.SUPERUSER])
        return f"initdb {time.monotonic() - t_init:.1f} s"

    def _write_hba(self, run_as: tuple[int, int] | None) -> None:
        """pg_hba.conf of the mode asked for, on every start (the switch may have changed)."""
        hba = self.home / "data" / "pg_hba.conf"
        hba.write_text((HBA if self.tls else HBA_PLAINTEXT) + self.extra_hba)
        if run_as:
            os.chown(hba, *run_as)

    def _initdb(self, bindir: Path, run_as: tuple[int, int] | None, password: str) -> None:
        """initdb with the superuser's SCRAM password (read from a file only the server's user can read)."""
        pwfile = self.home / ".initdb-password"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        if run_as:
            os.chown(pwfile, *run_as)
        try:
            self._run([str(bindir / "initdb"), "-D", str(self.home / "data"), "-U", pg_roles.SUPERUSER,
                       "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C"],
                      "initdb.log", "initdb", run_as)
        finally:
            pwfile.unlink(missing_ok=True)

    def _spawn(self, launcher: Launcher, bindir: Path, run_as: tuple[int, int] | None) -> Record:
        return launcher.spawn(
            self.name,
            [str(bindir / "postgres"), "-D", str(self.home / "data"), "-p", str(self.port), "-k", str(self.home / "sock"),
             "-c", f"listen_addresses={HOST}", *WRITE_HEAVY, "-c", "max_connections=200",
             "-c", "synchronous_commit=on", "-c", "logging_collector=off", *self._security_options(),
             *self.extra_options],
            self.home / "postgres.log", cwd=self.home, run_as=run_as,
            stop_signal=signal.SIGINT,  # fast shutdown
            port=self.port)

    def _security_options(self) -> list[str]:
        """Server settings: TLS on with the stack's certificate, SCRAM for every new password."""
        tls = self._tls
        if tls is None:
            return ["-c", "ssl=off", "-c", "password_encryption=scram-sha-256"]
        return ["-c", "ssl=on", "-c", f"ssl_cert_file={tls.cert}", "-c", f"ssl_key_file={tls.key}",
                "-c", "ssl_min_protocol_version=TLSv1.2",
                "-c", "password_encryption=scram-sha-256"]

    def _ca(self) -> Path | None:
        """The CA clients verify the server against; None without TLS."""
        return self.keys_home / "tls" / "ca.pem" if self.tls else None

    def _wait_ready(self, rec: Record, bindir: Path, t_start: float) -> None:
        log = self.home / "postgres.log"
        deadline = t_start + PG_READY_TIMEOUT
        while True:
            code = exited(rec)
            if code is not None:
                raise StackError(f"PostgreSQL exited during startup (exit code {code})", log)
            if subprocess.run([str(bindir / "pg_isready"), "-q", "-h", HOST, "-p", str(self.port),
                               "-U", pg_roles.SUPERUSER, "-d", "postgres", "-t", "1"],
                              stdin=subprocess.DEVNULL).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise StackError(f"PostgreSQL did not accept connections on port {self.port} within "
                                 f"{PG_READY_TIMEOUT:.0f} s", log)
            time.sleep(0.1)

    def _provision(self, bindir: Path) -> None:
        """Database and login roles, as the superuser over TLS; idempotent (passwords re-set)."""
        psql = bindir / "psql"
        if not psql.exists():
            psql = Path(shutil.which("psql") or "psql")
        log = self.home / "provision.log"
        passwords = pg_roles.load_passwords(self.keys_home)
        if passwords is None:
            raise StackError(f"{pg_roles.passwords_file(self.keys_home)} is missing: remove {self.home} to start afresh")
        # With a synchronous standby named but not attached yet, every commit would wait for it.
        env = {**os.environ, "PGPASSWORD": passwords[pg_roles.SUPERUSER], "PGCONNECT_TIMEOUT": "10",
               "PGOPTIONS": "-c synchronous_commit=local"}

        def sql(query: str, shown: str | None = None) -> str:
            """Run `query`; the log gets `shown` instead when the query carries a password."""
            res = subprocess.run([str(psql), "-X", "-q", "-d",
                                  pg_roles.conninfo(pg_roles.SUPERUSER, HOST, self.port, self._ca(), "postgres"),
                                  "-v", "ON_ERROR_STOP=1", "-tAc", query],
                                 capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
            with open(log, "a") as out:
                out.write(f"> {shown or query}\n{res.stdout}{res.stderr}")
            if res.returncode != 0:
                last = (res.stderr.strip().splitlines() or ["psql failed"])[-1]
                raise StackError(f"could not provision PostgreSQL: {last}", log)
            return res.stdout.strip()

        for role in (pg_roles.OWNER_ROLE, *pg_roles.SERVICE_ROLES):
            create, alter = pg_roles.role_sql(role, passwords[role])
            exists = sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'") == "1"
            sql(alter if exists else create, f"{'ALTER' if exists else 'CREATE'} ROLE {role} ... PASSWORD '***'")
        if sql(f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'") != "1":
            sql(f"CREATE DATABASE {DB_NAME} OWNER {OWNER_ROLE}")
        # Only runstate's roles may connect to its database (a new database lets PUBLIC in).
        sql(f"REVOKE ALL ON DATABASE {DB_NAME} FROM PUBLIC")
        sql(f"GRANT CONNECT ON DATABASE {DB_NAME} TO {', '.join(pg_roles.SERVICE_ROLES)}")
        sql(f"GRANT TEMPORARY ON DATABASE {DB_NAME} TO {pg_roles.CONSUMER_ROLE}")
        if self.extra_hba:
            role, password = pg_roles.REPLICATION_ROLE, pg_roles.replication_password(self.keys_home)
            quoted = "'" + password.replace("'", "''") + "'"
            exists = sql(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'") == "1"
            sql(f"{'ALTER' if exists else 'CREATE'} ROLE {role} LOGIN REPLICATION NOSUPERUSER NOCREATEDB "
                f"NOCREATEROLE PASSWORD {quoted}", f"{'ALTER' if exists else 'CREATE'} ROLE {role} ... PASSWORD '***'")
