"""KubernetesEvictor against a real local HTTP server that answers like the API server.

No mock of the client: the server records what went over the wire (method, path, bearer
token, the JSON body the client built), so these tests prove the request an API server
would get, and what each of its answers (201, 429 with a PodDisruptionBudget Status and
Retry-After, 404, 500, no server at all) becomes. The `apiserver` fixture and the Status
bodies are also used by tests/control/test_evict_controller.py.
"""

from __future__ import annotations

import json
import socket
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from isolation.evict import EvictorUnavailable, EvictOutcome, KubernetesEvictor
from isolation.writes import HostWriter

TOKEN = "test-token-1234"

PDB_STATUS = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": "Cannot evict pod as it would violate the pod's disruption budget.",
    "reason": "TooManyRequests",
    "details": {
        "causes": [
            {
                "reason": "DisruptionBudget",
                "message": "The disruption budget web-pdb needs 2 healthy pods and has 2 currently",
            }
        ]
    },
    "code": 429,
}


def created_status() -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "code": 201,
    }


def not_found_status(pod: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'pods "{pod}" not found',
        "reason": "NotFound",
        "details": {"name": pod, "kind": "pods"},
        "code": 404,
    }


def internal_error_status() -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "etcdserver: request timed out",
        "reason": "InternalError",
        "code": 500,
    }


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass(frozen=True)
class Answer:
    code: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ApiServer:
    url: str
    answers: deque[Answer] = field(default_factory=deque)
    requests: list[Request] = field(default_factory=list)
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # GET path -> object
    reads: list[str] = field(default_factory=list)  # GET paths asked for

    def answer(self, code: int, body: dict[str, Any], **headers: str) -> None:
        self.answers.append(
            Answer(code, body, {k.replace("_", "-"): v for k, v in headers.items()})
        )


def _handler(state: ApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            headers = {k.lower(): v for k, v in self.headers.items()}
            state.requests.append(Request("POST", self.path, headers, body))
            answer = state.answers.popleft() if state.answers else Answer(201, created_status())
            data = json.dumps(answer.body).encode()
            self.send_response(answer.code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            state.reads.append(self.path)
            found = state.objects.get(self.path.partition("?")[0])
            data = json.dumps(found if found is not None else {"kind": "Status"}).encode()
            self.send_response(200 if found is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep the test output clean

    return Handler


@contextmanager
def running_apiserver() -> Iterator[ApiServer]:
    """A server on 127.0.0.1 (a free port) for the duration of the block."""
    state = ApiServer("")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def apiserver() -> Iterator[ApiServer]:
    with running_apiserver() as state:
        yield state


def evictor(server: ApiServer, *, dry_run: bool = False) -> KubernetesEvictor:
    return KubernetesEvictor.for_url(server.url, TOKEN, HostWriter(dry_run=dry_run))


# --------------------------------------------------------------------------- the request


def test_an_eviction_is_a_policy_v1_eviction_posted_with_the_bearer_token(
    apiserver: ApiServer,
) -> None:
    apiserver.answer(201, created_status())

    result = evictor(apiserver).evict("shop", "web-7d9f", "memory pressure", grace_period_s=30)

    assert result.outcome is EvictOutcome.EVICTED
    assert "shop/web-7d9f" in result.message
    (request,) = apiserver.requests
    assert request.method == "POST"
    assert request.path == "/api/v1/namespaces/shop/pods/web-7d9f/eviction"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["content-type"].startswith("application/json")
    assert request.body == {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": "web-7d9f", "namespace": "shop"},
        "deleteOptions": {"gracePeriodSeconds": 30},
    }


def test_without_a_grace_period_the_pods_own_applies(apiserver: ApiServer) -> None:
    apiserver.answer(200, created_status())

    result = evictor(apiserver).evict("shop", "web-1", "cpu pressure")

    assert result.outcome is EvictOutcome.EVICTED
    (request,) = apiserver.requests
    assert "deleteOptions" not in request.body
    assert request.body["metadata"] == {"name": "web-1", "namespace": "shop"}


def test_a_pod_uid_makes_the_eviction_conditional_on_that_very_pod(
    apiserver: ApiServer,
) -> None:
    apiserver.answer(
        409,
        {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": "Precondition failed: UID in precondition: 1111, UID in object meta: 2222",
            "reason": "Conflict",
            "code": 409,
        },
    )

    result = evictor(apiserver).evict("shop", "db-0", "memory pressure", uid="1111")

    assert result.outcome is EvictOutcome.GONE
    assert result.http_status == 409
    assert apiserver.requests[0].body["deleteOptions"] == {"preconditions": {"uid": "1111"}}


def test_no_token_sends_no_authorization_header(apiserver: ApiServer) -> None:
    KubernetesEvictor.for_url(apiserver.url, None, HostWriter()).evict("a", "b", "test")

    assert "authorization" not in apiserver.requests[0].headers


# --------------------------------------------------------------------------- the answers


def test_a_disruption_budget_refusal_is_not_now_with_the_budgets_message(
    apiserver: ApiServer,
) -> None:
    apiserver.answer(429, PDB_STATUS, Retry_After="10")

    result = evictor(apiserver).evict("shop", "web-1", "memory pressure")

    assert result.outcome is EvictOutcome.NOT_NOW
    assert result.retry_after_s == 10.0
    assert "would violate the pod's disruption budget" in result.message
    assert "web-pdb needs 2 healthy pods and has 2 currently" in result.message
    assert "\n" not in result.message


def test_retry_after_comes_from_the_status_when_the_header_is_missing(
    apiserver: ApiServer,
) -> None:
    status = json.loads(json.dumps(PDB_STATUS))
    status["details"]["retryAfterSeconds"] = 5
    apiserver.answer(429, status)

    result = evictor(apiserver).evict("shop", "web-1", "memory pressure")

    assert result.outcome is EvictOutcome.NOT_NOW
    assert result.retry_after_s == 5.0


def test_a_pod_that_no_longer_exists_is_gone(apiserver: ApiServer) -> None:
    apiserver.answer(404, not_found_status("web-1"))

    result = evictor(apiserver).evict("shop", "web-1", "memory pressure")

    assert result.outcome is EvictOutcome.GONE
    assert result.retry_after_s is None


def test_a_server_error_is_failed_with_the_status_line(apiserver: ApiServer) -> None:
    apiserver.answer(500, internal_error_status())

    result = evictor(apiserver).evict("shop", "web-1", "memory pressure")

    assert result.outcome is EvictOutcome.FAILED
    assert "HTTP 500" in result.message
    assert "etcdserver: request timed out" in result.message
    assert len(apiserver.requests) == 1  # a POST is never retried behind the caller's back


def test_a_server_that_does_not_answer_is_failed_without_raising() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = KubernetesEvictor.for_url(f"http://127.0.0.1:{port}", TOKEN, HostWriter())

    result = server.evict("shop", "web-1", "memory pressure")

    assert result.outcome is EvictOutcome.FAILED
    assert "did not answer" in result.message
    assert "\n" not in result.message


def test_dry_run_sends_nothing_and_records_the_decision(apiserver: ApiServer) -> None:
    writer = HostWriter(dry_run=True)
    server = KubernetesEvictor.for_url(apiserver.url, TOKEN, writer)

    result = server.evict("shop", "web-1", "memory pressure", grace_period_s=5)

    assert result.outcome is EvictOutcome.DRY_RUN
    assert "shop/web-1" in result.message
    assert "memory pressure" in result.message
    assert apiserver.requests == []
    (planned,) = writer.planned
    assert str(planned) == "evict pod shop/web-1 'grace period 5s' (memory pressure)"


# --------------------------------------------------------------------------- configuration


def test_outside_a_cluster_in_cluster_says_what_to_configure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)

    with pytest.raises(EvictorUnavailable, match=r"^not running in a cluster: .*kubeconfig"):
        KubernetesEvictor.in_cluster(HostWriter())


def test_a_kubeconfig_names_the_server_and_the_token(apiserver: ApiServer, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "lab", "cluster": {"server": apiserver.url}}],
                "users": [{"name": "agent", "user": {"token": TOKEN}}],
                "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "agent"}}],
                "current-context": "lab",
            }
        )
    )

    result = KubernetesEvictor.from_kubeconfig(kubeconfig, HostWriter()).evict(
        "shop", "web-1", "memory pressure"
    )

    assert result.outcome is EvictOutcome.EVICTED
    assert apiserver.requests[0].headers["authorization"] == f"Bearer {TOKEN}"


def test_a_missing_kubeconfig_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(EvictorUnavailable, match=r"kubeconfig .*/nope does not exist"):
        KubernetesEvictor.from_kubeconfig(tmp_path / "nope", HostWriter())
