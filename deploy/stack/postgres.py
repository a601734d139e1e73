"""A throwaway PostgreSQL cluster: initdb on first use, the server on loopback, and the
database and roles runstate expects (database `runstate` owned by runstate_owner, LOGIN role
runstate_app; the migrations grant it what it needs)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .output import StackError, say
from .ports import HOST
from .processes import Launcher, exited
from .records import Record
from .tools import need_pg_bindir

PG_READY_TIMEOUT = 30.0
DB_NAME = "runstate"
OWNER_ROLE = "runstate_owner"
APP_ROLE = "runstate_app"


def database_env(host: str, port: int) -> dict[str, str]:
    """The connection variables of the runstate database on one server."""
    return {
        "DATABASE_URL": f"postgresql+psycopg://{APP_ROLE}@{host}:{port}/{DB_NAME}",
        "RUNSTATE_ADMIN_DATABASE_URL": f"postgresql+psycopg://{OWNER_ROLE}@{host}:{port}/{DB_NAME}",
    }


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

    def env(self) -> dict[str, str]:
        return database_env(HOST, self.port)

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
        if (data / "PG_VERSION").exists():
            return "cluster reused"
        t_init = time.monotonic()
        shutil.rmtree(data, ignore_errors=True)
        self._run([str(bindir / "initdb"), "-D", str(data), "-U", OWNER_ROLE, "--auth=trust",
                   "-E", "UTF8", "--locale=C"], "initdb.log", "initdb", run_as)
        (data / "pg_hba.conf").write_text(
            "# Written by deploy/stack: trust, loopback and the cluster's own socket only\n"
            "local all all trust\n"
            f"host  all all {HOST}/32 trust\n")
        if run_as:
            os.chown(data / "pg_hba.conf", *run_as)
        return f"initdb {time.monotonic() - t_init:.1f} s"

    def _spawn(self, launcher: Launcher, bindir: Path, run_as: tuple[int, int] | None) -> Record:
        return launcher.spawn(
            self.name,
            [str(bindir / "postgres"), "-D", str(self.home / "data"), "-p", str(self.port), "-k", str(self.home / "sock"),
             "-c", f"listen_addresses={HOST}", "-c", "shared_buffers=256MB", "-c", "max_connections=200",
             "-c", "synchronous_commit=on", "-c", "logging_collector=off"],
            self.home / "postgres.log", cwd=self.home, run_as=run_as,
            stop_signal=signal.SIGINT,  # fast shutdown
            port=self.port)

    def _wait_ready(self, rec: Record, bindir: Path, t_start: float) -> None:
        log = self.home / "postgres.log"
        deadline = t_start + PG_READY_TIMEOUT
        while True:
            code = exited(rec)
            if code is not None:
                raise StackError(f"PostgreSQL exited during startup (exit code {code})", log)
            if subprocess.run([str(bindir / "pg_isready"), "-q", "-h", HOST, "-p", str(self.port), "-U", OWNER_ROLE,
                               "-d", "postgres", "-t", "1"], stdin=subprocess.DEVNULL).returncode == 0:
                return
            if time.monotonic() > deadline:
                raise StackError(f"PostgreSQL did not accept connections on port {self.port} within "
                                 f"{PG_READY_TIMEOUT:.0f} s", log)
            time.sleep(0.1)

    def _provision(self, bindir: Path) -> None:
        """Database and roles; idempotent."""
        psql = bindir / "psql"
        if not psql.exists():
            psql = Path(shutil.which("psql") or "psql")
        log = self.home / "provision.log"

        def sql(query: str) -> str:
            res = subprocess.run([str(psql), "-X", "-q", "-h", HOST, "-p", str(self.port), "-U", OWNER_ROLE,
                                  "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-tAc", query],
                                 capture_output=True, text=True, stdin=subprocess.DEVNULL)
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
