"""What a stack run started, as recorded in .runstate/state.json, so that `down` and `status`
(in another process, maybe days later) stop and check exactly those processes."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .envfile import SERVICE_HEADER, write_env_file
from .layout import Layout
from .security import write_private


@dataclasses.dataclass
class Record:
    """One component of the stack: a process this stack started, or (`external` set) a server
    named by the environment that it only uses."""

    name: str
    pid: int | None = None
    start_time: int | None = None  # clock ticks since boot: tells a reused PID from ours
    pgid: int | None = None
    argv: list[str] = dataclasses.field(default_factory=list)
    log: str | None = None
    stop_signal: int = int(signal.SIGTERM)
    port: int | None = None
    external: str | None = None  # the URL or bootstrap list from the environment
    probe_host: str | None = None
    probe_port: int | None = None
    popen: subprocess.Popen[bytes] | None = dataclasses.field(default=None, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        if self.external is not None:
            return {"name": self.name, "external": self.external, "probe_host": self.probe_host,
                    "probe_port": self.probe_port}
        return {"pid": self.pid, "start_time": self.start_time, "pgid": self.pgid, "argv": self.argv,
                "log": self.log, "stop_signal": self.stop_signal, "name": self.name, "port": self.port}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        known = {f.name for f in dataclasses.fields(cls)} - {"popen"}
        return cls(**{k: v for k, v in data.items() if k in known})

    def describe(self) -> str:
        if self.external is not None:
            return f"{self.name} external {self.probe_host}:{self.probe_port}"
        return f"{self.name} pid {self.pid}" + (f" port {self.port}" if self.port else "")


def load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


class StateFiles:
    """state.json (components and env), pids, env and last.json under one stack's folder."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def components(self) -> list[Record]:
        return [Record.from_json(c) for c in load_json(self.layout.state_file).get("components", [])]

    def env(self) -> dict[str, str]:
        return dict(load_json(self.layout.state_file).get("env", {}))

    def service_env(self) -> dict[str, str]:
        """The services' own credentials (.runstate/service.env)."""
        return dict(load_json(self.layout.state_file).get("service_env", {}))

    def shape(self) -> str:
        """single or replicated: the shape of the recorded stack (single before shapes were recorded)."""
        return str(load_json(self.layout.state_file).get("shape", "single"))

    def save(self, components: list[Record], env: dict[str, str], service_env: dict[str, str] | None = None,
             shape: str | None = None) -> None:
        """state.json, pids, env and (when there is any) service.env; the ones with passwords 0600."""
        layout = self.layout
        service_env = self.service_env() if service_env is None else service_env
        shape = shape or self.shape()
        write_private(layout.state_file, json.dumps({"shape": shape, "components": [c.to_json() for c in components],
                                                     "env": env, "service_env": service_env}, indent=2))
        layout.pids_file.write_text("".join(f"{c.name} {c.pid}\n" for c in components if c.pid))
        write_env_file(layout.env_file, env)
        if service_env:
            write_env_file(layout.service_env_file, service_env, SERVICE_HEADER)
        else:
            layout.service_env_file.unlink(missing_ok=True)

    def clear(self) -> None:
        for f in (self.layout.state_file, self.layout.pids_file, self.layout.env_file, self.layout.service_env_file):
            f.unlink(missing_ok=True)

    def last_run(self) -> dict[str, Any]:
        """Ports and local connection variables of the previous run."""
        return load_json(self.layout.last_file)

    def save_last_run(self, ports: dict[str, int], local_env: dict[str, str]) -> None:
        write_private(self.layout.last_file, json.dumps({"ports": ports, "local_env": local_env}, indent=2))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One `up`/`down` at a time per stack folder."""
        self.layout.root.mkdir(exist_ok=True)
        with open(self.layout.lock_file, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
