"""Servers named by the environment: when KAFKA_BOOTSTRAP_SERVERS and/or DATABASE_URL are set
as `up` runs, those servers are used (and written through to .runstate/env) instead of
starting local ones."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

from .kafka import KAFKA_READY_TIMEOUT
from .kafka_probes import kafka_probe
from .output import StackError, say
from .ports import HOST, tcp_open
from .postgres import PG_READY_TIMEOUT
from .records import Record
from .security import environment_client_options


def external_settings(environ: Mapping[str, str], last_run: dict[str, Any]) -> dict[str, str]:
    """Connection variables from the environment that point at servers we should use instead of
    starting our own. A value equal to what a previous local stack wrote to .runstate/env (a
    stale `. .runstate/env` in the caller's shell) does not count."""
    local_before = last_run.get("local_env", {})
    ext = {}
    for key in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"):
        val = environ.get(key)
        if val and val != local_before.get(key):
            ext[key] = val
    if "DATABASE_URL" in ext:
        ext["RUNSTATE_ADMIN_DATABASE_URL"] = environ.get("RUNSTATE_ADMIN_DATABASE_URL") or ext["DATABASE_URL"]
    return ext


def external_record(name: str, url: str) -> Record:
    if name == "kafka":
        host, _, port = url.split(",")[0].strip().rpartition(":")
    else:
        parsed = urllib.parse.urlsplit(url)
        host, port = parsed.hostname or HOST, str(parsed.port or 5432)
    return Record(name=name, external=url, probe_host=host.strip("[]") or HOST, probe_port=int(port))


def wait_external(rec: Record) -> None:
    assert rec.external is not None and rec.probe_host is not None and rec.probe_port is not None
    name, url = rec.name, rec.external
    timeout = KAFKA_READY_TIMEOUT if name == "kafka" else PG_READY_TIMEOUT
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    reason = "port closed"
    while True:
        if tcp_open(rec.probe_host, rec.probe_port):
            reason = kafka_probe(url, environment_client_options()) if name == "kafka" else None
            if reason is None:
                break
        if time.monotonic() > deadline:
            what = "Kafka did not become ready" if name == "kafka" else "PostgreSQL did not accept connections"
            raise StackError(f"{what} at {rec.probe_host}:{rec.probe_port} (from the environment) "
                             f"within {timeout:.0f} s ({reason})")
        time.sleep(0.5)
    say(f"{name}: using the existing server from the environment ({rec.probe_host}:{rec.probe_port}, "
        f"reachable after {time.monotonic() - t0:.1f} s)")
