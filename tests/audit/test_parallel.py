"""`run_ranges`: every range is worked on exactly once, by a worker process or by the parent."""

from __future__ import annotations

import uuid

import pytest

from runstate.audit.parallel import StreamRange, run_ranges

RANGES = [StreamRange(uuid.UUID(int=i), uuid.UUID(int=i + 1)) for i in range(7)]


@pytest.mark.parametrize("ordered", [True, False])
def test_the_parent_takes_ranges_of_its_own_and_the_processes_the_rest(ordered):
    here: list[StreamRange] = []

    def local(streams: StreamRange) -> str:
        here.append(streams)
        return "here " + repr(streams)

    # `repr` runs in the worker process: a builtin, so the spawned child can unpickle it.
    results = list(run_ranges(repr, RANGES, (), workers=2, ordered=ordered, local=local))

    assert sorted(r.removeprefix("here ") for r in results) == sorted(repr(r) for r in RANGES)
    assert here, "the parent worked on none"
    # The pool is handed two ranges before the parent takes any, so it worked on some.
    assert len(here) <= len(RANGES) - 2
    assert {r for r in results if r.startswith("here ")} == {"here " + repr(r) for r in here}
    if ordered:
        assert [r.removeprefix("here ") for r in results] == [repr(r) for r in RANGES]


def test_without_a_local_task_only_the_processes_work():
    assert list(run_ranges(repr, RANGES, (), workers=2)) == [repr(r) for r in RANGES]


def test_one_worker_with_a_local_task_is_the_parent_alone():
    here: list[StreamRange] = []
    results = list(run_ranges(repr, RANGES, (), workers=1, local=lambda r: here.append(r) or repr(r)))
    assert results == [repr(r) for r in RANGES]
    assert sorted(here, key=repr) == sorted(RANGES, key=repr)
