"""Publishing the node's reclaimable CPU and memory through the API server.

Why: a scheduler that places reclaimed_cores (batch) pods can only use the idle capacity
this agent computes (`nri_plugin.policy.numa_reclaim`) if it sees it where schedulers
look. Two places, both the way Katalyst's consumers read them:

* the Node's status: the extended resources ``resource.katalyst.kubewharf.io/
  reclaimed_millicpu`` (millicores) and ``.../reclaimed_memory`` (bytes) in capacity and
  allocatable, node totals. A strategic merge patch on ``nodes/<name>/status`` touches
  only those two keys; the kubelet owns everything else there and keeps it.
* a NodeResourceTopology (``topology.node.k8s.io/v1alpha2``, named after the node), one
  zone per NUMA node (type "Node", named ``node-<id>`` like NFD's topology updater):
  ``cpu`` and ``memory`` with the zone's size as capacity and allocatable and what the
  online (non-reclaimed) workloads leave of it as available (the reclaimed pool's CPUs,
  the memory no online limit claims), and the two reclaimed resources (capacity =
  allocatable = available = the reclaimable amount). Per NUMA node because a NUMA-bound
  batch pod placed on the wrong one has remote memory. Note that NFD's topology updater
  writes an object of the same name: run one of the two.

What was just taken away is not offered again: after the engine evicts a reclaimed_cores
pod, `Engine.reclaimable` (this module's input, through `from_numa`) is lower by that
pod's request for `[eviction] holdback_ms` (`Protection.withhold`). The lower value is
published like any change (subject to `min_interval_s`), and so is the return to the
full value when the hold-back ends, so a scheduler placing by these resources does not
put the re-created pod straight back onto the node that just evicted it.

How often: on change only (the values are compared with what was last published), and
at most once per `min_interval_s` (10 s): a node's plan can change many times a second
while pods start, and every write is an API-server write plus a watch event to each
scheduler. A change during the quiet period is published when it ends, by one asyncio
timer that exists only while a change is pending (no idle polling).

Failures, each one log line, and a reason in `status()`:

* 403: the service account lacks the RBAC rule (deploy/kubernetes/rbac.yaml). On the
  node patch the reporter disables itself (the role is missing or wrong, and retrying
  every 10 s only fills the audit log); on the NodeResourceTopology, that part alone is.
* 404 creating the NodeResourceTopology: its CRD is not installed; the topology is
  skipped for good and the node patch continues.
* 409 writing the NodeResourceTopology: someone else wrote it since we read it; it is
  read again and the write retried with the new resourceVersion (a few times).
* anything else (5xx, no answer, a timeout): the values stay pending and are tried again
  one interval later.

The API calls run in a worker thread (`asyncio.to_thread`) with a per-request timeout,
so a slow or absent API server never blocks the event loop that answers the runtime.
The `kubernetes` package is imported only when a reporter is built (about a second).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from isolation import kubeapi

if TYPE_CHECKING:
    from nri_plugin.policy.numa_reclaim import NumaReclaimable
    from qos_model.topology import Topology

log = logging.getLogger("nri_qos.reporter")

RECLAIMED_MILLICPU = "resource.katalyst.kubewharf.io/reclaimed_millicpu"
RECLAIMED_MEMORY = "resource.katalyst.kubewharf.io/reclaimed_memory"
NRT_GROUP = "topology.node.k8s.io"
NRT_VERSION = "v1alpha2"
NRT_PLURAL = "noderesourcetopologies"
NRT_KIND = "NodeResourceTopology"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
MANAGED_BY = {"app.kubernetes.io/managed-by": "nri-qos"}
MAX_WRITE_ATTEMPTS = 4  # a 409 re-reads and writes again; more means a writer war

Values = Mapping[int, tuple[int, int]]
"""NUMA node -> (reclaimable millicores, reclaimable memory bytes)."""


class ReporterUnavailable(Exception):
    """No reporter can be built here; the message says what to configure."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True)
class ReporterSettings:
    """The ``[reporter]`` section (see `parse_reporter`)."""

    enabled: bool = False
    api: str = "in-cluster"  # "in-cluster" or "kubeconfig"
    kubeconfig: str = ""
    node_name: str = ""  # "": $NODE_NAME (the DaemonSet sets it from spec.nodeName)
    min_interval_s: float = 10.0
    timeout_s: float = 5.0
    topology: bool = True  # also write the NodeResourceTopology


_APIS = ("in-cluster", "kubeconfig")


def parse_reporter(table: Mapping[str, Any]) -> ReporterSettings:
    """``[reporter]`` as settings; ValueError names the key. Off unless enabled: writing
    to the API server needs RBAC the plain systemd install does not have.

    ```toml
    [reporter]
    enabled = true
    api = "in-cluster"        # or "kubeconfig"
    kubeconfig = ""
    node_name = ""            # "" = $NODE_NAME
    min_interval_ms = 10000
    timeout_ms = 5000
    topology = true           # the NodeResourceTopology too
    ```"""
    keys = {"enabled", "api", "kubeconfig", "node_name", "min_interval_ms", "timeout_ms"}
    keys.add("topology")
    unknown = set(table) - keys
    if unknown:
        raise ValueError(f"[reporter] has no key(s) {sorted(unknown)}; allowed: {sorted(keys)}")

    def get(key: str, kind: type, default: Any) -> Any:
        value = table.get(key, default)
        if isinstance(value, bool) is not (kind is bool) or not isinstance(value, kind):
            raise ValueError(f"[reporter] {key} = {value!r} must be {kind.__name__}")
        return value

    api = get("api", str, "in-cluster")
    if api not in _APIS:
        raise ValueError(f"[reporter] api = {api!r}; use one of {list(_APIS)}")
    kubeconfig = get("kubeconfig", str, "")
    if api == "kubeconfig" and not kubeconfig:
        raise ValueError('[reporter] api = "kubeconfig" needs kubeconfig = "<path>"')
    interval = get("min_interval_ms", int, 10_000)
    timeout = get("timeout_ms", int, 5_000)
    if interval < 0 or timeout <= 0:
        raise ValueError("[reporter] min_interval_ms must be >= 0 and timeout_ms > 0")
    return ReporterSettings(
        enabled=get("enabled", bool, False),
        api=api,
        kubeconfig=kubeconfig,
        node_name=get("node_name", str, ""),
        min_interval_s=interval / 1000,
        timeout_s=timeout / 1000,
        topology=get("topology", bool, True),
    )


# --------------------------------------------------------------------------- inputs


def from_numa(reclaimable: Mapping[int, NumaReclaimable]) -> dict[int, tuple[int, int]]:
    """`reclaimable_by_numa`'s answer as the reporter's input."""
    return {node: (r.millicores, r.memory_bytes) for node, r in reclaimable.items()}


def zone_sizes(topology: Topology) -> dict[int, tuple[int, int]]:
    """Each NUMA node's size (millicores, memory bytes): the capacity of its zone."""
    return {n.id: (len(n.cpus) * 1000, n.memory_bytes or 0) for n in topology.nodes}


def _normalised(values: Values, what: str) -> dict[int, tuple[int, int]]:
    """A sorted copy; ValueError for what no quantity can say (negative, not whole)."""
    out: dict[int, tuple[int, int]] = {}
    for node in sorted(values):
        cpu, memory = values[node]
        for v in (node, cpu, memory):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{what}: NUMA node {node}: {v!r} is not a whole number >= 0")
        out[node] = (cpu, memory)
    return out


# --------------------------------------------------------------------------- documents


def node_status_patch(values: Values) -> dict[str, Any]:
    """The strategic merge patch for ``nodes/<name>/status``: the node totals."""
    millicpu = sum(cpu for cpu, _ in values.values())
    memory = sum(mem for _, mem in values.values())
    quantities = {RECLAIMED_MILLICPU: str(millicpu), RECLAIMED_MEMORY: str(memory)}
    return {"status": {"capacity": dict(quantities), "allocatable": dict(quantities)}}


def _cpu(millicores: int) -> int | str:
    """An IntOrString quantity: whole cores as an integer, "1500m" otherwise."""
    return millicores // 1000 if millicores % 1000 == 0 else f"{millicores}m"


def _resource(name: str, capacity: int | str, available: int | str) -> dict[str, Any]:
    return {"name": name, "capacity": capacity, "allocatable": capacity, "available": available}


def topology_object(
    node_name: str,
    values: Values,
    sizes: Values | None = None,
    owner_uid: str | None = None,
) -> dict[str, Any]:
    """The NodeResourceTopology for `values`. `sizes` gives each zone's capacity for
    ``cpu`` and ``memory``; without it (or for a node it does not list) the capacity is
    the reclaimable amount itself. `owner_uid`: the Node's uid, so that the object is
    garbage-collected with its node instead of outliving it."""
    zones = []
    for node, (cpu, memory) in sorted(values.items()):
        size_cpu, size_memory = (sizes or {}).get(node, (cpu, memory))
        zones.append(
            {
                "name": f"node-{node}",
                "type": "Node",
                "resources": [
                    _resource("cpu", _cpu(max(size_cpu, cpu)), _cpu(cpu)),
                    _resource("memory", max(size_memory, memory), memory),
                    _resource(RECLAIMED_MILLICPU, cpu, cpu),
                    _resource(RECLAIMED_MEMORY, memory, memory),
                ],
            }
        )
    metadata: dict[str, Any] = {"name": node_name, "labels": dict(MANAGED_BY)}
    if owner_uid:
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Node", "name": node_name, "uid": owner_uid}
        ]
    return {
        "apiVersion": f"{NRT_GROUP}/{NRT_VERSION}",
        "kind": NRT_KIND,
        "metadata": metadata,
        "zones": zones,
    }


# --------------------------------------------------------------------------- answers


@dataclass(frozen=True, slots=True)
class _Answer:
    """One request's outcome: the HTTP status (0: no answer), the body, one line."""

    status: int
    body: dict[str, Any]
    message: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def line(self, what: str) -> str:
        if self.status == 0:
            return f"{what}: {self.message}"
        detail = f": {self.message}" if self.message else ""
        return f"{what}: HTTP {self.status}{detail}"


@dataclass(slots=True)
class _Result:
    """What one publication did, handed from the worker thread back to the loop."""

    node: _Answer | None = None
    nrt: _Answer | None = None
    nrt_missing: bool = False  # the CRD is not installed
    nrt_version: str | None = None
    node_uid: str | None = None


def _parse(data: bytes | str | None) -> dict[str, Any]:
    if not data:
        return {}
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        text = data if isinstance(data, str) else data.decode("utf-8", "replace")
        return {"message": text}
    return parsed if isinstance(parsed, dict) else {}


def _version_of(body: Mapping[str, Any]) -> str | None:
    metadata = body.get("metadata")
    version = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
    return str(version) if version else None


# --------------------------------------------------------------------------- reporter


@dataclass(slots=True)
class _State:
    pending: dict[int, tuple[int, int]] | None = None
    node_sent: dict[str, Any] | None = None  # the last node patch the server accepted
    nrt_sent: dict[int, tuple[int, int]] | None = None
    nrt_version: str | None = None
    node_uid: str | None = None
    last_start: float | None = None  # clock() when the last publication began
    disabled: str = ""  # why nothing is published any more
    nrt_off: str = ""  # why the NodeResourceTopology is not written
    error: str = ""  # the last failure, "" after a success
    published: int = 0  # publications that wrote everything they had to
    history: list[str] = field(default_factory=list)


class Reporter:
    """Publishes reclaimable resources for one node; see the module docstring.

    Use from the event loop: `update(values)` after each plan change (cheap and
    synchronous: it only compares and schedules), `await close()` at shutdown."""

    def __init__(
        self,
        api_client: Any,
        node_name: str,
        *,
        zones: Values | None = None,
        min_interval_s: float = 10.0,
        timeout_s: float = 5.0,
        topology: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes import client

        if not node_name:
            raise ReporterUnavailable(
                "no node name: set NODE_NAME (a DaemonSet sets it from spec.nodeName "
                "through the downward API) or [reporter] node_name"
            )
        if not math.isfinite(min_interval_s) or min_interval_s < 0 or timeout_s <= 0:
            raise ValueError("min_interval_s must be >= 0 and timeout_s > 0")
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.node_name = node_name
        self.zones = _normalised(zones, "zone sizes") if zones is not None else None
        self.min_interval_s = min_interval_s
        self.timeout_s = timeout_s
        self.server = str(getattr(api_client.configuration, "host", ""))
        self._clock = clock
        self._state = _State(nrt_off="" if topology else "disabled by [reporter] topology")
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # -- construction

    @classmethod
    def in_cluster(cls, node_name: str, **kwargs: Any) -> Reporter:
        """From the pod's service account (the DaemonSet's)."""
        hint = 'or set [reporter] api = "kubeconfig"'
        return cls(in_cluster_client(hint), node_name, **kwargs)

    @classmethod
    def from_kubeconfig(cls, path: str | Path, node_name: str, **kwargs: Any) -> Reporter:
        """From a kubeconfig file (its current context), for an agent run outside a pod."""
        return cls(kubeconfig_client(path, "[reporter] kubeconfig"), node_name, **kwargs)

    @classmethod
    def for_url(
        cls, url: str, token: str | None, node_name: str, *, verify_ssl: bool = False, **kwargs: Any
    ) -> Reporter:
        """An API server at `url` with a bearer token (a test server, a proxy)."""
        return cls(_api_client(kubeapi.for_url(url, token, verify_ssl)), node_name, **kwargs)

    @classmethod
    def from_settings(cls, settings: ReporterSettings, zones: Values | None = None) -> Reporter:
        """What `[reporter]` asks for; ReporterUnavailable says what to fix."""
        node = this_node(settings.node_name)
        kwargs: dict[str, Any] = {
            "zones": zones,
            "min_interval_s": settings.min_interval_s,
            "timeout_s": settings.timeout_s,
            "topology": settings.topology,
        }
        if settings.api == "kubeconfig":
            return cls.from_kubeconfig(settings.kubeconfig, node, **kwargs)
        return cls.in_cluster(node, **kwargs)

    # -- the loop side

    def update(self, values: Values) -> None:
        """Publish `values` (NUMA node -> (millicores, bytes)) if they differ from what
        was published, now or when the quiet period ends. Call from the event loop."""
        state = self._state
        if state.disabled:
            return
        current = _normalised(values, "reclaimable values")
        # While a publication is in flight its values are not yet published: a return to
        # the old values must still be sent after it, so only an idle reporter skips here.
        if self._task is None and self._published(current):
            state.pending = None
            if self._timer is not None and self._task is None:
                self._timer.cancel()
                self._timer = None
                self._idle.set()
            return
        state.pending = current
        self._schedule()

    def status(self) -> dict[str, object]:
        """For the debug API: what is published, what is pending, and why not."""
        s = self._state
        return {
            "node": self.node_name,
            "server": self.server,
            "enabled": not s.disabled,
            "reason": s.disabled,
            "topology": s.nrt_off or "enabled",
            "last_error": s.error,
            "published": s.published,
            "pending": s.pending is not None,
            "node_status": s.node_sent,
            "numa": {str(k): list(v) for k, v in (s.nrt_sent or {}).items()},
        }

    @property
    def disabled(self) -> str:
        """Why the reporter stopped for good ("" while it works)."""
        return self._state.disabled

    @property
    def topology_reason(self) -> str:
        """Why the NodeResourceTopology is not written ("" while it is)."""
        return self._state.nrt_off

    async def settled(self) -> None:
        """Until nothing is pending or in flight (a timer counts as pending)."""
        await self._idle.wait()

    async def close(self) -> None:
        """Stop publishing: drop a pending change, give a request in flight its timeout,
        release the connection pool."""
        self._state.disabled = self._state.disabled or "closed"
        self._state.pending = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            await asyncio.wait([self._task], timeout=self._deadline())
        self._idle.set()
        close = getattr(self.api_client, "close", None)
        if callable(close):
            await asyncio.to_thread(close)

    def _published(self, values: dict[int, tuple[int, int]]) -> bool:
        s = self._state
        node_done = s.node_sent == node_status_patch(values)
        return node_done and (bool(s.nrt_off) or s.nrt_sent == values)

    def _deadline(self) -> float:
        """Bound on one publication: every request it may make, at its timeout each."""
        return self.timeout_s * (1 + 2 * MAX_WRITE_ATTEMPTS) + 1.0

    def _schedule(self) -> None:
        """Start now, or arm the one timer for when the quiet period ends. A publication
        in flight reschedules itself when it ends."""
        if self._task is not None or self._timer is not None:
            return
        self._idle.clear()
        last = self._state.last_start
        delay = 0.0 if last is None else last + self.min_interval_s - self._clock()
        loop = asyncio.get_running_loop()
        if delay <= 0:
            self._start()
        else:
            self._timer = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self._state.pending is None or self._state.disabled:
            self._idle.set()
            return
        self._start()

    def _start(self) -> None:
        self._state.last_start = self._clock()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        state = self._state
        values, state.pending = state.pending, None
        try:
            if values is not None:
                await self._publish(values)
        except Exception as exc:  # a client bug must not end reporting for good
            log.exception("publishing reclaimable resources failed unexpectedly")
            if values is not None:
                self._failed(values, f"unexpected error: {kubeapi.one_line(str(exc))}")
        finally:
            self._task = None
            if state.pending is not None and not state.disabled:
                if self._published(state.pending):
                    state.pending = None
                    self._idle.set()
                else:
                    self._schedule()
            else:
                state.pending = None
                self._idle.set()

    async def _publish(self, values: dict[int, tuple[int, int]]) -> None:
        s = self._state
        patch = node_status_patch(values)
        do_node = s.node_sent != patch
        do_nrt = not s.nrt_off and s.nrt_sent != values
        try:
            async with asyncio.timeout(self._deadline()):  # keeps a cancel (NriChannel.call)
                result = await asyncio.to_thread(
                    self._write, values, patch, do_node, do_nrt, s.nrt_version, s.node_uid
                )
        except TimeoutError:
            self._failed(values, f"the API server {self.server} did not finish in time")
            return
        errors: list[str] = []
        if result.node is not None:
            if result.node.ok:
                s.node_sent = patch
                s.node_uid = result.node_uid or s.node_uid
            elif result.node.status == 403:
                s.disabled = (
                    f"{result.node.line(f'patch nodes/{self.node_name}/status')}; grant the "
                    "service account 'patch' on nodes/status (deploy/kubernetes/rbac.yaml)"
                )
                log.error("node reporting disabled: %s", s.disabled)
                s.pending = None
                return
            else:
                errors.append(result.node.line(f"patch nodes/{self.node_name}/status"))
        if result.nrt is not None:
            what = f"NodeResourceTopology {self.node_name}"
            if result.nrt.ok:
                s.nrt_sent = values
                s.nrt_version = result.nrt_version
            elif result.nrt_missing:
                s.nrt_off = (
                    f"{what}: the CRD {NRT_PLURAL}.{NRT_GROUP} is not installed; node status "
                    "is still published"
                )
                log.warning("%s", s.nrt_off)
            elif result.nrt.status == 403:
                s.nrt_off = (
                    f"{result.nrt.line(what)}; grant the service account get/create/update "
                    f"on {NRT_PLURAL}.{NRT_GROUP} (deploy/kubernetes/rbac.yaml)"
                )
                log.error("topology reporting disabled: %s", s.nrt_off)
            else:
                s.nrt_version = result.nrt_version
                errors.append(result.nrt.line(what))
        if errors:
            self._failed(values, "; ".join(errors))
            return
        s.published += 1
        if s.error:
            log.info("publishing to %s works again", self.server)
        s.error = ""

    def _failed(self, values: dict[int, tuple[int, int]], line: str) -> None:
        """Keep the values for the next attempt (unless newer ones came meanwhile)."""
        s = self._state
        if s.pending is None:
            s.pending = values
        if line != s.error:
            log.warning(
                "cannot publish reclaimable resources (retry in %gs): %s", self.min_interval_s, line
            )
        s.error = line

    # -- the worker thread

    def _write(
        self,
        values: dict[int, tuple[int, int]],
        patch: dict[str, Any],
        do_node: bool,
        do_nrt: bool,
        version: str | None,
        node_uid: str | None,
    ) -> _Result:
        """Runs in a worker thread: touches no reporter state, returns what happened."""
        result = _Result()
        if do_node:
            result.node = self._call(
                self.core.patch_node_status,
                self.node_name,
                patch,
                _content_type=STRATEGIC_MERGE_PATCH,
            )
            metadata = result.node.body.get("metadata")
            if isinstance(metadata, dict) and metadata.get("uid"):
                result.node_uid = str(metadata["uid"])
            if result.node.status in (0, 403):  # no answer: the NRT would wait as long
                return result
        if do_nrt:
            owner = result.node_uid or node_uid
            body = topology_object(self.node_name, values, self.zones, owner)
            self._write_topology(result, body, version)
        return result

    def _write_topology(self, result: _Result, body: dict[str, Any], version: str | None) -> None:
        """Create or replace the object; a 409 re-reads it and tries again."""
        where = (NRT_GROUP, NRT_VERSION, NRT_PLURAL)
        for _ in range(MAX_WRITE_ATTEMPTS):
            if version is None:
                current = self._call(self.custom.get_cluster_custom_object, *where, self.node_name)
                if current.status == 404:
                    created = self._call(self.custom.create_cluster_custom_object, *where, body)
                    if created.status == 409:  # created by someone else meanwhile: read it
                        continue
                    result.nrt = created
                    result.nrt_missing = created.status == 404
                    result.nrt_version = _version_of(created.body)
                    return
                if not current.ok:
                    result.nrt = current
                    return
                version = _version_of(current.body)
            body["metadata"]["resourceVersion"] = version
            replaced = self._call(
                self.custom.replace_cluster_custom_object, *where, self.node_name, body
            )
            if replaced.status in (404, 409):  # deleted, or written by someone else
                version = None
                body["metadata"].pop("resourceVersion", None)
                continue
            result.nrt = replaced
            result.nrt_version = _version_of(replaced.body) if replaced.ok else None
            return
        result.nrt = _Answer(
            409, {}, f"still conflicting after {MAX_WRITE_ATTEMPTS} attempts (another writer?)"
        )

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> _Answer:
        """One request, never raising for what the server answers or fails to."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            response = method(
                *args, _preload_content=False, _request_timeout=self.timeout_s, **kwargs
            )
        except ApiException as exc:
            body = _parse(exc.body)
            message = kubeapi.one_line(str(body.get("message") or exc.reason or ""))
            return _Answer(int(exc.status or 0), body, message)
        except (HTTPError, OSError) as exc:
            return _Answer(0, {}, f"API server {self.server} did not answer: {kubeapi.cause(exc)}")
        status = int(getattr(response, "status", 0) or 0)
        data = getattr(response, "data", b"")
        release = getattr(response, "release_conn", None)
        if callable(release):
            release()
        body = _parse(data)
        ok = 200 <= status < 300
        return _Answer(status, body, "" if ok else kubeapi.one_line(str(body.get("message") or "")))


def _api_client(configuration: Any) -> Any:
    from kubernetes import client

    return client.ApiClient(configuration)


# --------------------------------------------------------------------------- the API client


def this_node(configured: str = "") -> str:
    """The node this agent runs on: the configured name, else $NODE_NAME (the DaemonSet
    sets it from spec.nodeName through the downward API); "" when neither says."""
    return configured or os.environ.get("NODE_NAME", "")


def in_cluster_client(hint: str) -> Any:
    """An ApiClient from the pod's service account; ReporterUnavailable says why not,
    ending with `hint`: what to configure instead."""
    instead = f"run nri-qos as a DaemonSet with a service account, {hint}"
    try:
        return _api_client(kubeapi.in_cluster(instead))
    except kubeapi.ClusterUnavailable as exc:
        raise ReporterUnavailable(str(exc)) from None


def kubeconfig_client(path: str | Path, key: str) -> Any:
    """An ApiClient from a kubeconfig file (its current context), for an agent run
    outside a pod; ReporterUnavailable names `key`, the setting to fix."""
    try:
        return _api_client(kubeapi.from_kubeconfig(path, key))
    except kubeapi.ClusterUnavailable as exc:
        raise ReporterUnavailable(str(exc)) from None


__all__ = [
    "RECLAIMED_MEMORY",
    "RECLAIMED_MILLICPU",
    "Reporter",
    "ReporterSettings",
    "ReporterUnavailable",
    "Values",
    "from_numa",
    "in_cluster_client",
    "kubeconfig_client",
    "node_status_patch",
    "parse_reporter",
    "this_node",
    "topology_object",
    "zone_sizes",
]
