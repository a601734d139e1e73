"""The `runstate` command as a process: its version, its exit codes, JSON logs from the two
servers, and progress bars only on a terminal."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pty
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path

import pytest

import runstate
from pipeline.harness import isolated_settings, settings_env
from stack.ports import free_port

from .conftest import REPO, run_cli

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


def test_version_is_the_one_version():
    installed = importlib.metadata.version("runstate")
    assert runstate.__version__ == installed
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    script = Path(sys.executable).parent / "runstate"
    for argv in ([str(script)], [sys.executable, "-m", "runstate"], [sys.executable, "-m", "runstate.cli"]):
        done = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=60, check=False)
        assert (done.returncode, done.stdout, done.stderr) == (0, f"runstate {installed}\n", "")


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["history", "not-a-uuid"], 2),
        (["replay"], 2),  # without --verify
        (["backfill", "--since", "yesterday"], 2),
        (["no-such-command"], 2),
        (["history", str(uuid.UUID(int=1))], 1),
        (["concurrency-limit", "get", "no-such-tag"], 1),
    ],
)
def test_exit_codes(cli_env, args, code):
    done = run_cli(cli_env, *args, "--json")
    assert done.returncode == code, done.stderr
    assert done.stdout == ""  # a failure writes no half a document
    assert done.stderr.strip()


def test_unreachable_database_is_exit_1_for_db_commands(cli_env):
    env = {**cli_env, "RUNSTATE_ADMIN_DATABASE_URL": "postgresql+psycopg://runstate_owner@127.0.0.1:1/runstate"}
    for args in (["db", "current", "--json"], ["db", "upgrade", "--json"]):
        done = run_cli(env, *args, timeout=60)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("error: PostgreSQL is unreachable") and len(done.stderr.splitlines()) == 1


def _json_lines(text: str) -> list[dict]:
    lines = [json.loads(line) for line in text.splitlines()]
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
    return lines


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def test_serve_json_logs_are_json_lines(cli_settings):
    env = {**os.environ, **settings_env(isolated_settings(cli_settings))}
    proc = subprocess.Popen([sys.executable, "-m", "runstate", "serve", "--json"], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stdout:  # until the service says it started (or the process ends)
            seen.append(line)
            if "started successfully" in line:
                break
    finally:
        out, err = _stop(proc)
    lines = _json_lines("".join(seen) + out)
    loggers = {line["logger"].split(".")[0] for line in lines}
    assert {"faststream", "aiokafka"} <= loggers, loggers  # the libraries' own loggers too
    assert any("started successfully" in line["message"] for line in lines)
    assert err == ""


def test_gateway_json_logs_are_json_lines(cli_env, decided_run):  # decided_run: the topics exist
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runstate", "gateway", "--port", str(port), "--json"],
                            env={**os.environ, **cli_env}, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # A bound, not a timing assertion: the gateway's start (imports, Kafka, PostgreSQL) is
        # waited for, and can take a minute or more on a loaded machine.
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as answer:
                    assert answer.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read() + proc.stderr.read()
                assert time.monotonic() < deadline, "the gateway did not answer /api/health"
                time.sleep(0.1)
    finally:
        out, err = _stop(proc)
    lines = _json_lines(out)
    assert any(line["logger"] == "uvicorn.access" and "/api/health" in line["message"] for line in lines), out
    assert err == ""


def test_progress_bar_only_on_a_terminal(cli_env, decided_run):
    args = [sys.executable, "-m", "runstate", "replay", "--verify", "--json"]
    env = {**os.environ, **cli_env, "TERM": "xterm-256color", "COLUMNS": "100"}

    plain = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert plain.returncode == 0, plain.stderr
    assert plain.stderr == ""
    report = json.loads(plain.stdout)

    main, secondary = pty.openpty()  # stderr on a terminal, stdout still a pipe
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=secondary, text=True)
    os.close(secondary)
    screen = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(main)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert json.loads(out) == report  # stdout is the same document, the bar is not in it
    assert b"replaying" in screen and f"{report['events']}/{report['events']}".encode() in screen
