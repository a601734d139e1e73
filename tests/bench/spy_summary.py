"""Where a consumer's CPU goes, from py-spy's raw (collapsed) stacks, by part of the decide path.

    py-spy record --format raw -r 400 -o decide.raw -- .venv/bin/python tests/bench/decide_profile.py --batch 1000
    .venv/bin/python tests/bench/spy_summary.py decide.raw [--us 123]   # --us: the consumer's µs/command

Each sample goes to the first part (in the order of PARTS) one of its frames names; the shares are
of the samples that fall in any part but the harness. With --us, each share is also shown in µs.
"""

from __future__ import annotations

import argparse
from collections import Counter

# (part, frame markers): a sample belongs to the first part any of whose markers a frame starts with.
PARTS = (
    ("event row and its hash (EventRow.of, event_hash)", ("of (runstate/pipeline/ports.py", "event_hash (")),
    ("context: clock, ids, draw (_context)", ("_context (",)),
    ("rules (decide, apply_initial_state)", ("decide (runstate/domain/", "apply_initial_state (")),
    ("messages and payload JSON (_record_task_decision)", ("_record_task_decision (",)),
    ("parse and validate (parse_record)", ("parse_record (",)),
    ("record and its digest (IncomingRecord)", ("__init__ (<string>", "__post_init__ (runstate/pipeline/records")),
    ("store read (read_snapshot)", ("read_snapshot (",)),
    ("store write (append, commit)", ("append (runstate/store", "commit (runstate/store", "_write (")),
    ("publish (Kafka)", ("publish (runstate/pipeline/kafka",)),
    ("batch bookkeeping (decide_batch, other)", ("decide_batch (",)),
    ("consumer, other (handle_records)", ("handle_records (",)),
)
HARNESS = "harness and the rest"


def frame(text: str) -> str:
    # "name (/long/path/services/runstate/x.py:12)" -> "name (runstate/x.py"; other paths to their file name.
    name, _, where = text.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    at = path.find("runstate/")
    return f"{name} ({path[at:] if at >= 0 else path.rsplit('/', 1)[-1]}"


def summarise(path: str) -> Counter[str]:
    parts: Counter[str] = Counter()
    with open(path) as lines:
        for line in lines:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            frames = [frame(f) for f in stack.split(";")]
            for name, markers in PARTS:
                if any(f.startswith(markers) for f in frames):
                    parts[name] += int(count)
                    break
            else:
                parts[HARNESS] += int(count)
    return parts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw")
    p.add_argument("--us", type=float, default=None, help="µs of CPU per command the parts add up to")
    a = p.parse_args()
    parts = summarise(a.raw)
    counted = sum(n for name, n in parts.items() if name != HARNESS)
    for name, _ in PARTS:
        if parts[name]:
            share = parts[name] / counted
            print(f"{100 * share:5.1f} %" + (f" {share * a.us:6.1f} µs" if a.us else "") + f"  {name}")
    print(f"({parts[HARNESS]} of {counted + parts[HARNESS]} samples outside these parts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
