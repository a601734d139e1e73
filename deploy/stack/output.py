"""What the user sees: progress lines, and the one-line error with the log that explains it."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

LOG_TAIL_LINES = 40

_print_lock = threading.Lock()


class StackError(Exception):
    """A bring-up failure: `line` is the one-line cause, `log` the file whose tail explains it."""

    def __init__(self, line: str, log: Path | None = None):
        super().__init__(line)
        self.line = line
        self.log = log


def say(msg: str) -> None:
    """Progress output; never fails (a closed stdout must not abort a half-started stack)."""
    with _print_lock, contextlib.suppress(BrokenPipeError, OSError):
        print(msg, flush=True)


def tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None or not Path(path).exists():
        return ""
    data = Path(path).read_bytes()[-65536:].decode("utf-8", "replace").splitlines()
    return "\n".join(data[-lines:])
