"""The checker's comparison with the reference (checker.compare_with_reference), on logs made
in-process: a log whose partitions stalled part-way is lost, not forked (its tagged runs still
hold the slots they held at that point), while a leaked slot, a decision left out of the middle
of a run or a different decision is still forked."""

from __future__ import annotations

from .checker import Report, compare_with_reference
from .workload import Reference, RunPlan, Step, Workload, generate, reference


def stalled(workload: Workload, ref: Reference) -> tuple[dict, dict[str, int]]:
    """The log and the tags' slots after every run of phase 1 stopped half-way, phase 2 never
    sent (a stalled partition): the cut runs decided together, as the consumer would."""
    runs = []
    for run in workload.phase(1):
        keep = len(ref.paths[run.stream_id]) // 2
        cmds, events = [], 0
        for cmd in run.commands:
            if events == keep:
                break
            cmds.append(cmd)
            events += cmd.retry_of is None  # a retry is answered with the stored decision
        if cmds:
            runs.append(RunPlan(run.stream_id, run.kind, run.phase, cmds))
    cut = reference(Workload(workload.seed, workload.salt, runs, workload.tag_limits))
    for sid, path in cut.paths.items():
        assert path == ref.paths[sid][:len(path)]
    return cut.paths, cut.active_slots


def compared(got: dict, ref: Reference, slots: dict[str, int]) -> Report:
    rep = Report("checker")
    compare_with_reference(rep, got, ref, slots, list(ref.active_slots))
    return rep


def test_a_stall_is_lost_not_forked():
    workload = generate(20240917, 600, salt="checker")
    ref = reference(workload)
    got, slots = stalled(workload, ref)
    assert slots != ref.active_slots, "the stall should leave tagged runs holding slots"
    rep = compared(got, ref, slots)
    assert rep.lost > 0 and rep.forked == 0, rep.problems


def test_a_leaked_slot_is_forked_stalled_or_not():
    workload = generate(20240917, 600, salt="checker")
    ref = reference(workload)
    got, slots = stalled(workload, ref)
    tag = next(iter(slots))
    rep = compared(got, ref, {**slots, tag: slots[tag] + 1})
    assert rep.forked == 1 and f"tag {tag}" in rep.problems[-1], rep.problems
    rep = compared(ref.paths, ref, {**ref.active_slots, tag: ref.active_slots[tag] + 1})
    assert (rep.lost, rep.forked) == (0, 1), rep.problems
    assert compared(ref.paths, ref, ref.active_slots).ok


def test_a_decision_missing_from_the_middle_or_different_is_forked():
    workload = generate(20240917, 600, salt="checker")
    ref = reference(workload)
    sid = next(s for s, path in ref.paths.items() if len(path) >= 3)
    path = ref.paths[sid]
    other: Step = (path[1][0], "REJECT" if path[1][1] != "REJECT" else "ACCEPT", *path[1][2:])
    for mine in ([path[0], *path[2:]], [path[0], other, *path[2:]]):
        rep = compared({**ref.paths, sid: mine}, ref, ref.active_slots)
        assert rep.forked == 1 and rep.problems[-1].startswith(f"forked: run {sid}"), rep.problems
