"""Fixtures of the fault suite.

RUNSTATE_FAULT_SCALE=ci (default, inside `make test`) runs small workloads;
RUNSTATE_FAULT_SCALE=full (`make faults`) runs >= 20,000 commands per scenario
and >= 100,000 generated records in the fuzzer (RUNSTATE_FAULT_COMMANDS and
RUNSTATE_FAULT_FUZZED override the sizes). RUNSTATE_FAULT_SEED fixes the workloads
(default 20240917). RUNSTATE_FAULTS_REPORT, when set, names a file that every
scenario appends its report to (one JSON object a line; run_faults.py reads it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from .checker import Report


@dataclass(frozen=True)
class Scale:
    name: str
    commands: int  # per scenario
    fuzzed: int  # records the fuzzer generates
    seed: int

    @property
    def full(self) -> bool:
        return self.name == "full"

    def pick(self, ci, full):
        return full if self.full else ci


@pytest.fixture(scope="session")
def scale() -> Scale:
    name = os.environ.get("RUNSTATE_FAULT_SCALE", "ci").strip().lower() or "ci"
    if name not in ("ci", "full"):
        pytest.fail(f"RUNSTATE_FAULT_SCALE={name!r}: expected ci or full", pytrace=False)
    seed = int(os.environ.get("RUNSTATE_FAULT_SEED", "20240917"))
    if name == "full":
        return Scale("full", int(os.environ.get("RUNSTATE_FAULT_COMMANDS", "20000")),
                     int(os.environ.get("RUNSTATE_FAULT_FUZZED", "100000")), seed)
    return Scale("ci", int(os.environ.get("RUNSTATE_FAULT_COMMANDS", "1500")),
                 int(os.environ.get("RUNSTATE_FAULT_FUZZED", "3000")), seed)


@pytest.fixture(scope="session")
def publish_report():
    path = os.environ.get("RUNSTATE_FAULTS_REPORT")

    def publish(report: Report) -> None:
        print("\n" + report.line())
        for p in report.problems:  # a few of each kind (checker.PROBLEMS_SHOWN)
            print("   ", p)
        if path:
            with Path(path).open("a") as out:
                out.write(report.as_json() + "\n")

    return publish


@pytest.fixture
def scratch_settings(base_settings):
    """base_settings on a new, migrated database of its own (dropped afterwards),
    so that `runstate replay --verify --all` covers exactly what the test wrote
    and the records a test leaves behind cannot fail another's checks."""
    from audit.support import scratch_database
    from runstate.database_urls import reveal

    with scratch_database(reveal(base_settings.admin_database_url), reveal(base_settings.database_url),
                          "faults") as (app, admin):
        yield base_settings.replace(database_url=app, admin_database_url=admin)
