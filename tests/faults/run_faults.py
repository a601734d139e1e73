#!/usr/bin/env python3
"""`make faults`: run every fault scenario and the bad-input fuzzer at full
size (RUNSTATE_FAULT_SCALE=full unless set otherwise), then print the counts.
The last line of the output always has the fixed form

    faults: scenarios=<n> names=<name>,<name>,... commands=<n> lost=<n> duplicated=<n> forked=<n> fuzzed=<n> dead_lettered=<n> internal_errors=<n>

`internal_errors` counts answers with the error code orchestration_failed (a
bug in runstate, whatever the input) in every scenario and in the fuzzer.
Exit status: pytest's (non-zero when any scenario failed or did not report).
Extra arguments go to pytest (e.g. -k zombie)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    env.setdefault("RUNSTATE_FAULT_SCALE", "full")
    with tempfile.NamedTemporaryFile(prefix="runstate-faults-", suffix=".jsonl", delete=False) as fh:
        report_path = Path(fh.name)
    env["RUNSTATE_FAULTS_REPORT"] = str(report_path)
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", str(HERE), "-m", "faults", "-p", "no:cacheprovider", "-q", "-s",
           "-rfEs", *argv]
    print("+ " + " ".join(cmd), flush=True)
    status = subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode
    reports = [json.loads(line) for line in report_path.read_text().splitlines() if line.strip()]
    report_path.unlink(missing_ok=True)

    scenarios = [r for r in reports if "commands" in r]
    fuzz = [r for r in reports if r.get("scenario") == "fuzz-inputs"]
    print(f"\nscale={env['RUNSTATE_FAULT_SCALE']}  wall time {time.monotonic() - t0:.0f} s")
    print(f"{'scenario':<18}{'commands':>9}{'events':>8}{'results':>9}{'dup.caught':>11}{'faults':>7}"
          f"{'lost':>6}{'dup':>5}{'fork':>6}{'int.err':>8}{'secs':>7}  faults injected")
    for r in scenarios:
        print(f"{r['scenario']:<18}{r['commands']:>9}{r['events']:>8}{r['results']:>9}{r['duplicates_caught']:>11}"
              f"{r['faults']:>7}{r['lost']:>6}{r['duplicated']:>5}{r['forked'] + r['misordered']:>6}"
              f"{r.get('internal_errors', 0):>8}{r['seconds']:>7.0f}  {r['fault_detail'][:160]}")
    for f in fuzz:
        print(f"fuzzer: {f['fuzzed']} generated records, outcomes {f['codes']}, internal errors "
              f"{f.get('internal_errors', 0)}, stalled partitions {f.get('stalled_partitions', 0)}, batch-boundary "
              f"differences {f.get('twin_differences', 0)}, problems {f['fuzz_problems']}")
    if status == 0 and not scenarios:
        status = 1
    lost = sum(r["lost"] for r in scenarios)
    duplicated = sum(r["duplicated"] for r in scenarios)
    forked = sum(r["forked"] + r["misordered"] for r in scenarios)
    # The fuzzer's own report line is among the scenarios too: count its internal errors once.
    internal = sum(r.get("internal_errors", 0) for r in scenarios)
    if status == 0 and (lost or duplicated or forked or internal or any(f["fuzz_problems"] for f in fuzz)):
        status = 1
    names = ",".join(r["scenario"] for r in scenarios)
    print(f"faults: scenarios={len(scenarios)} names={names} commands={sum(r['commands'] for r in scenarios)} "
          f"lost={lost} duplicated={duplicated} forked={forked} fuzzed={sum(f['fuzzed'] for f in fuzz)} "
          f"dead_lettered={sum(r['dead_lettered'] for r in scenarios)} internal_errors={internal}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
