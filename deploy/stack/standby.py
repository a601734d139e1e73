"""The replicated stack's PostgreSQL (RUNSTATE_STACK=replicated): a primary and a synchronous
standby, on loopback, secured like the single server (TLS, SCRAM, the same roles).

    <root>/postgres-a, postgres-b   data/, sock/, logs of each server (application names pg_a, pg_b)
    <root>/postgres-keys            passwords.json (0600) and tls/ (one certificate for 127.0.0.1,
                                    valid for both servers), shared by the two
    <root>/postgres-keys/primary    which of the two is the primary now

The standby is made by `pg_basebackup -R` from the primary, logged in as runstate_replicator
(REPLICATION only; `hostssl replication` in pg_hba, SCRAM over TLS) and streams from it. Both
servers run with synchronous_standby_names = 'FIRST 1 (pg_a, pg_b)' and synchronous_commit=on,
so whichever is the primary acknowledges a commit only once the other has it. Clients get a
multi-host URL (`?host=..&host=..&target_session_attrs=read-write`) and find the primary after a
failover. Failover (fault tests): SIGKILL the primary, `promote` the standby, start the old one
again: being the standby now, it is rebuilt from the new primary with pg_basebackup."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from pathlib import Path

from . import pg_roles
from .output import StackError, say
from .ports import HOST, Ports
from .postgres import PostgresServer, postgres_user
from .processes import Launcher
from .records import Record
from .tools import need_pg_bindir

NAMES = ("postgres-a", "postgres-b")
SYNC_NAMES = "FIRST 1 (pg_a, pg_b)"
SYNC_TIMEOUT = 120.0


def application_name(server: str) -> str:
    return "pg_" + server.rsplit("-", 1)[1]


@dataclasses.dataclass
class PostgresNode(PostgresServer):
    """One of the two servers: started as the primary (initdb when new) or as the standby of
    `peer` (rebuilt from it every start: a former primary may have diverged)."""

    primary: bool = False
    peer: PostgresNode | None = dataclasses.field(default=None, repr=False)

    def start(self, launcher: Launcher, apt_log: Path) -> Record:
        self.keys_home.mkdir(parents=True, exist_ok=True)
        if self.primary:
            return super().start(launcher, apt_log)
        return self._start_standby(launcher, apt_log)

    def _start_standby(self, launcher: Launcher, apt_log: Path) -> Record:
        t0 = time.monotonic()
        assert self.peer is not None
        bindir = need_pg_bindir(apt_log)
        run_as = postgres_user()
        sock = self.home / "sock"
        self.home.mkdir(parents=True, exist_ok=True)
        sock.mkdir(exist_ok=True)
        if run_as is not None:
            for p in (self.home, sock):
                os.chown(p, *run_as)
        data = self.home / "data"
        shutil.rmtree(data, ignore_errors=True)
        password = pg_roles.replication_password(self.keys_home)
        upstream = pg_roles.conninfo(pg_roles.REPLICATION_ROLE, HOST, self.peer.port, self._ca(), "postgres")
        # The server runs as postgres with root's HOME: libpq would try (and fail) to read
        # /root/.postgresql/postgresql.crt as a client certificate; there is none to send.
        upstream += f" sslcert='{self.home / 'no-client-cert'}' sslkey='{self.home / 'no-client-key'}'"
        log = self.home / "basebackup.log"
        with open(log, "wb") as out:
            kwargs: dict = dict(user=run_as[0], group=run_as[1], extra_groups=[]) if run_as else {}
            # No application_name here: the backup's own connection would count as the synchronous standby.
            rc = subprocess.run([str(bindir / "pg_basebackup"), "-d", upstream, "-D", str(data), "-X", "stream",
                                 "-R", "-c", "fast"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=self.home, env={**os.environ, "PGPASSWORD": password},
                                **kwargs).returncode
        if rc != 0:
            raise StackError(f"{self.name}: pg_basebackup from {self.peer.name} failed (exit code {rc})", log)
        conninfo = f"{upstream} password='{password}' application_name='{application_name(self.name)}'"
        with open(data / "postgresql.auto.conf", "a") as conf:  # the last line wins over -R's
            conf.write("primary_conninfo = '" + conninfo.replace("'", "''") + "'\n")
        self._write_hba(run_as)
        from .pg_tls import server_tls

        self._tls = server_tls(self.keys_home, run_as) if self.tls else None
        t_start = time.monotonic()
        rec = self._spawn(launcher, bindir, run_as)
        self._wait_ready(rec, bindir, t_start)
        self.peer.wait_sync(bindir, application_name(self.name))
        say(f"{self.name}: standby of {self.peer.name} (synchronous) on {HOST}:{self.port} in "
            f"{time.monotonic() - t0:.1f} s (pid {rec.pid})")
        return rec

    def psql(self, bindir: Path, query: str) -> str:
        """`query` as the superuser on this server (synchronous_commit=local: never waits on a standby)."""
        passwords = pg_roles.load_passwords(self.keys_home) or {}
        res = subprocess.run([str(bindir / "psql"), "-X", "-q", "-d",
                              pg_roles.conninfo(pg_roles.SUPERUSER, HOST, self.port, self._ca(), "postgres"),
                              "-tAc", query], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             env={**os.environ, "PGPASSWORD": passwords.get(pg_roles.SUPERUSER, ""),
                                  "PGCONNECT_TIMEOUT": "5", "PGOPTIONS": "-c synchronous_commit=local"})
        return res.stdout.strip() if res.returncode == 0 else ""

    def wait_sync(self, bindir: Path, standby: str) -> None:
        deadline = time.monotonic() + SYNC_TIMEOUT
        query = f"SELECT sync_state FROM pg_stat_replication WHERE application_name = '{standby}'"
        while self.psql(bindir, query) != "sync":
            if time.monotonic() > deadline:
                raise StackError(f"{standby} did not become the synchronous standby of {self.name} within "
                                 f"{SYNC_TIMEOUT:.0f} s", self.home / "postgres.log")
            time.sleep(0.2)

    def promote(self, apt_log: Path) -> float:
        """Make this standby the primary (pg_ctl promote); the peer becomes its standby-to-be.
        Returns the seconds until it accepts writes."""
        t0 = time.monotonic()
        bindir = need_pg_bindir(apt_log)
        run_as = postgres_user()
        kwargs: dict = dict(user=run_as[0], group=run_as[1], extra_groups=[]) if run_as else {}
        out = subprocess.run([str(bindir / "pg_ctl"), "promote", "-D", str(self.home / "data"), "-w", "-t", "60"],
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, **kwargs)
        if out.returncode != 0:
            raise StackError(f"{self.name}: pg_ctl promote failed: {out.stderr.strip() or out.stdout.strip()}")
        self.primary = True
        if self.peer is not None:
            self.peer.primary = False
        record_primary(self.keys_home, self.name)
        return time.monotonic() - t0


def record_primary(keys: Path, name: str) -> None:
    (keys / "primary").write_text(name + "\n")


def current_primary(keys: Path) -> str:
    path = keys / "primary"
    name = path.read_text().strip() if path.exists() else ""
    return name if name in NAMES else NAMES[0]


def replicated_postgres(root: Path, ports: Ports) -> list[PostgresNode]:
    """The primary and the standby, in start order (the standby after the primary is up)."""
    keys = root / "postgres-keys"
    keys.mkdir(parents=True, exist_ok=True)
    primary_name = current_primary(keys)
    all_ports = [ports[name] for name in NAMES]
    hba_type = "hostssl"
    nodes = {name: PostgresNode(root / name, ports[name], name=name, keys=keys, client_ports=all_ports,
                                primary=name == primary_name,
                                extra_options=["-c", "wal_level=replica", "-c", "max_wal_senders=6",
                                               "-c", "wal_keep_size=512MB", "-c", "hot_standby=on",
                                               "-c", f"synchronous_standby_names={SYNC_NAMES}"])
             for name in NAMES}
    for name, node in nodes.items():
        if not node.tls:
            hba_type = "host"
        node.extra_hba = f"{hba_type} replication {pg_roles.REPLICATION_ROLE} {HOST}/32 scram-sha-256\n"
        node.peer = nodes[NAMES[1] if name == NAMES[0] else NAMES[0]]
    record_primary(keys, primary_name)
    primary = nodes[primary_name]
    assert primary.peer is not None
    return [primary, primary.peer]
