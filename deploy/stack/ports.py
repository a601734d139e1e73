"""Loopback ports: the one `free_port` of the repository, and the ports a stack run uses,
by name, the previous run's when they are still free (so connection strings stay stable)."""

from __future__ import annotations

import socket
from collections.abc import Mapping

HOST = "127.0.0.1"


def free_port() -> int:
    """A port nothing listens on now (the kernel's choice); the caller binds it soon after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


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
