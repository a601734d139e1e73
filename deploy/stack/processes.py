"""Starting and stopping the stack's processes. Each runs in its own session, so that its
whole process group can be stopped; only recorded PIDs, checked against their start time,
are ever signalled."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from .ports import tcp_open
from .records import Record

STOP_TIMEOUT = 30.0
_PROC = Path("/proc")


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks) of a live process, else None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # after the comm field: [0]=state [2]=pgrp [19]=starttime
    return fields[0], int(fields[2]), int(fields[19])


def is_alive(pid: int, start_time: int | None = None) -> bool:
    """True if `pid` runs and (when given) is the very process that started at `start_time`."""
    st = proc_stat(pid)
    if st is None:
        if not _PROC.is_dir():  # not Linux: fall back to a plain signal probe
            try:
                os.kill(pid, 0)
                return True
            except OSError:
                return False
        return False
    state, _pgrp, started = st
    if state in ("Z", "X"):
        return False
    return start_time is None or started == start_time


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            st = proc_stat(int(entry.name))
            if st and st[1] == pgid and st[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


class Launcher:
    """Starts processes and remembers every one of them the moment it exists, so that a failure
    anywhere in a bring-up (in any thread, of any kind) can stop all of them."""

    def __init__(self) -> None:
        self.spawned: list[Record] = []

    def spawn(self, name: str, argv: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None,
              run_as: tuple[int, int] | None = None, stop_signal: int = signal.SIGTERM,
              port: int | None = None) -> Record:
        """Start a long-running process, output appended to `log`."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            kwargs: dict = {}
            if run_as is not None:
                kwargs.update(user=run_as[0], group=run_as[1], extra_groups=[])
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=cwd, env=env, start_new_session=True, **kwargs)
        st = proc_stat(proc.pid)
        rec = Record(name=name, pid=proc.pid, start_time=st[2] if st else None, pgid=proc.pid, argv=argv,
                     log=str(log), stop_signal=int(stop_signal), port=port, popen=proc)
        self.spawned.append(rec)
        return rec

    def stop_all(self, timeout: float = 15) -> None:
        for rec in reversed(self.spawned):
            stop(rec, rec.stop_signal, timeout=timeout)


def stop(rec: Record, sig: int, timeout: float = STOP_TIMEOUT) -> str:
    """Stop one recorded process: `sig`, wait up to `timeout`, then SIGKILL its process group.
    Only touches the recorded PID (checked against its recorded start time) and its own group."""
    assert rec.pid is not None
    pid, start = rec.pid, rec.start_time
    pgid = rec.pgid or pid
    if not is_alive(pid, start):
        leftovers = group_members(pgid) if _PROC.is_dir() else []
        if leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            return "was not running (killed leftover group members)"
        return "was not running"
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    how = f"stopped ({signal.Signals(sig).name})"
    while time.monotonic() < deadline and is_alive(pid, start):
        reap(rec)
        time.sleep(0.1)
    if is_alive(pid, start):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        how = f"killed (SIGKILL after {timeout:.0f} s)"
    # the leader is gone: nothing of its group may stay behind
    deadline = time.monotonic() + 10
    while _PROC.is_dir() and group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _PROC.is_dir() and group_members(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    reap(rec)
    return how


def kill_group(rec: Record, wait: float = 20) -> None:
    """SIGKILL the whole process group at once (a power cut: the server recovers on restart)."""
    pgid = rec.pgid or rec.pid
    assert pgid is not None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + wait
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    reap(rec)


def reap(rec: Record) -> None:
    if rec.popen is not None:
        with contextlib.suppress(Exception):
            rec.popen.poll()


def exited(rec: Record) -> int | None:
    """Exit code if a process started by this very run has exited, else None."""
    return rec.popen.poll() if rec.popen is not None else None


def is_up(rec: Record, host: str) -> bool:
    """Running (or, for an external server, reachable) and, when it has a port, accepting."""
    if rec.external is not None:
        return rec.probe_host is None or tcp_open(rec.probe_host, rec.probe_port or 0)
    assert rec.pid is not None
    return is_alive(rec.pid, rec.start_time) and (rec.port is None or tcp_open(host, rec.port))
