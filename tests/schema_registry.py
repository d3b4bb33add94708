"""A schema registry test double: a real HTTP server, in a thread of the test process, that speaks the two calls
of the Confluent REST API pixelpipe uses (``POST /subjects/S/versions``, ``GET /schemas/ids/N``). Workers and
sinks started as subprocesses reach it over HTTP like any registry."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Registry(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.schemas: list[str] = []
        self.subjects: dict[str, set[int]] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Registry

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        subject = self.path.removeprefix("/subjects/").removesuffix("/versions")
        with self.server.lock:
            if body["schema"] not in self.server.schemas:
                self.server.schemas.append(body["schema"])
            schema_id = self.server.schemas.index(body["schema"]) + 1
            self.server.subjects.setdefault(subject, set()).add(schema_id)
        self._reply(200, {"id": schema_id})

    def do_GET(self) -> None:
        if not self.path.startswith("/schemas/ids/"):  # as Confluent's registry answers GET / (a reachability check)
            self._reply(200, {})
            return
        schema_id = int(self.path.rsplit("/", 1)[1])
        with self.server.lock:
            known = 1 <= schema_id <= len(self.server.schemas)
            payload = {"schema": self.server.schemas[schema_id - 1]} if known else {}
        if known:
            self._reply(200, payload)
        else:
            self._reply(404, {"error_code": 40403, "message": "Schema not found"})

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def schema_registry() -> Iterator[_Registry]:
    """A registry on a free loopback port for the duration of the block."""
    server = _Registry()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
