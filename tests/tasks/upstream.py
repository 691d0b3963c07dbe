"""A real HTTP server on loopback that plays a data source, for the data_sync tests.

`/records?page=N` serves `records` as JSON pages (`{"results": [...], "next": ...}`),
`/records.csv` serves them as CSV. `fail(path, 503, 503)` makes the next
requests for a path answer those statuses first (with `headers=`, e.g. a
Retry-After); `route(path, handler)` adds any other behaviour (redirects, slow
or endless bodies). `requests` logs every request, in order.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Handler = Callable[[Any], object]  # called with the request handler (it has `answer`)


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up early (timeouts, size caps) are what these tests do on purpose


class Upstream:
    def __init__(self, records: list[dict[str, Any]] | None = None, page_size: int = 3) -> None:
        self.records: list[Any] = list(records or [])  # anything JSON: tests serve broken records too
        self.page_size = page_size
        self.requests: list[tuple[str, str]] = []  # (path with query, Host header)
        self._failures: dict[str, list[tuple[int, dict[str, str]]]] = {}
        self._routes: dict[str, Handler] = {}
        self._lock = threading.Lock()
        self.released = threading.Event()  # slow handlers stop waiting when the server stops
        self.server = QuietServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def start(self) -> Upstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()

    def fail(self, path: str, *statuses: int, headers: dict[str, str] | None = None) -> None:
        with self._lock:
            self._failures.setdefault(path, []).extend((status, headers or {}) for status in statuses)

    def route(self, path: str, handler: Handler) -> None:
        self._routes[path] = handler

    def hits(self, path: str) -> int:
        return sum(1 for requested, _ in self.requests if requested == path)

    def paths(self) -> list[str]:
        """The paths (with query) requested, in order."""
        return [requested for requested, _ in self.requests]

    # --- what it serves ---------------------------------------------------------

    def json_page(self, page: int) -> dict[str, Any]:
        start = (page - 1) * self.page_size
        chunk = self.records[start : start + self.page_size]
        last = start + self.page_size >= len(self.records)
        # Relative next links: the fetcher resolves them against the page's URL.
        return {"results": chunk, "next": None if last else f"/records?page={page + 1}"}

    def csv_body(self) -> str:
        columns = sorted({key for record in self.records for key in record})
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(self.records)
        return out.getvalue()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        upstream = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                upstream.requests.append((self.path, self.headers.get("Host", "")))
                with upstream._lock:
                    pending = upstream._failures.get(self.path)
                    failure = pending.pop(0) if pending else None
                if failure is not None:
                    self.answer(failure[0], b'{"error": "scripted failure"}', headers=failure[1])
                    return
                parts = urlsplit(self.path)
                if parts.path in upstream._routes:
                    upstream._routes[parts.path](self)
                elif parts.path == "/records":
                    page = int(parse_qs(parts.query).get("page", ["1"])[0])
                    self.answer(200, json.dumps(upstream.json_page(page)).encode())
                elif parts.path == "/records.csv":
                    self.answer(200, upstream.csv_body().encode(), "text/csv; charset=utf-8")
                else:
                    self.answer(404, b'{"error": "not found"}')

            def answer(
                self,
                status: int,
                body: bytes,
                content_type: str = "application/json",
                headers: dict[str, str] | None = None,
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        return RequestHandler


def make_records(count: int, *, start: int = 1) -> list[dict[str, Any]]:
    return [
        {"id": number, "name": f"record {number}", "price": number * 10, "tags": ["a", "b"]}
        for number in range(start, start + count)
    ]
