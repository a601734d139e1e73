"""`python deploy/stack up|down|status|env`: the command line of the default LocalStack."""

from __future__ import annotations

import argparse
import shlex
import sys

from .envfile import shown
from .local import LocalStack
from .output import StackError, say, tail
from .ports import HOST

DESCRIPTION = ("Local runstate stack: a single-node Kafka (KRaft) and a throwaway PostgreSQL cluster, "
               "started as plain processes from the repository, plus the long-running runstate services.")


def cmd_up(stack: LocalStack, args: argparse.Namespace) -> int:
    try:
        stack.up(servers_only=args.servers_only)
    except StackError as err:
        print(f"error: {err.line}", file=sys.stderr, flush=True)
        if err.log is not None:
            text = tail(err.log)
            if text:
                print(f"--- last lines of {err.log} ---\n{text}\n---", file=sys.stderr, flush=True)
        return 1
    return 0


def cmd_down(stack: LocalStack, _args: argparse.Namespace) -> int:
    stack.down()
    return 0


def cmd_status(stack: LocalStack, _args: argparse.Namespace) -> int:
    status = stack.status()
    if not status:
        say("down (no stack recorded)")
        return 3
    for c, up in status:
        if c.external is not None:
            where = f"external {c.probe_host}:{c.probe_port}"
        else:
            where = f"pid {c.pid}" + (f"  {HOST}:{c.port}" if c.port else "")
        say(f"{c.name:<10} {'up' if up else 'DOWN':<5} {where}")
    return 0 if all(up for _, up in status) else 3


def cmd_env(stack: LocalStack, _args: argparse.Namespace) -> int:
    if not stack.env_file.exists():
        print("the stack is not up (.runstate/env missing): run 'make up'", file=sys.stderr)
        return 1
    print("# passwords hidden (***): load .runstate/env itself, e.g. set -a; . .runstate/env; set +a")
    for key, value in stack.env().items():
        print(f"export {key}={shlex.quote(shown(key, value))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/stack", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, text in (("up", cmd_up, "start the stack (no-op when already up)"),
                           ("down", cmd_down, "stop exactly what `up` started"),
                           ("status", cmd_status, "show the stack; exit 0 when everything is up, 3 otherwise"),
                           ("env", cmd_env, "print .runstate/env, passwords hidden")):
        command = sub.add_parser(name, help=text)
        command.set_defaults(fn=fn)
        if name == "up":
            command.add_argument("--servers-only", action="store_true",
                                 help="start Kafka and PostgreSQL only, not the runstate services")
    args = parser.parse_args(argv)
    return args.fn(LocalStack(), args)
