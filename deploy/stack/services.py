"""The long-running runstate processes that `up` starts once Kafka and PostgreSQL are ready."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .layout import REPO, Layout
from .output import StackError, say
from .ports import HOST, Ports
from .processes import Launcher, exited
from .records import Record
from .security import write_private


@dataclasses.dataclass
class Context:
    """What a service sees when `up` starts it."""

    env: dict[str, str]  # connection variables so far (infrastructure + earlier services' exports)
    ports: Ports  # ports chosen for this run, by name
    layout: Layout
    # The services' own credentials (.runstate/service.env): the service principal's Kafka login and
    # the database roles' URLs, never in .runstate/env. Every service process gets them,
    # except the database URLs (RUNSTATE_ADMIN_DATABASE_URL, RUNSTATE_<ROLE>_DATABASE_URL):
    # a service gets only its own role's, as DATABASE_URL (Service.env); prepare gets the owner's.
    service_env: dict[str, str] = dataclasses.field(default_factory=dict)

    def port(self, name: str) -> int:
        """A free port for `name`, the previous run's one when it is still free."""
        return self.ports[name]

    def dir(self, name: str) -> Path:
        return self.layout.dir(name)


@dataclasses.dataclass
class Service:
    """A long-running runstate process that `up` starts after Kafka and PostgreSQL are ready,
    in list order, and `down` stops in reverse order.

    exports(ctx) -> extra variables for .runstate/env (e.g. RUNSTATE_HTTP_URL); computed before
    the start so that argv can use them. prepare(ctx) -> one-shot commands run to completion
    before the start (e.g. the migrations). argv(ctx) -> the command (run with the environment of
    `up` plus ctx.env). ready(ctx) -> True once the service serves; polled for `timeout` s.
    `port`, if given, names a ctx port that status checks. env(ctx) -> variables that only this
    service's process gets (its own database role); prepare runs with the owner's URL as well."""

    name: str
    argv: Callable[[Context], list[str]]
    ready: Callable[[Context], bool]
    exports: Callable[[Context], dict[str, str]] = lambda ctx: {}
    prepare: Callable[[Context], list[list[str]]] = lambda ctx: []
    env: Callable[[Context], dict[str, str]] = lambda ctx: {}
    timeout: float = 30.0
    stop_signal: int = signal.SIGTERM
    port: str | None = None


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether `url` answers 2xx now (a probe: /ready answers 503 until it is)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def role_url(ctx: Context, role_var: str) -> dict[str, str]:
    """DATABASE_URL as the role of `role_var` (e.g. RUNSTATE_CONSUMER_DATABASE_URL) when the
    stack made one; an external server named by DATABASE_URL alone keeps that URL."""
    url = ctx.service_env.get(role_var)
    return {"DATABASE_URL": url} if url else {}


def gateway_auth(ctx: Context) -> str:
    """The `user:password` the stack's gateway requires (Prefect's PREFECT_API_AUTH_STRING),
    made once per stack folder and kept (0600) so restarts do not log clients out."""
    path = ctx.dir("gateway") / "auth-string"
    if not path.exists():
        write_private(path, f"runstate:{secrets.token_urlsafe(24)}")
    return path.read_text().strip()


def runstate_cli(*args: str) -> list[str]:
    """The project's CLI, run by this interpreter (the virtualenv's, under make)."""
    return [sys.executable, "-m", "runstate.cli", *args]


# The long-running runstate processes, in start order.
SERVICES: list[Service] = [
    # The consumer service (`runstate serve`): applies the migrations first, then joins the
    # consumer group on the command topic; ready once its own /ready says so (in the group,
    # the database answers, no outage, the producer started). /metrics is on the same port.
    Service(
        name="consumer",
        prepare=lambda ctx: [runstate_cli("db", "upgrade")],
        argv=lambda ctx: runstate_cli("serve", "--metrics-port", str(ctx.port("consumer"))),
        ready=lambda ctx: http_ok(f"{ctx.env['RUNSTATE_CONSUMER_URL']}/ready"),
        env=lambda ctx: role_url(ctx, "RUNSTATE_CONSUMER_DATABASE_URL"),
        port="consumer",
        exports=lambda ctx: {"RUNSTATE_CONSUMER_URL": f"http://{HOST}:{ctx.port('consumer')}"},
        timeout=60.0,
    ),
    # The Prefect-compatible HTTP gateway; PREFECT_API_URL can point at RUNSTATE_HTTP_URL.
    Service(
        name="gateway",
        argv=lambda ctx: runstate_cli("gateway", "--host", HOST, "--port", str(ctx.port("gateway")),
                                      "--log-level", "WARNING"),
        ready=lambda ctx: http_ok(f"http://{HOST}:{ctx.port('gateway')}/api/ready"),
        env=lambda ctx: {**role_url(ctx, "RUNSTATE_GATEWAY_DATABASE_URL"),
                         "RUNSTATE_GATEWAY_AUTH_STRING": gateway_auth(ctx)},
        port="gateway",
        # HTTP clients (Prefect's included) read PREFECT_API_AUTH_STRING and send basic auth.
        exports=lambda ctx: {"RUNSTATE_HTTP_URL": f"http://{HOST}:{ctx.port('gateway')}/api",
                             "PREFECT_API_AUTH_STRING": gateway_auth(ctx)},
        timeout=60.0,
    ),
]


def start_service(svc: Service, ctx: Context, launcher: Launcher) -> Record:
    t0 = time.monotonic()
    ctx.env.update(svc.exports(ctx))
    log = ctx.dir(svc.name) / f"{svc.name}.log"
    # The migrations run as the owner; the service itself gets its own database role only,
    # never the owner's URL nor another role's (the *_DATABASE_URL of service.env).
    own = {k: v for k, v in os.environ.items() if k != "RUNSTATE_ADMIN_DATABASE_URL"}
    own.update(ctx.env)
    own.update({k: v for k, v in ctx.service_env.items() if not k.endswith("_DATABASE_URL")})
    own.update(svc.env(ctx))
    env = {**own, **ctx.service_env, **svc.env(ctx)}
    for argv in svc.prepare(ctx):
        with open(log, "ab") as out:
            out.write(f"$ {shlex.join(argv)}\n".encode())
            out.flush()
            rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                                env=env).returncode
        if rc != 0:
            raise StackError(f"{svc.name}: `{shlex.join(argv[1:] if argv[0] == sys.executable else argv)}` "
                             f"failed (exit code {rc})", log)
    rec = launcher.spawn(svc.name, svc.argv(ctx), log, cwd=REPO, env=own,
                         stop_signal=svc.stop_signal, port=ctx.port(svc.port) if svc.port else None)
    deadline = time.monotonic() + svc.timeout
    while not svc.ready(ctx):
        code = exited(rec)
        if code is not None:
            raise StackError(f"{svc.name} exited during startup (exit code {code})", log)
        if time.monotonic() > deadline:
            raise StackError(f"{svc.name} did not become ready within {svc.timeout:.0f} s", log)
        time.sleep(0.5)
    say(f"{svc.name}: ready in {time.monotonic() - t0:.1f} s (pid {rec.pid})")
    return rec
