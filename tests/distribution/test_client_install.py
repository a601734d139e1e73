"""`pip install runstate` is the worker and subscriber client: it needs only aiokafka,
pydantic and pydantic-settings, installs next to prefect==3.9.1, and from that environment drives a run through
the real service. The service, gateway and CLI come with the [server] extra."""

from __future__ import annotations

import asyncio
import email.parser
import json
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import psycopg
import pytest
from packaging.requirements import Requirement

import runstate
from audit.support import dsn
from pipeline.harness import InProcessService, isolated_settings, settings_env
from runstate.__main__ import SERVER_MODULES

from .client_env import REPO, build_wheel, client_python, unpack

CLIENT_MODULES = ("runstate", "runstate.client", "runstate.messages", "runstate.domain", "runstate.config")


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def test_the_base_install_requires_only_aiokafka_pydantic_and_pydantic_settings_as_ranges(wheel):
    metadata = wheel_metadata(wheel)
    requirements = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    base = [r for r in requirements if r.marker is None]
    assert sorted(r.name for r in base) == ["aiokafka", "pydantic", "pydantic-settings"]
    server = {r.name for r in requirements if r.marker is not None and r.marker.evaluate({"extra": "server"})}
    assert {"faststream", "sqlalchemy", "psycopg", "alembic", "typer", "rich", "fastapi", "uvicorn", "uvloop"} <= server
    pinned = [str(r) for r in requirements if any(s.operator in ("==", "===") for s in r.specifier)]
    assert pinned == []  # exact versions live in constraints.txt
    assert metadata["Version"] == runstate.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "Programming Language :: Python :: 3.11" in metadata.get_all("Classifier")


def test_the_wheel_holds_every_package_data_file(wheel):
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["runstate"]
    package = REPO / "services" / "runstate"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for pattern in patterns:
        files = sorted(package.glob(pattern))
        assert files, f"package-data pattern {pattern!r} matches no file"
        missing = [f for f in files if f"runstate/{f.relative_to(package)}" not in names]
        assert missing == []


BLOCK_SERVER_MODULES = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in {sorted(SERVER_MODULES)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Absent())
"""


def test_the_client_imports_without_the_server_dependencies():
    script = BLOCK_SERVER_MODULES + f"""
import json
for module in {CLIENT_MODULES!r}:
    __import__(module)
from runstate.client import RunstateClient, set_state_command, state, state_changes
loaded = sorted({{m.partition(".")[0] for m in sys.modules}} & set({sorted(SERVER_MODULES)!r}))
print(json.dumps(loaded))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_the_command_line_without_the_server_extra_says_what_to_install():
    script = BLOCK_SERVER_MODULES + "sys.argv = ['runstate', '--version']\nfrom runstate.__main__ import main\nmain()\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("error: the runstate command line needs the server extra")
    assert "pip install 'runstate[server]'" in done.stderr


WORKER = """
import asyncio, json, sys, uuid
import prefect
from prefect.client.schemas.objects import StateType as PrefectStateType
import runstate
from runstate.client import RunstateClient, state

async def main():
    run = uuid.uuid4()
    async with RunstateClient() as client:
        created = await client.create_task_run(run, name="worker-next-to-prefect")
        answers = [await client.propose(run, state(PrefectStateType(t).value)) for t in ("RUNNING", "COMPLETED")]
    print(json.dumps({
        "prefect": prefect.__version__,
        "runstate": runstate.__file__,
        "run": str(run),
        "created": created.state_appended,
        "answers": [[a.status, a.result.state.type] for a in answers],
    }))

asyncio.run(main())
"""


@pytest.mark.kafka
@pytest.mark.postgres
async def test_a_worker_next_to_prefect_drives_a_run_through_runstate(base_settings, wheel, tmp_path):
    python = await asyncio.to_thread(client_python, wheel)
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    overlay = unpack(wheel, tmp_path / "current")
    settings = isolated_settings(base_settings)
    env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(overlay)}
    async with InProcessService(settings):
        done = await asyncio.to_thread(
            subprocess.run, [str(python), "-c", WORKER], env=env, cwd=tmp_path,
            capture_output=True, text=True, timeout=300, check=False,
        )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["prefect"] == "3.9.1"
    assert Path(report["runstate"]).is_relative_to(overlay)  # the wheel of this source, in Prefect's venv
    assert report["created"] is True
    assert report["answers"] == [["ACCEPT", "RUNNING"], ["ACCEPT", "COMPLETED"]]
    with psycopg.connect(dsn(settings.database_url)) as conn:
        row = conn.execute("SELECT state_type, last_seq FROM task_runs WHERE id = %s", (report["run"],)).fetchone()
    assert row == ("COMPLETED", 3)
