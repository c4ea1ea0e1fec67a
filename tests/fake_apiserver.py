"""A local HTTP server that lists and watches pods the way the API server does.

For the pod-spec watch (nri_plugin.podspec): the real `kubernetes` client talks HTTP to
it. `GET /api/v1/pods` lists `pods` (with the list's resourceVersion); with `watch=true`
it answers 200 and streams the events a test sends (`send`), one JSON object per line,
(chunked, as the API server does) until the test ends the watch (`end_watch`) or the
server stops. `fail_next(code)` makes
the next request of either kind answer that status instead. Every request is recorded
(path and query), so a test can tell a list from a watch and read its resourceVersion.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_END = object()


@dataclass(frozen=True)
class Seen:
    """One request as it arrived: its path and query (first value per key)."""

    path: str
    query: dict[str, str]

    @property
    def watch(self) -> bool:
        return self.query.get("watch") == "true"


@dataclass
class PodApi:
    url: str = ""
    pods: list[dict[str, Any]] = field(default_factory=list)
    version: str = "1"  # the list's resourceVersion
    requests: list[Seen] = field(default_factory=list)
    failures: queue.Queue[int] = field(default_factory=queue.Queue)
    events: queue.Queue[object] = field(default_factory=queue.Queue)
    watching: threading.Event = field(default_factory=threading.Event)
    closing: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, obj: dict[str, Any]) -> None:
        """One watch event to the watch being served (or the next one)."""
        self.events.put({"type": kind, "object": obj})

    def gone(self) -> None:
        """The watch's resourceVersion is too old: the ERROR event an API server sends."""
        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410}
        status.update(reason="Expired", message="too old resource version: 1 (20)")
        self.events.put({"type": "ERROR", "object": status})

    def end_watch(self) -> None:
        self.events.put(_END)

    def fail_next(self, code: int) -> None:
        self.failures.put(code)

    def lists(self) -> list[Seen]:
        return [r for r in self.requests if not r.watch]

    def watches(self) -> list[Seen]:
        return [r for r in self.requests if r.watch]


def pod_object(
    uid: str,
    name: str,
    *,
    containers: list[str],
    init: list[str] = (),  # type: ignore[assignment]
    sidecars: list[str] = (),  # type: ignore[assignment]
    ephemeral: list[str] = (),  # type: ignore[assignment]
    node: str = "node-1",
    version: str = "1",
    phase: str = "Pending",
) -> dict[str, Any]:
    """A Pod as the API server serves it (the fields that matter here)."""
    inits = [{"name": n, "image": "busybox"} for n in init]
    inits += [{"name": n, "image": "envoy", "restartPolicy": "Always"} for n in sidecars]
    spec: dict[str, Any] = {
        "nodeName": node,
        "containers": [{"name": n, "image": "app"} for n in containers],
    }
    if inits:
        spec["initContainers"] = inits
    if ephemeral:
        spec["ephemeralContainers"] = [{"name": n, "image": "debug"} for n in ephemeral]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": uid, "resourceVersion": version},
        "spec": spec,
        "status": {"phase": phase},
    }


def _handler(api: PodApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            seen = Seen(parts.path, query)
            api.requests.append(seen)
            try:
                code = api.failures.get_nowait()
            except queue.Empty:
                code = 0
            if code:
                self._json(code, {"kind": "Status", "code": code, "message": "injected"})
            elif parts.path != "/api/v1/pods":
                self._json(404, {"kind": "Status", "code": 404})
            elif seen.watch:
                self._stream()
            else:
                items = list(api.pods)
                self._json(200, {"kind": "PodList", "metadata": {"resourceVersion": api.version},
                                 "items": items})  # fmt: skip

        def _json(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _stream(self) -> None:
            """One chunk per event, as the API server streams a watch."""
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            api.watching.set()
            try:
                while not api.closing.is_set():
                    try:
                        event = api.events.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    if event is _END:
                        break
                    line = json.dumps(event).encode() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                self.close_connection = True  # the client cut the watch
            finally:
                api.watching.clear()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def running_pod_api() -> Iterator[PodApi]:
    """A server on 127.0.0.1 (a free port) for the duration of the block."""
    api = PodApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    server.daemon_threads = True
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield api
    finally:
        api.closing.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
