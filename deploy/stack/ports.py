"""Loopback ports: the one `free_port` of the repository, and the ports a stack run uses,
by name, the previous run's when they are still free (so connection strings stay stable)."""

from __future__ import annotations

import random
import socket
from collections.abc import Mapping
from pathlib import Path

HOST = "127.0.0.1"

# The ports a listener is given: below the kernel's ephemeral range, from which every outgoing
# connection (a client of Kafka or PostgreSQL) takes its local port. A port the kernel chose with
# bind(0) is in that range, so one of those connections could take it before the listener it was
# chosen for binds it, seconds later.
LISTEN_PORTS_LOW = 20_000


def ephemeral_low(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


_handed_out: set[int] = set()
_choice = random.SystemRandom()


def free_port() -> int:
    """A port nothing listens on now, outside the ephemeral range and not handed out before by this
    process, for a listener that binds it soon after."""
    high = ephemeral_low()
    if high - LISTEN_PORTS_LOW < 1_000:  # an unusual range: the kernel's choice after all
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            return int(s.getsockname()[1])
    for _ in range(1_000):
        port = _choice.randrange(LISTEN_PORTS_LOW, high)
        if port not in _handed_out and port_is_free(port):
            _handed_out.add(port)
            return port
    raise OSError(f"no free port in {LISTEN_PORTS_LOW}..{high - 1}")


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as the servers do: a port whose last connections linger in TIME_WAIT is still usable
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Ports:
    """The ports of one stack run, by name ("kafka", "postgres", "gateway", ...)."""

    def __init__(self, previous: Mapping[str, int] | None = None) -> None:
        self._previous = dict(previous or {})
        self.chosen: dict[str, int] = {}

    def __getitem__(self, name: str) -> int:
        if name not in self.chosen:
            last = self._previous.get(name)
            self.chosen[name] = last if last and port_is_free(last) else free_port()
        return self.chosen[name]
