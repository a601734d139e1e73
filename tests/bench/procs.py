"""Process helpers for the benchmark: consumer processes, resident memory, CPU accounting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[2] / "deploy"))
from stack.ports import free_port

REPO = Path(__file__).resolve().parents[2]
TICK = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def cpu_ticks(pid: int) -> int:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    f = raw[raw.rindex(")") + 2 :].split()
    return int(f[11]) + int(f[12])  # utime + stime


def start_time(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[19])


def pids_by_comm(comm: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            if raw[raw.index("(") + 1 : raw.rindex(")")] == comm:
                out.append(int(entry.name))
    return out


class CpuMeter:
    """CPU seconds used by named groups of processes between start() and stop()."""

    def __init__(self, groups: dict[str, callable]) -> None:
        self.groups = groups  # name -> function returning the pids of the group now

    def _snap(self) -> dict[str, dict[int, int]]:
        return {name: {pid: cpu_ticks(pid) for pid in fn()} for name, fn in self.groups.items()}

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.a = self._snap()

    def stop(self) -> dict[str, float]:
        b = self._snap()
        dt = time.monotonic() - self.t0
        out = {}
        for name, pids in b.items():
            used = sum(t - self.a[name].get(pid, 0) for pid, t in pids.items())
            out[name] = used / TICK / dt  # cores
        total = _total_busy(self._total_a, _total_now()) if hasattr(self, "_total_a") else None
        if total is not None:
            out["machine"] = total
        return out

    def start_total(self) -> None:
        self._total_a = _total_now()


def _total_now() -> tuple[int, int]:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(x) for x in fields]
    idle = values[3] + values[4]
    return sum(values), idle


def _total_busy(a: tuple[int, int], b: tuple[int, int]) -> float:
    total = b[0] - a[0]
    idle = b[1] - a[1]
    return (total - idle) / total * os.cpu_count() if total else 0.0


class Consumer:
    """`runstate serve` as a child process with chosen settings."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> Consumer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.log, "ab")  # noqa: SIM115 - the child process writes to it after this returns
        # Each consumer serves its /metrics on a port of its own (as deployed; 9464 is one port).
        env = {**self.env, "RUNSTATE_METRICS_PORT": str(free_port())}
        self.proc = subprocess.Popen([sys.executable, "-m", "runstate.cli", "serve", "--log-level", "WARNING"],
                                     env=env, stdout=self._fh, stderr=subprocess.STDOUT, cwd=REPO,
                                     stdin=subprocess.DEVNULL)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if hasattr(self, "_fh"):
            self._fh.close()


def stop_popen(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
