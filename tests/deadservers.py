"""Brokers that are down, for tests of what callers get: a closed port, and a server that accepts
connections and never answers (as a SIGSTOPped Redis does)."""

from __future__ import annotations

import socket
import threading
from types import TracebackType

from localdev.embedded_broker import free_port


def closed_url() -> str:
    """A Redis URL on a port where nothing listens: connections are refused at once."""
    return f"redis://127.0.0.1:{free_port()}/0"


class FrozenServer:
    """Accepts TCP connections and reads what it is sent, but never answers a byte."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = int(self.listener.getsockname()[1])
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.accepted.append(connection)  # held open, never read from or written to

    def __enter__(self) -> FrozenServer:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.listener.close()
        for connection in self.accepted:
            connection.close()
