"""Where things are: the repository's deploy files and jar cache, and one stack's folder.

    .cache/maven                Maven's local repository (jar download cache)
    .cache/kafka/<v>/libs       the Kafka broker's class path
    <root>/kafka                server.properties, data/, logs/server.log
    <root>/postgres             data/ (the cluster), sock/ (unix socket), postgres.log
    <root>/<service>            <service>.log of each runstate service
    <root>/kafka-security       the secured Kafka's CA, broker certificate, passwords (security.py)
    <root>/env                  KAFKA_BOOTSTRAP_SERVERS, DATABASE_URL (read-only role), the worker's Kafka login, ... (0600)
    <root>/service.env          the services' own credentials: the service principal's Kafka login,
                                RUNSTATE_ADMIN_DATABASE_URL (owner), RUNSTATE_CONSUMER_DATABASE_URL, ... (0600)
    <root>/pids                 "<name> <pid>" per started process
    <root>/state.json           what `up` started (pids, process start times, ports), read by down/status
    <root>/last.json            ports and local URLs of the previous run, reused when free

<root> is .runstate for `make up`; the fault suite gives its private stack a temporary one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO / ".cache"
DEFAULT_ROOT = REPO / ".runstate"


@dataclasses.dataclass(frozen=True)
class Layout:
    root: Path = DEFAULT_ROOT

    @property
    def env_file(self) -> Path:
        return self.root / "env"

    @property
    def service_env_file(self) -> Path:
        return self.root / "service.env"

    @property
    def pids_file(self) -> Path:
        return self.root / "pids"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def last_file(self) -> Path:
        return self.root / "last.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def dir(self, name: str) -> Path:
        """The folder of one component (created)."""
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d



def relative(path: Path) -> Path:
    """`path` as the user reads it: relative to the repository when inside it."""
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path
