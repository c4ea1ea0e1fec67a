"""The reporter against a real HTTP server that answers like the API server.

The official client talks to `FakeApiServer` over TCP on 127.0.0.1: what is asserted is
what went over the wire (method, path, content type, JSON body, resourceVersion), never
calls on a mock of the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from nri_plugin.policy.numa_reclaim import NumaReclaimable
from nri_plugin.reporter import (
    RECLAIMED_MEMORY,
    RECLAIMED_MILLICPU,
    STRATEGIC_MERGE_PATCH,
    Reporter,
    ReporterSettings,
    from_numa,
    parse_reporter,
)

NODE = "worker-1"
NODE_UID = "0b6c5c0e-uid-of-worker-1"
TOKEN = "test-token"
NODE_STATUS = f"/api/v1/nodes/{NODE}/status"
NRT_COLLECTION = "/apis/topology.node.k8s.io/v1alpha2/noderesourcetopologies"
NRT = f"{NRT_COLLECTION}/{NODE}"
GIB = 1 << 30


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    content_type: str
    authorization: str
    body: Any


class FakeApiServer:
    """The API server's answers for the node status and the NodeResourceTopology.

    The NodeResourceTopology is stored with a resourceVersion like the real server does:
    a PUT whose resourceVersion is not the stored one gets 409. `crd = False` answers
    like a server without the CRD (404 with a plain-text body, for GET and POST).
    `script` queues one-shot answers for a (method, path)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.crd = True
        self.nrt: dict[str, Any] | None = None
        self.version = 0
        self.script: dict[tuple[str, str], deque[tuple[int, Any]]] = {}
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.handle(self)

            def do_POST(self) -> None:
                fake.handle(self)

            def do_PUT(self) -> None:
                fake.handle(self)

            def do_PATCH(self) -> None:
                fake.handle(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, method: str, path: str, status: int, body: Any) -> None:
        with self.lock:
            self.script.setdefault((method, path), deque()).append((status, body))

    def touch(self) -> None:
        """Another writer changes the stored object (a new resourceVersion)."""
        with self.lock:
            assert self.nrt is not None
            self.version += 1
            self.nrt["metadata"]["resourceVersion"] = str(self.version)

    def calls(self, method: str | None = None, path: str | None = None) -> list[Request]:
        with self.lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and (path is None or r.path == path)
            ]

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        path = handler.path.split("?", 1)[0]
        request = Request(
            handler.command,
            path,
            handler.headers.get("Content-Type", ""),
            handler.headers.get("Authorization", ""),
            json.loads(raw) if raw else None,
        )
        with self.lock:
            self.requests.append(request)
            queued = self.script.get((request.method, path))
            answer = queued.popleft() if queued else self.answer(request)
        status, body = answer
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        handler.send_response(status)
        kind = "text/plain" if isinstance(body, str) else "application/json"
        handler.send_header("Content-Type", kind)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def answer(self, r: Request) -> tuple[int, Any]:
        if (r.method, r.path) == ("PATCH", NODE_STATUS):
            return 200, {"kind": "Node", "metadata": {"name": NODE, "uid": NODE_UID}}
        if r.path.startswith(NRT_COLLECTION) and not self.crd:
            return 404, "404 page not found\n"
        if (r.method, r.path) == ("GET", NRT):
            if self.nrt is None:
                return 404, status(404, "NotFound", f'noderesourcetopologies "{NODE}" not found')
            return 200, self.nrt
        if (r.method, r.path) == ("POST", NRT_COLLECTION):
            if self.nrt is not None:
                return 409, status(409, "AlreadyExists", "already exists")
            return 201, self.store(r.body)
        if (r.method, r.path) == ("PUT", NRT):
            if self.nrt is None:
                return 404, status(404, "NotFound", "not found")
            if r.body["metadata"].get("resourceVersion") != self.nrt["metadata"]["resourceVersion"]:
                return 409, status(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest "
                    "version and try again",
                )
            return 200, self.store(r.body)
        return 404, status(404, "NotFound", "no such path")

    def store(self, body: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        stored: dict[str, Any] = json.loads(json.dumps(body))
        stored["metadata"]["resourceVersion"] = str(self.version)
        self.nrt = stored
        return stored


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    yield server
    server.close()


@pytest.fixture
async def make(api: FakeApiServer) -> AsyncIterator[Any]:
    made: list[Reporter] = []

    def build(**kwargs: Any) -> Reporter:
        kwargs.setdefault("min_interval_s", 0.0)
        kwargs.setdefault("timeout_s", 2.0)
        reporter = Reporter.for_url(api.url, TOKEN, NODE, **kwargs)
        made.append(reporter)
        return reporter

    yield build
    for reporter in made:
        await reporter.close()


async def settled(reporter: Reporter, timeout: float = 10.0) -> None:
    await asyncio.wait_for(reporter.settled(), timeout)


def resources(zone: dict[str, Any]) -> dict[str, tuple[Any, Any, Any]]:
    return {r["name"]: (r["capacity"], r["allocatable"], r["available"]) for r in zone["resources"]}


VALUES = {0: (4000, 8 * GIB), 1: (2000, 4 * GIB)}
SIZES = {0: (8000, 16 * GIB), 1: (8000, 16 * GIB)}


async def test_first_update_patches_node_status_and_creates_the_topology(
    api: FakeApiServer, make: Any
) -> None:
    reporter = make(zones=SIZES)
    reporter.update(VALUES)
    await settled(reporter)

    [patch] = api.calls("PATCH", NODE_STATUS)
    assert patch.content_type == STRATEGIC_MERGE_PATCH
    assert patch.authorization == f"Bearer {TOKEN}"
    totals = {RECLAIMED_MILLICPU: "6000", RECLAIMED_MEMORY: str(12 * GIB)}
    assert patch.body == {"status": {"capacity": totals, "allocatable": totals}}

    # the object did not exist: GET answers 404, then POST creates it
    assert [(r.method, r.path) for r in api.calls(path=None)][1:] == [
        ("GET", NRT),
        ("POST", NRT_COLLECTION),
    ]
    created = api.calls("POST")[0].body
    assert created["apiVersion"] == "topology.node.k8s.io/v1alpha2"
    assert created["kind"] == "NodeResourceTopology"
    assert created["metadata"]["name"] == NODE
    assert "resourceVersion" not in created["metadata"]
    # garbage-collected with its node: the uid came back from the node patch
    assert created["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": NODE, "uid": NODE_UID}
    ]
    zones = created["zones"]
    assert [(z["name"], z["type"]) for z in zones] == [("node-0", "Node"), ("node-1", "Node")]
    assert resources(zones[0]) == {
        "cpu": (8, 8, 4),
        "memory": (16 * GIB, 16 * GIB, 8 * GIB),
        RECLAIMED_MILLICPU: (4000, 4000, 4000),
        RECLAIMED_MEMORY: (8 * GIB, 8 * GIB, 8 * GIB),
    }
    assert resources(zones[1])[RECLAIMED_MILLICPU] == (2000, 2000, 2000)
    state = reporter.status()
    assert state["published"] == 1 and state["enabled"] and state["last_error"] == ""


async def test_a_later_change_replaces_with_the_resource_version_and_survives_a_conflict(
    api: FakeApiServer, make: Any
) -> None:
    reporter = make()
    reporter.update(VALUES)
    await settled(reporter)
    assert api.nrt is not None
    mine = api.nrt["metadata"]["resourceVersion"]
    api.touch()  # someone else wrote it since: our cached resourceVersion is stale
    theirs = api.nrt["metadata"]["resourceVersion"]
    before = len(api.calls())

    reporter.update({0: (3000, 8 * GIB), 1: (2000, 4 * GIB)})
    await settled(reporter)

    later = api.calls()[before:]
    assert [(r.method, r.path) for r in later] == [
        ("PATCH", NODE_STATUS),
        ("PUT", NRT),  # with the cached version: 409 Conflict
        ("GET", NRT),  # read again
        ("PUT", NRT),  # with the new version: accepted
    ]
    assert later[1].body["metadata"]["resourceVersion"] == mine
    assert later[3].body["metadata"]["resourceVersion"] == theirs
    assert resources(api.nrt["zones"][0])[RECLAIMED_MILLICPU] == (3000, 3000, 3000)
    assert reporter.status()["last_error"] == ""

    # the next write uses the version the last PUT returned: no GET, no conflict
    before = len(api.calls())
    reporter.update({0: (1000, 8 * GIB), 1: (2000, 4 * GIB)})
    await settled(reporter)
    assert [r.method for r in api.calls()[before:]] == ["PATCH", "PUT"]


async def test_the_same_values_send_nothing(api: FakeApiServer, make: Any) -> None:
    reporter = make()
    reporter.update(VALUES)
    await settled(reporter)
    before = len(api.calls())
    reporter.update({1: (2000, 4 * GIB), 0: (4000, 8 * GIB)})  # equal, in another order
    reporter.update(dict(VALUES))
    await settled(reporter)
    await asyncio.sleep(0.1)
    assert len(api.calls()) == before


async def test_changes_inside_the_interval_are_published_once_after_it_with_the_latest(
    api: FakeApiServer, make: Any
) -> None:
    interval = 0.6
    reporter = make(min_interval_s=interval)
    start = time.monotonic()
    reporter.update(VALUES)  # the first publication is immediate
    await settled(reporter)
    assert len(api.calls("PATCH")) == 1

    reporter.update({0: (3000, 8 * GIB), 1: (2000, 4 * GIB)})
    reporter.update({0: (1000, 8 * GIB), 1: (2000, 4 * GIB)})
    await asyncio.sleep(interval / 3)
    assert len(api.calls("PATCH")) == 1  # still quiet
    await settled(reporter)
    sent_at = time.monotonic()

    patches = api.calls("PATCH")
    assert len(patches) == 2
    assert patches[1].body["status"]["capacity"][RECLAIMED_MILLICPU] == "3000"  # 1000 + 2000
    assert sent_at - start >= interval * 0.9
    assert reporter._timer is None  # nothing armed while nothing is pending


async def test_a_change_reverted_inside_the_interval_sends_nothing(
    api: FakeApiServer, make: Any
) -> None:
    reporter = make(min_interval_s=0.4)
    reporter.update(VALUES)
    await settled(reporter)
    before = len(api.calls())
    reporter.update({0: (0, 0), 1: (0, 0)})
    reporter.update(VALUES)  # back to what is published: the armed timer is dropped
    assert reporter._timer is None
    await asyncio.sleep(0.6)
    assert len(api.calls()) == before


async def test_forbidden_node_patch_disables_the_reporter_with_one_line(
    api: FakeApiServer, make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    message = (
        f'nodes "{NODE}" is forbidden: User "system:serviceaccount:nri-qos:nri-qos" cannot '
        'patch resource "nodes/status" in API group "" at the cluster scope'
    )
    api.add("PATCH", NODE_STATUS, 403, status(403, "Forbidden", message))
    reporter = make()
    with caplog.at_level(logging.WARNING, "nri_qos.reporter"):
        reporter.update(VALUES)
        await settled(reporter)
        reporter.update({0: (1, 1)})
        await settled(reporter)
    assert "HTTP 403" in reporter.disabled and "nodes/status" in reporter.disabled
    assert "rbac.yaml" in reporter.disabled
    state = reporter.status()
    assert state["enabled"] is False and state["reason"] == reporter.disabled
    assert len(api.calls()) == 1  # no topology write, and nothing after
    errors = [r for r in caplog.records if r.name == "nri_qos.reporter"]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage()


async def test_without_the_crd_the_topology_is_skipped_and_the_node_patch_continues(
    api: FakeApiServer, make: Any
) -> None:
    api.crd = False
    reporter = make()
    reporter.update(VALUES)
    await settled(reporter)
    assert "CRD noderesourcetopologies.topology.node.k8s.io is not installed" in (
        reporter.topology_reason
    )
    assert not reporter.disabled
    before = len(api.calls())
    reporter.update({0: (1000, GIB)})
    await settled(reporter)
    assert [(r.method, r.path) for r in api.calls()[before:]] == [("PATCH", NODE_STATUS)]


async def test_forbidden_topology_write_stops_only_the_topology(
    api: FakeApiServer, make: Any
) -> None:
    api.add("GET", NRT, 403, status(403, "Forbidden", "cannot get noderesourcetopologies"))
    reporter = make()
    reporter.update(VALUES)
    await settled(reporter)
    assert "HTTP 403" in reporter.topology_reason and "rbac.yaml" in reporter.topology_reason
    before = len(api.calls())
    reporter.update({0: (1000, GIB)})
    await settled(reporter)
    assert [r.method for r in api.calls()[before:]] == ["PATCH"]


async def test_a_server_error_keeps_the_values_for_the_next_interval(
    api: FakeApiServer, make: Any
) -> None:
    api.add("PATCH", NODE_STATUS, 500, status(500, "InternalError", "etcdserver: timeout"))
    reporter = make(min_interval_s=0.3)
    reporter.update(VALUES)
    await asyncio.sleep(0.15)
    assert "HTTP 500: etcdserver: timeout" in str(reporter.status()["last_error"])
    await settled(reporter)  # retried when the interval ended, without a new update()
    patches = api.calls("PATCH")
    assert len(patches) == 2 and patches[0].body == patches[1].body
    assert reporter.status()["last_error"] == "" and api.nrt is not None


async def test_an_absent_server_never_blocks_the_loop(make: Any) -> None:
    # A server that takes connections (the kernel's backlog does) and never answers.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    port = hung.getsockname()[1]
    reporter = Reporter.for_url(
        f"http://127.0.0.1:{port}", None, NODE, min_interval_s=30.0, timeout_s=0.5
    )
    try:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        reporter.update(VALUES)
        for _ in range(200):
            await asyncio.sleep(0.02)
            if reporter.status()["last_error"]:
                break
        ticker.cancel()
        error = str(reporter.status()["last_error"])
        assert "did not answer" in error and "timed out" in error
        assert "NodeResourceTopology" not in error  # not asked: the same server is gone
        assert ticks > 20  # the loop kept running during the 0.5 s wait
        assert reporter.status()["pending"] is True  # kept for the next interval
    finally:
        await reporter.close()
        hung.close()


def test_from_numa_takes_the_policy_result() -> None:
    result = {
        0: NumaReclaimable(0, frozenset({2, 3}), 2000, 5 * GIB, "r"),
        1: NumaReclaimable(1, frozenset(), 0, 0, "r"),
    }
    assert from_numa(result) == {0: (2000, 5 * GIB), 1: (0, 0)}


def test_settings() -> None:
    assert parse_reporter({}) == ReporterSettings()
    settings = parse_reporter({"enabled": True, "min_interval_ms": 2500, "topology": False})
    assert settings.enabled and settings.min_interval_s == 2.5 and not settings.topology
    with pytest.raises(ValueError, match="has no key"):
        parse_reporter({"interval": 1})
    with pytest.raises(ValueError, match="needs kubeconfig"):
        parse_reporter({"api": "kubeconfig"})
    with pytest.raises(ValueError, match="must be int"):
        parse_reporter({"min_interval_ms": True})


async def test_values_that_are_no_quantity_are_refused(make: Any) -> None:
    reporter = make()
    with pytest.raises(ValueError, match="not a whole number"):
        reporter.update({0: (-1, 0)})


async def test_an_eviction_lowers_what_is_published_for_the_holdback_then_restores_it(
    api: FakeApiServer, make: Any
) -> None:
    """The engine's reclaimable report, as the daemon hands it to the reporter, is lower
    by an evicted reclaimed pod's request for the hold-back, so a scheduler does not put
    its replacement straight back; then it is published whole again."""
    from nri_plugin.reporter import from_numa
    from qos_model.signals import SignalSnapshot
    from tests.builders import container
    from tests.policy.test_eviction_loops import MiB, evicted, node, replica, short_of_memory

    engine = node(holdback_s=30)
    batch, cid = replica("aaaaa")
    engine.container_created(batch, container("aaaaa", 1500, oom=1000, memory=512 * MiB))
    reporter = make()

    def published() -> tuple[int, int]:
        capacity = api.calls("PATCH", NODE_STATUS)[-1].body["status"]["capacity"]
        return int(capacity[RECLAIMED_MILLICPU]), int(capacity[RECLAIMED_MEMORY])

    reporter.update(from_numa(engine.reclaimable()))
    await settled(reporter)
    before = published()

    assert evicted(engine.signals_sampled(short_of_memory(10.0, cid)).intents)
    engine.pod_removed(batch)
    engine.container_stopped(batch, container("aaaaa"))
    reporter.update(from_numa(engine.reclaimable()))
    await settled(reporter)
    during = published()
    assert during == (before[0] - 1500, before[1] - 512 * MiB)

    engine.signals_sampled(SignalSnapshot(end_s=41.0, window_s=0.5))  # 30 s later
    reporter.update(from_numa(engine.reclaimable()))
    await settled(reporter)
    assert published() == before
    assert len(api.calls("PATCH", NODE_STATUS)) == 3
