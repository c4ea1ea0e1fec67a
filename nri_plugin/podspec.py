"""Container roles from the pod spec: a watch of this node's pods on the API server.

The pod spec is the only source that tells a sidecar (an init container with
`restartPolicy: Always`) from an init container without help from the user; the runtime
never says (docs/kubernetes.md, "Container roles"). It is an optional enrichment: nri-qos
decides without it, from annotations and the kubelet's container type, and a node with no
API server runs as before.

Rules:

* One list, then one watch from its resourceVersion (`spec.nodeName=<node>`, bookmarks
  asked for): never polling. A watch that ends (its `timeoutSeconds`) is started again
  from the last resourceVersion seen; "410 Gone" (too old) lists again. Any other
  failure waits a back-off (0.5 s doubling to 30 s) and tries again; a working list or
  watch resets it.
* The client blocks, so all of it runs in its own thread (`nri-podspec`), never on the
  event loop and never on the NRI request path. What it learns reaches the loop through
  `call_soon_threadsafe`; the loop hands it to the policy thread (`QosPolicy.pod_roles`)
  and carries the intents out as every other loop does (UpdateContainers after, host
  intents and notes to the executor).
* A pod's roles are sent only when they differ from what was last sent for that pod (a
  status update, the most common MODIFIED, sends nothing). The memory of what was sent is
  bounded (`MAX_PODS`, oldest first out) and a DELETED pod is forgotten; after a relist,
  pods no longer listed are forgotten too. The engine drops a pod's roles itself when
  the runtime removes the pod.
* Building the client imports `kubernetes` (about a second): that happens in the thread.
  A cluster that cannot be reached at all (no service account, a bad kubeconfig) ends
  the thread with the reason in the status; the rest of nri-qos does not depend on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from nri_plugin.config_roles import RolesSettings
from nri_plugin.control.executor import HostExecutor
from nri_plugin.plugin import IntentSink, NotConnected, NriPlugin, hand_over
from nri_plugin.policy.intents import Intents
from nri_plugin.policy.qos_policy import QosPolicy
from nri_plugin.policy.roles import Role
from nri_plugin.protect import reraise_if_cancelled
from nri_plugin.protocol.errors import RpcError
from nri_plugin.reporter import (
    ReporterUnavailable,
    in_cluster_client,
    kubeconfig_client,
    this_node,
)
from qos_model.text import clip

log = logging.getLogger("nri_qos.podspec")

MAX_PODS: Final = 4096  # pods whose roles are remembered (a node runs ~110 to ~1000)
PAGE: Final = 500  # pods per list page
GONE: Final = 410

Roles = dict[str, str]
"""Container name -> roles.Role value, for one pod."""
Deliver = Callable[[str, Roles], None]


def roles_of(pod: Mapping[str, Any]) -> Roles:
    """The roles a Pod object's spec gives its containers: `initContainers` with
    `restartPolicy: Always` are sidecars, the other init containers init, `containers`
    app, `ephemeralContainers` ephemeral. Never raises; an entry without a name is
    skipped."""
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        return {}
    roles: Roles = {}
    for key in ("initContainers", "containers", "ephemeralContainers"):
        entries = spec.get(key)
        for entry in entries if isinstance(entries, list) else ():
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not name:
                continue
            if key == "containers":
                role = Role.APP
            elif key == "ephemeralContainers":
                role = Role.EPHEMERAL
            else:
                role = Role.SIDECAR if entry.get("restartPolicy") == "Always" else Role.INIT
            roles[name] = role.value
    return roles


def _uid(pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata")
    uid = metadata.get("uid") if isinstance(metadata, dict) else None
    return uid if isinstance(uid, str) else ""


def _version(obj: Mapping[str, Any]) -> str:
    metadata = obj.get("metadata")
    version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
    return version if isinstance(version, str) else ""


@dataclass(slots=True)
class PodSpecStatus:
    """What the status shows (written by the watch thread, read on the loop: plain
    values, each replaced whole)."""

    enabled: bool = False
    reason: str = "not started"
    node: str = ""
    server: str = ""
    watching: bool = False
    last_error: str = ""
    pods: int = 0  # pods whose roles are known
    sent: int = 0  # role changes handed to the engine
    lists: int = 0

    def line(self) -> str:
        """One line: on or off and why, and the last error."""
        if not self.enabled:
            return f"pod-spec roles off: {self.reason}"
        state = "watching" if self.watching else "not watching now"
        text = (
            f"pod-spec roles on ({self.reason}): node {self.node or '?'} at "
            f"{self.server or '?'}, {state}, {self.pods} pods, {self.sent} changes sent, "
            f"{self.lists} lists"
        )
        return text + (f"; last error: {self.last_error}" if self.last_error else "")


class _Expired(Exception):
    """The watch's resourceVersion is too old (410 Gone): list again."""


class _Failed(Exception):
    """The server answered with an error, or with something that is not a watch."""


class PodWatch:
    """The list + watch of one node's pods, in a thread of its own (see the module
    docstring). `connect` builds the ApiClient (in the thread: it imports the client);
    `deliver(uid, roles)` is called in the thread for each change."""

    def __init__(
        self,
        connect: Callable[[], Any],
        node: str,
        deliver: Deliver,
        *,
        status: PodSpecStatus | None = None,
        timeout_s: float = 5.0,
        watch_s: int = 300,
        backoff_s: tuple[float, float] = (0.5, 30.0),
        max_pods: int = MAX_PODS,
    ) -> None:
        self._connect = connect
        self.node = node
        self.deliver = deliver
        self.status = status if status is not None else PodSpecStatus()
        self.status.node = node
        self.timeout_s = timeout_s
        self.watch_s = watch_s
        self.backoff_s = backoff_s
        self.max_pods = max_pods
        self._known: dict[str, Roles] = {}  # uid -> roles last sent, oldest first
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._response: Any = None  # the watch response being read (to cut at stop)
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nri-podspec", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the thread: cut the watch being read, wait for the thread (blocking)."""
        self._stop.set()
        with self._lock:
            response = self._response
        if response is not None:
            _cut(response)
        if self._thread is not None:
            self._thread.join(timeout_s)

    # -- the thread

    def _run(self) -> None:
        status = self.status
        try:
            api_client = self._connect()
        except ReporterUnavailable as exc:
            status.enabled, status.reason = False, f"no API server: {exc}"
            log.warning("pod-spec roles off: %s", exc)
            return
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        status.server = str(getattr(api_client.configuration, "host", ""))
        core = client.CoreV1Api(api_client)
        version = ""
        delay = self.backoff_s[0]
        try:
            while not self._stop.is_set():
                try:
                    if not version:
                        version = self._list(core)
                        delay = self.backoff_s[0]
                    version = self._watch(core, version, self._reset)
                except _Expired:
                    version = ""  # list again, at once
                except (_Failed, ApiException, HTTPError, OSError, ValueError) as exc:
                    if self._stop.is_set():
                        break
                    if isinstance(exc, ApiException) and exc.status == GONE and version:
                        version = ""  # the watch's resourceVersion is too old: list again
                        continue
                    status.watching = False
                    status.last_error = _describe(exc)
                    log.warning("pod-spec watch: %s; again in %.1f s", status.last_error, delay)
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.backoff_s[1])
                else:
                    delay = self.backoff_s[0]
        except Exception as exc:  # a bug of ours: the thread's boundary, shown, not silent
            status.enabled, status.reason = False, "stopped by an error"
            status.last_error = _describe(exc)
            log.exception("pod-spec watch stopped; container roles come from annotations only")
        finally:
            status.watching = False
            close = getattr(api_client, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()

    def _reset(self) -> None:
        self.status.watching = True

    def _list(self, core: Any) -> str:
        """Every pod of the node, page by page; the resourceVersion to watch from."""
        listed: set[str] = set()
        token = ""
        while True:
            response = core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={self.node}",
                limit=PAGE,
                _continue=token or None,
                _preload_content=False,
                _request_timeout=self.timeout_s,
            )
            try:
                body = json.loads(response.data)
            finally:
                response.release_conn()
            if not isinstance(body, dict):
                raise _Failed("the pod list is not a JSON object")
            for pod in body.get("items") or ():
                if isinstance(pod, dict) and _uid(pod):
                    listed.add(_uid(pod))
                    self._seen(pod)
            metadata = body.get("metadata")
            token = metadata.get("continue", "") if isinstance(metadata, dict) else ""
            if not token:
                break
        for gone in set(self._known) - listed:  # deleted while nobody watched
            del self._known[gone]
        self.status.lists += 1
        self.status.pods = len(self._known)
        version = _version(body)
        if not version:
            raise _Failed("the pod list has no resourceVersion")
        return version

    def _watch(self, core: Any, version: str, connected: Callable[[], None]) -> str:
        """Read one watch until the server ends it; the last resourceVersion seen."""
        from kubernetes.watch.watch import iter_resp_lines

        response = core.list_pod_for_all_namespaces(
            field_selector=f"spec.nodeName={self.node}",
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_s,
            _preload_content=False,
            _request_timeout=(self.timeout_s, self.watch_s + 30.0),
        )
        with self._lock:
            self._response = response
        if self._stop.is_set():
            _cut(response)
        connected()
        try:
            for line in iter_resp_lines(response):  # type: ignore[no-untyped-call]
                if self._stop.is_set():
                    break
                if line.strip():
                    version = self._event(line) or version
        finally:
            with self._lock:
                self._response = None
            response.close()
            response.release_conn()
        return version

    def _event(self, line: str) -> str:
        """One watch event; the resourceVersion it carries ("" if none)."""
        try:
            event = json.loads(line)
        except ValueError:
            raise _Failed(f"not a watch event: {clip(line)}") from None
        kind = event.get("type") if isinstance(event, dict) else None
        obj = event.get("object") if isinstance(event, dict) else None
        if not isinstance(obj, dict):
            raise _Failed(f"not a watch event: {clip(line)}")
        if kind == "ERROR":
            if obj.get("code") == GONE:
                raise _Expired
            raise _Failed(f"watch error {obj.get('code')}: {clip(str(obj.get('message')))}")
        if kind in ("ADDED", "MODIFIED"):
            self._seen(obj)
        elif kind == "DELETED":
            self._known.pop(_uid(obj), None)
        self.status.pods = len(self._known)
        return _version(obj)

    def _seen(self, pod: Mapping[str, Any]) -> None:
        """A pod as the API server has it: its roles sent when they changed."""
        uid = _uid(pod)
        roles = roles_of(pod)
        if not uid or self._known.get(uid) == roles:
            return
        self._known.pop(uid, None)
        self._known[uid] = roles
        while len(self._known) > self.max_pods:
            del self._known[next(iter(self._known))]
        self.status.sent += 1
        self.deliver(uid, roles)


def _cut(response: Any) -> None:
    """Unblock a thread reading `response`: shut its socket down."""
    shutdown = getattr(response, "shutdown", None)  # urllib3 >= 2.3
    with contextlib.suppress(Exception):
        if callable(shutdown):
            shutdown()
            return
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            sock.shutdown(2)  # socket.SHUT_RDWR


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status:
        return clip(f"HTTP {status} {getattr(exc, 'reason', '') or ''}".strip())
    reason = getattr(exc, "reason", None)
    if isinstance(reason, BaseException):
        return _describe(reason)
    return clip(str(exc) or type(exc).__name__)


def watch_from_settings(
    settings: RolesSettings, environ: Mapping[str, str]
) -> tuple[PodWatch | None, PodSpecStatus]:
    """The watch `[roles]` asks for (None: off, the status says why), not started."""
    on, why = settings.wanted(environ)
    status = PodSpecStatus(enabled=on, reason=why)
    if not on:
        return None, status
    node = this_node(settings.node_name)
    if not node:
        status.enabled = False
        status.reason = (
            "no node name: set NODE_NAME (a DaemonSet sets it from spec.nodeName through "
            "the downward API) or [roles] node_name"
        )
        return None, status
    connect: Callable[[], Any]
    if settings.kubeconfig:
        connect = functools.partial(kubeconfig_client, settings.kubeconfig, "[roles] kubeconfig")
    else:
        hint = 'or set [roles] kubeconfig, or [roles] pod_spec = "off"'
        connect = functools.partial(in_cluster_client, hint)
    return PodWatch(connect, node, _nowhere, status=status), status


def _nowhere(uid: str, roles: Roles) -> None:
    """Until `pod_roles_loop` says where changes go."""


# --------------------------------------------------------------------------- the loop side


async def pod_roles_loop(
    plugin: NriPlugin, policy: QosPolicy, executor: HostExecutor, watch: PodWatch
) -> None:
    """Start the watch thread, carry each change out, stop the thread when cancelled.
    Changes that arrive while one batch is being carried out wait as one batch (the
    latest roles per pod)."""
    loop = asyncio.get_running_loop()
    pending: dict[str, Roles] = {}
    arrived = asyncio.Event()

    def on_loop(uid: str, roles: Roles) -> None:
        pending.pop(uid, None)
        pending[uid] = roles
        arrived.set()

    def from_thread(uid: str, roles: Roles) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(on_loop, uid, roles)

    watch.deliver = from_thread
    watch.start()
    try:
        while True:
            await arrived.wait()
            arrived.clear()
            batch = dict(pending)
            pending.clear()
            try:
                decide = functools.partial(_decide, policy, batch, executor.submit)
                decided = await plugin.in_policy_thread(decide)
                for intents in decided:
                    await plugin.send_updates(intents)
            except (NotConnected, RpcError, TimeoutError, ConnectionError) as exc:
                reraise_if_cancelled()
                log.warning("pod-spec roles: %s", exc or type(exc).__name__)
            except Exception:
                reraise_if_cancelled()
                log.exception("pod-spec roles failed; the next change tries again")
    finally:
        await asyncio.to_thread(watch.stop)


def _decide(policy: QosPolicy, batch: Mapping[str, Roles], submit: IntentSink) -> list[Intents]:
    """Policy thread: each pod's roles to the engine, its intents kept apart (each is one
    engine step, whose updates touch a container once), each handed over as decided."""
    return [hand_over(policy.pod_roles(uid, roles), submit) for uid, roles in batch.items()]


__all__ = [
    "PodSpecStatus",
    "PodWatch",
    "pod_roles_loop",
    "roles_of",
    "watch_from_settings",
]
