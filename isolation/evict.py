"""Carrying out an eviction: the Kubernetes Eviction API first, killing through the cgroup
only when an operator asked for it.

Why the API: an eviction through ``pods/<name>/eviction`` is the one way to remove a pod
that honours its PodDisruptionBudget, runs its preStop hooks and grace period, and lets
its controller (Deployment, StatefulSet...) replace it elsewhere. The API server answers
429 while a budget forbids it: that is a "not now" the caller must respect (try again
later), never a failure to work around by killing. 404 means the pod is already gone.
Anything else (5xx, timeouts, no connection) is a failure the caller may retry.

Why a cgroup kill at all: when the API server cannot be reached, a node under memory or
CPU pressure may still need the offender stopped. `CgroupKiller` does that for one
container, and only for a group that is provably the container's own
(`isolation.ownership`): cgroup v2's ``cgroup.kill`` (kernel >= 5.14) kills every process
of the group at once, forks included; without it each member gets SIGKILL through a
pidfd, in passes, because a process can fork while its siblings are being killed.

Before evicting, the pod can be read (`controller_of`): its controller ownerReference
is the workload that re-creates it, which the caller uses to refuse eviction loops
(the same owner evicted from this node again and again). When it refuses, `report`
posts a Warning Event on the pod, so the loop is visible where people look
(`kubectl describe pod`, `kubectl get events`).

Every action goes through `HostWriter` with its reason, so it is logged and a dry run
records it without doing it. This module does not import `kubernetes` until an evictor
is built: the client takes about a second to import, and most nodes never evict.
"""

from __future__ import annotations

import errno as errno_codes
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from isolation import kubeapi
from isolation.cgroups import CgroupUnsupported
from isolation.errors import HostError
from isolation.host import LinuxHost
from isolation.oom import ProcfsError
from isolation.ownership import in_group, own_group
from isolation.writes import HostChange, HostWriter

if TYPE_CHECKING:
    from kubernetes.client import CoreV1Api

log = logging.getLogger("nri_qos.evict")


class EvictOutcome(StrEnum):
    EVICTED = "evicted"  # the API server accepted the eviction (the pod terminates gracefully)
    NOT_NOW = "not-now"  # 429: a PodDisruptionBudget forbids it now; ask again later
    GONE = "gone"  # 404: the pod no longer exists
    KILLED = "killed"  # the container's processes were killed through its cgroup
    FAILED = "failed"  # no answer, or an answer that is none of the above
    DRY_RUN = "dry-run"  # decided and recorded, nothing done


@dataclass(frozen=True)
class EvictResult:
    outcome: EvictOutcome
    message: str
    retry_after_s: float | None = None
    http_status: int | None = None  # the API server's answer (None: no answer, or a kill)

    def __str__(self) -> str:
        return f"{self.outcome}: {self.message}"


@dataclass(frozen=True)
class PodController:
    """A pod's controller ownerReference ("ReplicaSet", "web-5d8f7c9b4"), as the API
    server has it."""

    kind: str
    name: str
    uid: str = ""


def controller_of(pod: Mapping[str, Any]) -> PodController | None:
    """The ownerReference marked `controller: true` in a Pod object (None: none)."""
    metadata = pod.get("metadata")
    refs = metadata.get("ownerReferences") if isinstance(metadata, dict) else None
    for ref in refs if isinstance(refs, list) else ():
        if isinstance(ref, dict) and ref.get("controller") and ref.get("kind") and ref.get("name"):
            return PodController(str(ref["kind"]), str(ref["name"]), str(ref.get("uid") or ""))
    return None


class EvictorUnavailable(Exception):
    """No API server can be reached from here; the message says what to configure."""


class KubernetesEvictor:
    """Evicts pods through the API server (``POST .../pods/<pod>/eviction``)."""

    def __init__(
        self,
        api: CoreV1Api | None = None,
        *,
        writer: HostWriter | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        if api is None:
            api = _core_api(kubeapi.no_retries())
        self.api = api
        self.writer = writer if writer is not None else HostWriter()
        self.timeout_s = timeout_s
        self.server = str(getattr(api.api_client.configuration, "host", ""))

    @classmethod
    def in_cluster(cls, writer: HostWriter | None = None) -> KubernetesEvictor:
        """From the pod's service account (a DaemonSet's)."""
        instead = "set [eviction] kubeconfig or run nri-qos as a DaemonSet with a service account"
        try:
            return cls._with(kubeapi.in_cluster(instead), writer)
        except kubeapi.ClusterUnavailable as exc:
            raise EvictorUnavailable(str(exc)) from None

    @classmethod
    def from_kubeconfig(
        cls, path: str | Path, writer: HostWriter | None = None
    ) -> KubernetesEvictor:
        """From a kubeconfig file (its current context), for nodes run outside a pod."""
        try:
            return cls._with(kubeapi.from_kubeconfig(path, "[eviction] kubeconfig"), writer)
        except kubeapi.ClusterUnavailable as exc:
            raise EvictorUnavailable(str(exc)) from None

    @classmethod
    def for_url(
        cls,
        url: str,
        token: str | None,
        writer: HostWriter | None = None,
        verify_ssl: bool = False,
    ) -> KubernetesEvictor:
        """An API server at `url`, with a bearer token (a test server, a proxy)."""
        return cls._with(kubeapi.for_url(url, token, verify_ssl), writer)

    @classmethod
    def _with(cls, configuration: Any, writer: HostWriter | None) -> KubernetesEvictor:
        return cls(_core_api(configuration), writer=writer)

    def close(self) -> None:
        """Release the connection pool."""
        close = getattr(self.api.api_client, "close", None)
        if callable(close):
            close()

    def evict(
        self,
        namespace: str,
        pod: str,
        reason: str,
        *,
        grace_period_s: int | None = None,
        uid: str | None = None,
    ) -> EvictResult:
        """Ask the API server to evict the pod. Never raises for what the server answers
        or for a server that does not answer: the outcome says it, and the caller decides
        whether to retry. `reason` is logged (the Eviction API has no field for it).

        `uid` makes the eviction conditional on the pod still being that one: a pod
        deleted and re-created under the same name (a StatefulSet's) is not the one we
        decided about, and the API server then answers 409, reported as GONE."""
        grace = "" if grace_period_s is None else f"grace period {grace_period_s}s"
        change = HostChange("evict pod", f"{namespace}/{pod}", grace, reason)
        result = self.writer.apply(
            change, lambda: self._post(namespace, pod, grace_period_s, uid or None)
        )
        if result is None:
            return EvictResult(
                EvictOutcome.DRY_RUN, f"would evict pod {namespace}/{pod} ({reason})"
            )
        level = logging.WARNING if result.outcome is EvictOutcome.FAILED else logging.INFO
        log.log(level, "evict pod %s/%s (%s): %s", namespace, pod, reason, result)
        return result

    def _post(
        self, namespace: str, pod: str, grace_period_s: int | None, uid: str | None
    ) -> EvictResult:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        body = client.V1Eviction(
            api_version="policy/v1",
            kind="Eviction",
            metadata=client.V1ObjectMeta(name=pod, namespace=namespace),
            delete_options=(
                None
                if grace_period_s is None and uid is None
                else client.V1DeleteOptions(
                    grace_period_seconds=grace_period_s,
                    preconditions=None if uid is None else client.V1Preconditions(uid=uid),
                )
            ),
        )
        where = f"pod {namespace}/{pod}"
        try:
            # Not preloaded: the answer is a Status, not an Eviction, and only its code
            # matters; deserialising it as the declared type could fail on a success.
            response: Any = self.api.create_namespaced_pod_eviction(
                pod,
                namespace,
                body,
                _preload_content=False,
                _request_timeout=self.timeout_s,
            )
        except ApiException as exc:
            return _answer(where, exc.status, exc.reason, exc.body, exc.headers, uid)
        except (HTTPError, OSError) as exc:
            return EvictResult(
                EvictOutcome.FAILED,
                f"{where}: API server {self.server} did not answer: {kubeapi.cause(exc)}",
            )
        status = int(getattr(response, "status", 0) or 0)
        data = getattr(response, "data", b"")
        release = getattr(response, "release_conn", None)
        if callable(release):
            release()
        reason = getattr(response, "reason", "")
        return _answer(where, status, reason, data, response.headers, uid)

    def controller(self, namespace: str, pod: str) -> PodController | None:
        """The pod's controller, read from the API server (``GET .../pods/<pod>``); None
        when it has none or cannot be read now (the caller then goes on without it)."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            response: Any = self.api.read_namespaced_pod(
                pod, namespace, _preload_content=False, _request_timeout=self.timeout_s
            )
        except (ApiException, HTTPError, OSError) as exc:
            log.debug("reading pod %s/%s for its owner failed: %s", namespace, pod, exc)
            return None
        data = getattr(response, "data", b"")
        release = getattr(response, "release_conn", None)
        if callable(release):
            release()
        return controller_of(_status_body(data))

    def report(self, namespace: str, pod: str, uid: str, reason: str, message: str) -> EvictResult:
        """Post a Warning Event about the pod (``reason``: a CamelCase word such as
        "EvictionLoop"). Never raises for what the server answers."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        now = datetime.now(UTC)
        text = message[:1024]  # the API server refuses longer event messages
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{pod}.", namespace=namespace),
            involved_object=client.V1ObjectReference(
                api_version="v1", kind="Pod", name=pod, namespace=namespace, uid=uid or None
            ),
            reason=reason,
            message=text,
            type="Warning",
            source=client.V1EventSource(component="nri-qos", host=socket.gethostname()),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            reporting_component="nri-qos",
            reporting_instance=socket.gethostname(),
        )
        where = f"pod {namespace}/{pod}"

        def post() -> EvictResult:
            try:
                response: Any = self.api.create_namespaced_event(
                    namespace, event, _preload_content=False, _request_timeout=self.timeout_s
                )
            except ApiException as exc:
                line = f"HTTP {exc.status}: {_status_message(_status_body(exc.body))}"
                return EvictResult(
                    EvictOutcome.FAILED, f"event on {where}: {line}", None, exc.status
                )
            except (HTTPError, OSError) as exc:
                return EvictResult(EvictOutcome.FAILED, f"event on {where}: {kubeapi.cause(exc)}")
            release = getattr(response, "release_conn", None)
            if callable(release):
                release()
            status = int(getattr(response, "status", 0) or 0)
            return EvictResult(EvictOutcome.EVICTED, f"event {reason} on {where}", None, status)

        change = HostChange("report event", f"{namespace}/{pod}", reason, text)
        result = self.writer.apply(change, post)
        if result is None:
            return EvictResult(EvictOutcome.DRY_RUN, f"would post event {reason} on {where}")
        return result


def _core_api(configuration: Any) -> CoreV1Api:
    """The core API over one connection pool. Content-Type is set for every request:
    some client versions send the JSON body without it, which the API server accepts
    (it defaults to JSON) but a proxy in front of it may not."""
    from kubernetes import client

    api_client = client.ApiClient(configuration)
    api_client.set_default_header("Content-Type", "application/json")  # type: ignore[no-untyped-call]
    return client.CoreV1Api(api_client)


def _answer(
    where: str,
    status: int | None,
    reason: str | None,
    body: str | bytes | None,
    headers: Mapping[str, str] | None,
    uid: str | None = None,
) -> EvictResult:
    """What an API server's answer to an eviction means."""
    code = int(status or 0)
    parsed = _status_body(body)
    message = _status_message(parsed)
    if 200 <= code < 300:
        return EvictResult(EvictOutcome.EVICTED, f"{where} evicted", http_status=code)
    if code == 429:
        after = _retry_after(headers, parsed)
        text = message or "the API server asks to try again later"
        return EvictResult(EvictOutcome.NOT_NOW, f"{where}: {text}", after, code)
    if code == 404:
        return EvictResult(EvictOutcome.GONE, f"{where} no longer exists", http_status=code)
    if code == 409 and uid is not None:  # the uid precondition failed
        return EvictResult(
            EvictOutcome.GONE,
            f"{where} (uid {uid}) no longer exists: another pod has that name now",
            http_status=code,
        )
    line = f"HTTP {code} {reason or ''}".rstrip()
    detail = f": {message}" if message else ""
    return EvictResult(EvictOutcome.FAILED, f"{where}: {line}{detail}", http_status=code)


def _status_body(body: str | bytes | None) -> dict[str, Any]:
    if not body:
        return {}
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {"message": body if isinstance(body, str) else body.decode("utf-8", "replace")}
    return parsed if isinstance(parsed, dict) else {}


def _status_message(status: Mapping[str, Any]) -> str:
    """A Status's message and its causes (the budget that refused: "The disruption
    budget web-pdb needs 2 healthy pods and has 2 currently"), on one line."""
    parts = [str(status.get("message") or "")]
    details = status.get("details")
    causes = details.get("causes") if isinstance(details, dict) else None
    for cause in causes if isinstance(causes, list) else ():
        if isinstance(cause, dict) and cause.get("message"):
            parts.append(str(cause["message"]))
    return kubeapi.one_line(" ".join(p.strip() for p in parts if p.strip()))


def _retry_after(headers: Mapping[str, str] | None, status: Mapping[str, Any]) -> float | None:
    """Seconds to wait: the Retry-After header, else the Status's retryAfterSeconds."""
    value: Any = None
    if headers is not None:
        value = headers.get("Retry-After") or headers.get("retry-after")
    if value is None:
        details = status.get("details")
        value = details.get("retryAfterSeconds") if isinstance(details, dict) else None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None  # absent, or an HTTP date the API server never sends
    return seconds if seconds >= 0 else None


# --------------------------------------------------------------------------- cgroup kill


class CgroupKiller:
    """Kills every process of one container's own cgroup."""

    def __init__(
        self, host: LinuxHost, writer: HostWriter, *, passes: int = 5, settle_s: float = 0.05
    ) -> None:
        self.host = host
        self.writer = writer
        self.passes = passes
        self.settle_s = settle_s

    def kill(self, cgroups_path: str, container_id: str, reason: str) -> EvictResult:
        """Kill the container's processes; KILLED when its group was left empty.

        Raises ForeignCgroup (a RefusedAction) when the path is not provably the
        container's: killing "its" processes could then kill the node's. A group that
        still has processes after the last pass is FAILED, with how many are left."""
        group = own_group(cgroups_path, container_id)
        _, members = self.host.member_pids(cgroups_path, container_id, None)
        if not members:
            return EvictResult(EvictOutcome.GONE, f"{group}: no process left to kill")
        if self.writer.dry_run:
            self._plan(group, cgroups_path, container_id, members, reason)
            return EvictResult(
                EvictOutcome.DRY_RUN, f"would kill {len(members)} process(es) of {group}"
            )
        killed: set[int] = set()
        kill_file = self._kill_file(cgroups_path, container_id)
        if kill_file is not None:
            # One write kills the whole group, forks included, atomically in the kernel.
            self.writer.write(kill_file, "1", reason)
            killed.update(members)
        for _ in range(self.passes):
            _, members = self.host.member_pids(cgroups_path, container_id, None)
            if not members:
                break
            for pid in members:
                if self._signal(pid, group, reason):
                    killed.add(pid)
            time.sleep(self.settle_s)
        else:
            _, members = self.host.member_pids(cgroups_path, container_id, None)
        how = "cgroup.kill" if kill_file is not None else "SIGKILL"
        if members:
            return EvictResult(
                EvictOutcome.FAILED,
                f"{group}: {len(members)} process(es) still alive after {self.passes} passes "
                f"of {how} ({len(killed)} killed)",
            )
        return EvictResult(
            EvictOutcome.KILLED, f"{group}: killed {len(killed)} process(es) ({how})"
        )

    def _kill_file(self, cgroups_path: str, container_id: str) -> Path | None:
        """The group's cgroup.kill, when it has a cgroup2 directory on a kernel >= 5.14."""
        try:
            directory = self.host.group_dir(cgroups_path, container_id, "")
        except CgroupUnsupported:
            return None
        path = directory / "cgroup.kill"
        return path if path.exists() else None

    def _signal(self, pid: int, group: PurePosixPath, reason: str) -> bool:
        """SIGKILL `pid` if it is (still) in the group; True when the signal was sent.

        The pid is pinned with a pidfd before its group is checked, so a pid that exits
        and is reused by another process between the check and the signal cannot be hit:
        the signal goes to the process the pidfd refers to, or nowhere. Kernels without
        pidfds (before 5.3) get a plain kill(2) right after the check."""
        try:
            fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except OSError as exc:
            if exc.errno != errno_codes.ENOSYS:
                raise _signal_error(pid, group, "pidfd_open", exc) from exc
            fd = None
        try:
            try:
                text = self.host.procs.read_cgroup(pid)
            except ProcfsError:
                return False  # gone
            if not in_group(text, group):
                return False
            change = HostChange("kill", f"pid {pid}", "SIGKILL", reason)
            pinned = fd
            try:
                if pinned is None:
                    self.writer.apply(change, lambda: os.kill(pid, signal.SIGKILL))
                else:
                    self.writer.apply(
                        change, lambda: signal.pidfd_send_signal(pinned, signal.SIGKILL)
                    )
            except ProcessLookupError:
                return False
            except OSError as exc:
                raise _signal_error(pid, group, "SIGKILL", exc) from exc
            return True
        finally:
            if fd is not None:
                os.close(fd)

    def _plan(
        self,
        group: PurePosixPath,
        cgroups_path: str,
        container_id: str,
        members: list[int],
        reason: str,
    ) -> None:
        """Dry run: record what a real kill would do first."""
        kill_file = self._kill_file(cgroups_path, container_id)
        if kill_file is not None:
            self.writer.write(kill_file, "1", reason)
            return
        for pid in members:
            self.writer.apply(HostChange("kill", f"pid {pid}", "SIGKILL", reason), lambda: None)


def _signal_error(pid: int, group: PurePosixPath, what: str, exc: OSError) -> HostError:
    code = exc.errno or errno_codes.EIO
    return HostError(
        f"/proc/{pid}", code, f"{what} on process {pid} of {group} failed: {os.strerror(code)}"
    )
