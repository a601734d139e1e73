"""The local stack (deploy/stack): its command line reports the servers up while the tests
run, LocalStack reads the same records, and what it writes the rest of the repository reads."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from runstate.envfile import find_env_file, read_env_file
from stack import LocalStack
from stack.envfile import write_env_file
from stack.ports import Ports, free_port
from stack.records import Record

REPO = Path(__file__).resolve().parents[2]


def local_only(test_backend: str) -> None:
    if test_backend != "local":
        pytest.skip("RUNSTATE_TEST_BACKEND=testcontainers: the servers are containers, not deploy/stack's")


@pytest.mark.kafka
@pytest.mark.postgres
def test_stack_status_reports_kafka_and_postgres_up(test_backend: str, kafka_bootstrap: str, database_url: str) -> None:
    local_only(test_backend)
    result = subprocess.run([sys.executable, str(REPO / "deploy" / "stack"), "status"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines() if line.strip()}
    # One kafka and one postgres, or (RUNSTATE_STACK=replicated) kafka-1..3, postgres-a and -b.
    for server in ("kafka", "postgres"):
        states = [v for k, v in lines.items() if k.split("-")[0] == server]
        assert states and all(v == "up" for v in states), result.stdout


@pytest.mark.kafka
@pytest.mark.postgres
def test_local_stack_reads_what_the_command_line_started(test_backend: str, kafka_bootstrap: str,
                                                         database_url: str) -> None:
    local_only(test_backend)
    stack = LocalStack()
    status = {rec.name: up for rec, up in stack.status()}
    for server in ("kafka", "postgres"):
        states = [up for name, up in status.items() if name.split("-")[0] == server]
        assert states and all(states), status
    assert stack.env()["KAFKA_BOOTSTRAP_SERVERS"] == kafka_bootstrap
    assert database_url in (stack.env()["DATABASE_URL"], stack.service_env()["RUNSTATE_CONSUMER_DATABASE_URL"])
    # .runstate/env, as runstate reads it, says what the stack's records say.
    assert read_env_file(stack.env_file) == stack.env()


def test_env_file_round_trips_values_the_shell_would_mangle(tmp_path: Path) -> None:
    values = {
        "PLAIN": "127.0.0.1:9092",
        "SPACES": "a b  c",
        "QUOTES": "it's \"quoted\"",
        "SHELL": "$HOME `id` \\ ; & | *",
        "EMPTY": "",
        "URL": "postgresql+psycopg://u:p%40ss@127.0.0.1:5432/runstate?sslmode=verify-full",
    }
    path = tmp_path / ".runstate" / "env"
    path.parent.mkdir()
    write_env_file(path, values)
    assert read_env_file(path) == values
    # and the shell reads the same values
    script = f"set -a; . {path}; set +a; " + "; ".join(f'printf "%s\\0" "${k}"' for k in values)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split("\0")[:-1] == list(values.values())
    # found from a folder below
    below = tmp_path / "a" / "b"
    below.mkdir(parents=True)
    assert find_env_file(below) == path


def test_an_empty_stack_folder_has_nothing_to_show_or_stop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stack = LocalStack(tmp_path, services=[], use_environment=False)
    assert stack.status() == []
    assert stack.env() == {}
    stack.down()
    assert "nothing to stop" in capsys.readouterr().out


def test_ports_of_the_previous_run_are_reused_only_when_free() -> None:
    previous = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        ports = Ports({"a": previous, "b": taken})
        assert ports["a"] == previous
        assert ports["b"] != taken
        assert ports["b"] == ports["b"]  # chosen once per run
    assert set(ports.chosen) == {"a", "b"}


def test_state_files_of_earlier_stacks_still_load() -> None:
    # As deploy/stack.py (a single module) wrote state.json: `down` must still stop these.
    local = json.loads('{"pid": 7081, "start_time": 28663, "pgid": 7081, "argv": ["/usr/bin/java"], '
                       '"log": "/x/server.log", "stop_signal": 15, "name": "kafka", "port": 46429}')
    external = json.loads('{"name": "postgres", "external": "postgresql+psycopg://u@db:5432/runstate", '
                          '"probe_host": "db", "probe_port": 5432}')
    for data in (local, external):
        rec = Record.from_json(data)
        assert rec.to_json() == data
    assert Record.from_json(local).stop_signal == signal.SIGTERM
    assert Record.from_json(external).describe() == "postgres external db:5432"


@pytest.mark.kafka
@pytest.mark.postgres
def test_the_stacks_gateway_requires_the_auth_string_its_env_file_gives_clients(test_backend: str,
                                                                                 kafka_bootstrap: str) -> None:
    local_only(test_backend)
    env = LocalStack().env()
    if "RUNSTATE_HTTP_URL" not in env:
        pytest.skip("the stack was started without its services")
    request = urllib.request.Request(env["RUNSTATE_HTTP_URL"] + f"/task_runs/{uuid.uuid4()}")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 401
    token = base64.b64encode(env["PREFECT_API_AUTH_STRING"].encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with pytest.raises(urllib.error.HTTPError) as unknown:
        urllib.request.urlopen(request, timeout=30)
    assert unknown.value.code == 404  # let in, and the run is not there


def test_free_ports_are_outside_the_ephemeral_range_and_not_handed_out_twice() -> None:
    # Outgoing connections take their local ports from the ephemeral range: a listener's port
    # chosen there could be taken before the listener binds it.
    from stack.ports import LISTEN_PORTS_LOW, ephemeral_low

    high = ephemeral_low()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(LISTEN_PORTS_LOW <= port < high for port in ports), (high, sorted(ports)[-3:])


def test_free_port_skips_a_port_something_listens_on(monkeypatch) -> None:
    import stack.ports as ports_module

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports_module.free_port()))
        busy.listen()
        taken = busy.getsockname()[1]
        picks = iter([taken, taken + 1 if taken + 1 < ports_module.ephemeral_low() else taken - 1])
        monkeypatch.setattr(ports_module._choice, "randrange", lambda lo, hi: next(picks))
        assert ports_module.free_port() != taken
