"""Running an audit over the event log in worker processes.

The log is cut into ranges of whole streams (`stream_ranges`): a stream's events are
never split, so each range can be checked or folded on its own. Workers take the next
range as they finish one, so a core slowed by other work does not hold the others up,
and each reads its range in keyset batches, so memory is bounded by a batch, not by
the log. Results come back in range order, which is the log's (stream_id, seq) order:
what an audit reports does not depend on how many workers ran it.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

from sqlalchemy import Connection, text

T = TypeVar("T")

# Ranges per worker: enough that a worker finishing early finds more to take.
RANGES_PER_WORKER = 8
# A range smaller than this is not worth a worker: starting one costs about a second.
MIN_RANGE_EVENTS = 20_000
PROGRESS_POLL_S = 0.2


@dataclass(frozen=True)
class StreamRange:
    """Streams with lo <= stream_id < hi; None is unbounded."""

    lo: UUID | None
    hi: UUID | None

    def condition(self, column: str = "stream_id", paramstyle: str = "named") -> tuple[str, dict[str, Any]]:
        """SQL and parameters: SQLAlchemy's :name (`named`) or psycopg's %(name)s (`pyformat`)."""
        mark = "%({})s" if paramstyle == "pyformat" else ":{}"
        parts, params = [], {}
        if self.lo is not None:
            parts.append(f"{column} >= {mark.format('range_lo')}")
            params["range_lo"] = self.lo
        if self.hi is not None:
            parts.append(f"{column} < {mark.format('range_hi')}")
            params["range_hi"] = self.hi
        return (" AND ".join(parts) or "TRUE"), params


WHOLE_LOG = StreamRange(None, None)


def default_workers() -> int:
    return os.cpu_count() or 1


def plan_ranges(conn: Connection, workers: int, min_events: int = MIN_RANGE_EVENTS,
                max_events: int | None = None) -> list[StreamRange]:
    """The ranges `workers` processes share: RANGES_PER_WORKER each (more if a range would
    exceed max_events), none smaller than min_events; [WHOLE_LOG] when one is enough."""
    if workers <= 1:
        return [WHOLE_LOG]
    events = conn.execute(text("SELECT count(*) FROM events")).scalar_one()
    pieces = workers * RANGES_PER_WORKER
    if max_events:
        pieces = max(pieces, -(-events // max_events))
    return stream_ranges(conn, events, min(pieces, events // max(min_events, 1)))


def stream_ranges(conn: Connection, events: int, pieces: int) -> list[StreamRange]:
    """About `pieces` ranges of whole streams, cut at stream ids sampled from the log
    (a sample of pages, so finding the cuts costs a small fraction of a scan)."""
    if pieces <= 1 or events <= 1:
        return [WHOLE_LOG]
    # ~32 samples a cut point; SYSTEM sampling reads only the sampled pages.
    percent = min(100.0, 100.0 * pieces * 32 / events)
    sampled = conn.execute(
        text(f"SELECT DISTINCT stream_id FROM events TABLESAMPLE SYSTEM ({percent:.6f}) REPEATABLE (17)"
             " ORDER BY stream_id")
    ).scalars().all()
    if len(sampled) < 2:
        return [WHOLE_LOG]
    cuts = sorted({sampled[len(sampled) * i // pieces] for i in range(1, pieces)})
    bounds: list[UUID | None] = [None, *cuts, None]
    return [StreamRange(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


# -- in the worker processes -------------------------------------------------------------

_progress: Any = None


def _init_worker(counter: Any) -> None:
    global _progress
    _progress = counter
    # A worker allocates many short-lived objects and few cycles (as the consumer does).
    gc.set_threshold(50_000, 20, 100)


def report_progress(n: int) -> None:
    """Called by a worker after each batch: the parent turns the sum into its progress bar."""
    if _progress is not None:
        with _progress.get_lock():
            _progress.value += n


# -- in the parent ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Done:
    """A result the parent made itself, read like a finished future's."""

    value: Any

    def result(self) -> Any:
        return self.value


def run_ranges(
    task: Callable[..., T],
    ranges: list[StreamRange],
    args: tuple[Any, ...],
    workers: int,
    on_progress: Callable[[int], None] | None = None,
    ordered: bool = True,
    local: Callable[[StreamRange], T] | None = None,
) -> Iterator[T]:
    """task(range, *args) for every range in `workers` processes; yields the results in
    range order, each as soon as it and every range before it are done (or, not `ordered`,
    each as soon as it is done, so no finished result waits in memory for a slower one).

    With `local`, the parent is one of the `workers`: the pool has one process fewer, and
    the parent runs local(range) on a range of its own whenever no result is waiting for it
    (it starts at once, while the processes are still starting, and what it does needs no
    handing over)."""
    # spawn: the parent may hold database connections and a progress-bar thread, which a
    # forked child must not share.
    context = multiprocessing.get_context("spawn")
    counter = context.Value("q", 0)
    processes = min(workers - 1 if local is not None else workers, len(ranges))
    queue = deque(enumerate(ranges))
    shown = 0
    done: dict[int, T] = {}
    following = 0
    with ProcessPoolExecutor(max_workers=max(processes, 1), mp_context=context, initializer=_init_worker,
                             initargs=(counter,)) as pool:
        try:
            futures: dict[Future[T], int] = {}

            def top_up() -> None:
                # Two ranges a process: the one it works on and the next, so that it does not
                # wait for the parent to finish a range of its own before it gets more.
                limit = 2 * processes if local is not None else len(ranges)
                while queue and len(futures) < limit and processes > 0:
                    index, streams = queue.popleft()
                    futures[pool.submit(task, streams, *args)] = index

            top_up()
            while futures or queue:
                local_next = local is not None and bool(queue)
                finished: set[Future[T]] = set()
                if futures:
                    finished, _ = wait(futures, timeout=0 if local_next else PROGRESS_POLL_S,
                                       return_when=FIRST_COMPLETED)
                if on_progress is not None:
                    now = counter.value
                    if now > shown:
                        on_progress(now - shown)
                        shown = now
                results: list[tuple[int, Future[T] | _Done]] = [(futures.pop(f), f) for f in finished]
                if local is not None and queue and not finished:
                    # The parent's own range: from the far end, so the processes keep theirs in order.
                    index, streams = queue.pop()
                    results.append((index, _Done(local(streams))))
                top_up()
                for index, result in results:  # a future keeps its result while referenced
                    if not ordered:
                        yield result.result()
                        continue
                    done[index] = result.result()
                while following in done:
                    yield done.pop(following)
                    following += 1
        except BaseException:
            # Interrupted, or a range failed: the other ranges' work is of no use now, and a
            # worker holds nothing that needs a clean stop (its session ends with it).
            for process in list(getattr(pool, "_processes", {}).values()):
                process.terminate()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    if on_progress is not None and counter.value > shown:
        on_progress(counter.value - shown)
