"""deploy/stack.py status reports both servers up while the tests run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.kafka
@pytest.mark.postgres
def test_stack_status_reports_kafka_and_postgres_up(test_backend: str, kafka_bootstrap: str, database_url: str) -> None:
    if test_backend != "local":
        pytest.skip("RUNSTATE_TEST_BACKEND=testcontainers: the servers are containers, not deploy/stack.py's")
    result = subprocess.run([sys.executable, str(REPO / "deploy" / "stack.py"), "status"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines() if line.strip()}
    assert lines.get("kafka") == "up", result.stdout
    assert lines.get("postgres") == "up", result.stdout
