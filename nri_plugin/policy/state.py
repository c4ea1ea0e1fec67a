"""The container table: one record per container the runtime told us about.

Rules:
* One record per live container: its pod, the container *as the kubelet asked for it*
  (our own adjustments undone from the `nri-qos.io/original` annotation, CRI updates
  merged in), its classification (computed once, when it arrives or its resources change)
  and its arrival order. Nothing else keeps per-container state, so nothing can disagree.
* Pods are kept by id; a container whose pod the runtime never showed us still gets a
  record (its pod is then known by id only).
* The table does no planning and no I/O: the engine admits, replaces and drops records
  and asks the planner for the consequences.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace

from nri_plugin.policy.qos import Classification
from nri_plugin.policy.workload import RECLAIMED_SHARES
from qos_model.containers import Container, Pod
from qos_model.text import NAME_LIMIT, clip

ORIGINAL_ANNOTATION = "nri-qos.io/original"
"""JSON of the kubelet's own values we override: {"oom_score_adj": n, "cpu_shares": n}."""


@dataclass(frozen=True, slots=True)
class ContainerRecord:
    container: Container  # as the kubelet asked for it
    classification: Classification
    order: int  # arrival order; ties in planning are broken by id
    name: str  # "<namespace>/<pod>/<container>", or "<pod id>/<container>" if the pod is unknown
    # The kubelet changed its CPU weight, quota or memory limit since creation (an in-place
    # resize): from then on those values are the kubelet's, never overridden by us.
    resized: bool = False

    @property
    def id(self) -> str:
        return self.container.id

    @property
    def pod_id(self) -> str:
        return self.container.pod_id


class ContainerTable:
    def __init__(self) -> None:
        self.pods: dict[str, Pod] = {}
        self._records: dict[str, ContainerRecord] = {}
        self._by_pod: dict[str, set[str]] = {}
        self._next_order = 1

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, container_id: object) -> bool:
        return container_id in self._records

    def __iter__(self) -> Iterator[ContainerRecord]:
        return iter(self._records.values())

    def get(self, container_id: str) -> ContainerRecord | None:
        return self._records.get(container_id)

    def clear(self) -> None:
        self.pods.clear()
        self._records.clear()
        self._by_pod.clear()

    def name_for(self, container: Container) -> str:
        """ "namespace/pod/container", for people: clipped, since all three are input."""
        pod = self.pods.get(container.pod_id)
        if pod is None:
            return clip(f"{container.pod_id}/{container.name}", NAME_LIMIT)
        return clip(f"{pod.namespace}/{pod.name}/{container.name}", NAME_LIMIT)

    def admit(
        self, container: Container, classification: Classification, resized: bool = False
    ) -> ContainerRecord:
        """A new record, last in arrival order (a known id keeps its place)."""
        known = self._records.get(container.id)
        order = known.order if known is not None else self._take_order()
        name = self.name_for(container)
        record = ContainerRecord(container, classification, order, name, resized)
        self._records[container.id] = record
        members = self._by_pod.get(container.pod_id)
        if members is None:
            members = self._by_pod[container.pod_id] = set()
        members.add(container.id)
        return record

    def replace(self, record: ContainerRecord) -> None:
        self._records[record.id] = record

    def drop(self, container_id: str) -> ContainerRecord | None:
        record = self._records.pop(container_id, None)
        if record is not None:
            members = self._by_pod.get(record.pod_id)
            if members is not None:
                members.discard(container_id)
                if not members:
                    del self._by_pod[record.pod_id]
        return record

    def of_pod(self, pod_id: str) -> list[str]:
        return sorted(self._by_pod.get(pod_id, ()))

    def _take_order(self) -> int:
        order = self._next_order
        self._next_order += 1
        return order


def restore_original(container: Container) -> Container:
    """The container with the kubelet's original values that our adjustments replaced.
    The CPU weight is put back only while it is the one we set (RECLAIMED_SHARES): any
    other is the kubelet's own, from an in-place resize (`resized_since_created`), and
    stands."""
    raw = container.annotations.get(ORIGINAL_ANNOTATION)
    if not raw:
        return container
    oom, shares = _originals(raw)
    res = container.resources
    cpu = res.cpu if res is not None else None
    restore_shares = (
        shares is not None
        and cpu is not None
        and cpu.shares == RECLAIMED_SHARES
        and shares != RECLAIMED_SHARES
    )
    if (oom is None or oom == container.oom_score_adj) and not restore_shares:
        return container
    if restore_shares:
        assert res is not None and cpu is not None
        res = replace(res, cpu=replace(cpu, shares=shares))
    return replace(
        container,
        oom_score_adj=container.oom_score_adj if oom is None else oom,
        resources=res,
    )


def resized_since_created(container: Container) -> bool:
    """Whether the kubelet has set the container's CPU weight since we created it: the
    weight it shows is neither the original we recorded nor the one we set. After a
    restart this is all that is left of an in-place resize, and it decides whether a
    reclaimed container's weight is ours or the kubelet's (planner `_weight`). A resize
    back to exactly the original weight cannot be told from none."""
    raw = container.annotations.get(ORIGINAL_ANNOTATION)
    res = container.resources
    if not raw or res is None or res.cpu is None or res.cpu.shares is None:
        return False
    _, original = _originals(raw)
    return original is not None and res.cpu.shares not in (original, RECLAIMED_SHARES)


def _originals(raw: str) -> tuple[int | None, int | None]:
    """(oom_score_adj, cpu_shares) from our annotation; None where absent or not an int.
    Remembered: the same few texts repeat on every container of a Synchronize."""
    found = _ORIGINALS.get(raw)
    if found is None:
        try:
            original = json.loads(raw)
        except (ValueError, RecursionError):
            original = None
        if not isinstance(original, dict):
            original = {}
        found = (_int(original.get("oom_score_adj")), _int(original.get("cpu_shares")))
        if len(raw) <= 256:  # ours is ~40 bytes; a huge text is input, not worth keeping
            if len(_ORIGINALS) >= 1024:
                _ORIGINALS.clear()
            _ORIGINALS[raw] = found
    return found


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


_ORIGINALS: dict[str, tuple[int | None, int | None]] = {}


def originals_annotation(container: Container) -> str:
    """The JSON we store on a container we adjust, so a restart can undo our values.
    Written by hand for plain ints (what the runtime gives), the text json.dumps makes of
    them (keys sorted, no spaces): this runs on every CreateContainer."""
    res = container.resources
    shares = res.cpu.shares if res is not None and res.cpu is not None else None
    oom = container.oom_score_adj
    if (oom is None or type(oom) is int) and (shares is None or type(shares) is int):
        if shares is None:
            return "{}" if oom is None else f'{{"oom_score_adj":{oom}}}'
        if oom is None:
            return f'{{"cpu_shares":{shares}}}'
        return f'{{"cpu_shares":{shares},"oom_score_adj":{oom}}}'
    original: dict[str, int] = {}
    if container.oom_score_adj is not None:
        original["oom_score_adj"] = container.oom_score_adj
    if shares is not None:
        original["cpu_shares"] = shares
    return json.dumps(original, sort_keys=True, separators=(",", ":"))
