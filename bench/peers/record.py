"""When a peer's task started, written by the task itself, and read back by the bench.

Each job carries the time it was sent (`sent`, time.time() in the client just before the send)
and its phase; the task appends `phase sent started` to a file of its process's own in
BENCH_RECORD_DIR: one write(2) on an O_APPEND descriptor, a few microseconds, no round trip to
a server (a Redis write per job would be a tenth of a no-op job's cost on the fastest peers).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

DIRECTORY_VARIABLE = "BENCH_RECORD_DIR"

_lock = threading.Lock()
_fd: int | None = None
_pid = 0


def record(phase: int, sent: float) -> None:
    """Called first thing in a peer's task: this job of `phase`, sent at `sent`, starts now."""
    global _fd, _pid
    started = time.time()
    if _fd is None or _pid != os.getpid():  # a forked pool process opens its own file
        with _lock:
            if _fd is None or _pid != os.getpid():
                directory = os.environ[DIRECTORY_VARIABLE]
                _fd = os.open(f"{directory}/{os.getpid()}.rec", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                _pid = os.getpid()
    os.write(_fd, f"{phase} {sent!r} {started!r}\n".encode())


@dataclass
class Records:
    """What the tasks wrote so far, read incrementally: per phase, (sent, started) pairs."""

    directory: Path
    _offsets: dict[Path, int] = field(default_factory=dict)
    _by_phase: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    _span: dict[int, tuple[float, float]] = field(default_factory=dict)  # first and last start

    def clear(self) -> None:
        """Forget everything (only with no worker running: their files are removed)."""
        for path in self.directory.glob("*.rec"):
            path.unlink()
        self._offsets.clear()
        self._by_phase.clear()
        self._span.clear()

    def read(self) -> None:
        for path in sorted(self.directory.glob("*.rec")):
            offset = self._offsets.get(path, 0)
            with path.open("rb") as file:
                file.seek(offset)
                data = file.read()
            end = data.rfind(b"\n") + 1  # a line being written is read next time
            for line in data[:end].decode().splitlines():
                phase_text, sent, started_text = line.split()
                phase, started = int(phase_text), float(started_text)
                self._by_phase.setdefault(phase, []).append((float(sent), started))
                first, last = self._span.get(phase, (started, started))
                self._span[phase] = (min(first, started), max(last, started))
            self._offsets[path] = offset + end

    def of(self, phase: int) -> list[tuple[float, float]]:
        self.read()
        return self._by_phase.get(phase, [])

    def summary(self, phase: int) -> tuple[int, float | None, float | None]:
        """How many jobs of `phase` started, the first start and the last (kept as lines are read)."""
        self.read()
        first, last = self._span.get(phase, (None, None))
        return len(self._by_phase.get(phase, [])), first, last
