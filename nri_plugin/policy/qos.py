"""Which Katalyst QoS class a container gets, and which enhancements it asked for.

Rules:

* Pure, never raises on annotation content. An annotation we cannot honour gets a
  documented default and a `ClassificationWarning` (key, value, what was used, why) for the
  caller to log once and show in the debug API.
* Katalyst's formats are kept exactly (katalyst-api `pkg/consts/qos.go`, `pod.go`;
  katalyst-core `pkg/util/qos`). Enhancements are JSON objects of *strings*. A flag is on
  only for "true" (`numa_share` is off only for "false"), and integers are read as Go's
  `strconv.Atoi` reads them. Where Katalyst is lax ("True" is not "true"), its outcome is
  kept and a warning is added. Where Katalyst would refuse the pod, the enhancement is
  dropped with a warning. A non-string value loses only its key; Katalyst drops the map.
* Only what the planner uses is read: qos_level, the cpu and memory enhancements above and
  oom_priority. Katalyst's other keys (numa_number, numa_ids, network_enhancement,
  net_class_id) are not parsed until a planner decision uses them (the network issue wires
  net_class_id into the plan's net_class).
* Enhancements are kept only where katalyst-core honours them. numa_binding applies to
  dedicated, shared and reclaimed cores. numa_exclusive and full_pcpus_pairing need
  dedicated_cores with numa_binding, and pairing cannot go with exclusive.
  numa_share=false applies to shared and dedicated cores, and cpuset_pool to shared and
  system cores. A shared pool may not take the name of a built-in pool.

Lookup. For each key K the first usable value wins: `K/container.<name>`, then `K/pod`,
then `K` (the NRI plugins' scoping convention). Kubernetes refuses a key with two "/", so
`katalyst.kubewharf.io/qos_level/container.app` only reaches us from CRI clients that bypass
the API server; every scoped key is therefore also accepted in the form the NRI plugins use
for annotations that must pass the API server: the name moved in front of the domain,
`qos_level.katalyst.kubewharf.io/container.app` and `qos_level.katalyst.kubewharf.io/pod`.
Within a scope, the pod's annotations come before the container's. The kubelet puts the
pod's annotations on the sandbox, and CRI-O also copies them onto containers (containerd
does not). An unusable value (an unknown class, bad JSON) is skipped with a warning and the
next scope is tried. JSON maps are taken whole, not merged.

Without a `qos_level` annotation:

* With `system_namespaces_to_system_cores` set, pods in `system_namespaces` and critical
  pods get system_cores. NRI cannot see priority classes, so "critical" means one of two
  things. A static pod: the kubelet stamps `kubernetes.io/config.source` on every pod, and
  any value other than "api" counts. A system-node-critical pod that is not Guaranteed: it
  has the Guaranteed oom_score_adj but resources that cannot be Guaranteed. The legacy
  `scheduler.alpha.kubernetes.io/critical-pod` is ignored (current kubelets do not read it).
* Otherwise: Guaranteed gets shared_cores, or dedicated_cores with
  `guaranteed_integral_to_dedicated` and whole CPUs. Burstable gets shared_cores,
  BestEffort gets reclaimed_cores, and unknown gets shared_cores (Katalyst's default). A
  critical pod is never put into reclaimed_cores: a BestEffort one gets shared_cores.

`nri_plugin.policy.kube_qos` reads the Kubernetes QoS back from the kubelet's values.

Classify a container as the runtime first presents it: after a restart, Synchronize shows
the values we adjusted (oom_score_adj, shares), and deriving from those drifts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final, NoReturn

from nri_plugin.policy.kube_qos import (
    MILLI_PER_CPU,
    KubeQos,
    KubeQosEstimate,
    estimate_kube_qos,
)
from qos_model.containers import Container, Pod

# --- annotation keys and the keys inside the JSON enhancement maps --------------------------
ANNOTATION_QOS_LEVEL: Final = "katalyst.kubewharf.io/qos_level"
ANNOTATION_CPU_ENHANCEMENT: Final = "katalyst.kubewharf.io/cpu_enhancement"
ANNOTATION_MEMORY_ENHANCEMENT: Final = "katalyst.kubewharf.io/memory_enhancement"
ANNOTATION_CONFIG_SOURCE: Final = "kubernetes.io/config.source"  # set by the kubelet
SCOPE_POD: Final = "/pod"
SCOPE_CONTAINER: Final = "/container."
CPU_NUMA_SHARE: Final = "numa_share"
CPU_CPUSET_POOL: Final = "cpuset_pool"
CPU_FULL_PCPUS_PAIRING: Final = "full_pcpus_pairing"
MEMORY_NUMA_BINDING: Final = "numa_binding"
MEMORY_NUMA_EXCLUSIVE: Final = "numa_exclusive"
MEMORY_OOM_PRIORITY: Final = "oom_priority"

CONFIG_SOURCE_API: Final = "api"  # kubelet pod sources: "api", "file", "http"

# Katalyst OOM priority (katalyst-api qos.go; katalyst-core pkg/util/qos/oom_priority.go):
# each class owns [base, base + 99]; -300 opts out; 300 means "never OOM-kill".
OOM_PRIORITY_IGNORE: Final = -300
OOM_PRIORITY_TOP: Final = 300
OOM_PRIORITY_SPAN: Final = 100

_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1

_ATOI = re.compile(r"[+-]?[0-9]+")
# katalyst-core commonstate pool names: a shared_cores pool must not alias one of them
_RESERVED_POOLS: Final = frozenset({"reclaim", "dedicated", "reserve", "interrupt", "fallback"})
_RESERVED_POOL_PREFIXES: Final = ("isolation", "system")
_EMPTY_MAP: Final[Mapping[str, str]] = MappingProxyType({})


class QosClass(StrEnum):
    SYSTEM_CORES = "system_cores"
    DEDICATED_CORES = "dedicated_cores"
    SHARED_CORES = "shared_cores"
    RECLAIMED_CORES = "reclaimed_cores"


class ClassSource(StrEnum):
    ANNOTATION = "annotation"  # K or K/pod
    CONTAINER_OVERRIDE = "container-override"  # K/container.<name>
    SYSTEM_POD = "system-pod"  # system namespace or critical pod
    KUBERNETES_QOS = "kubernetes-qos"
    DEFAULT = "default"  # nothing known: Katalyst's default class


_OOM_PRIORITY_BASE: Final[Mapping[QosClass, int]] = MappingProxyType(
    {
        QosClass.RECLAIMED_CORES: -100,
        QosClass.SHARED_CORES: 0,
        QosClass.DEDICATED_CORES: 100,
        QosClass.SYSTEM_CORES: 200,
    }
)


_CLASS_NAMES: Final = ", ".join(c.value for c in QosClass)


def oom_priority_range(qos_class: QosClass) -> tuple[int, int]:
    """The inclusive Katalyst OOM priority range of a class; its low end is the default."""
    base = _OOM_PRIORITY_BASE[qos_class]
    return base, base + OOM_PRIORITY_SPAN - 1


class QosConfigError(ValueError):
    """A QosConfig that cannot work; the message names the field."""


@dataclass(frozen=True, slots=True)
class QosConfig:
    """Both switches default to off, as in Katalyst, which maps neither."""

    guaranteed_integral_to_dedicated: bool = False
    system_namespaces_to_system_cores: bool = False
    system_namespaces: tuple[str, ...] = ("kube-system",)

    def __post_init__(self) -> None:
        # A bare string is a tuple of characters to a careless caller; refuse it.
        names = self.system_namespaces
        if not isinstance(names, tuple) or not all(isinstance(n, str) and n for n in names):
            raise QosConfigError(
                f"qos config: system_namespaces must be a tuple of non-empty namespace names, "
                f"got {names!r}"
            )


@dataclass(frozen=True, slots=True)
class ClassificationWarning:
    key: str  # the annotation key as found, with its scope suffix
    value: str
    default: str  # what was used instead
    reason: str
    field: str = ""  # the key inside a JSON enhancement map, if any


@dataclass(frozen=True, slots=True)
class Classification:
    qos_class: QosClass
    source: ClassSource
    reason: str
    kube_qos: KubeQos | None
    critical_pod: bool  # static pod or inferred system-node-critical, whatever the class
    cpu_request_millicores: int | None
    cpu_limit_millicores: int | None
    cpu_millicores: int | None  # the CPU size: the limit, else a non-zero request
    cpu_integral: bool  # cpu_millicores is a positive whole number of CPUs
    numa_binding: bool = False
    numa_exclusive: bool = False
    numa_share: bool = True
    full_pcpus_pairing: bool = False
    cpuset_pool: str | None = None  # None: the class's default pool
    oom_priority: int | None = None  # in the class range, or OOM_PRIORITY_IGNORE/_TOP
    warnings: tuple[ClassificationWarning, ...] = ()
    # The container's role in its pod (roles.Role: app, init, sidecar, ephemeral) and, when
    # the role changed what the annotations asked for, why (roles.apply_role).
    role: str = "app"
    role_reason: str = ""


# --- annotation lookup -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Found:
    key: str
    value: str
    container_scoped: bool


def scoped_key_bases(key: str) -> tuple[str, ...]:
    """`domain/name` as written, then as `name.domain` (valid in Kubernetes once scoped)."""
    domain, slash, name = key.partition("/")
    return (key, f"{name}.{domain}") if slash and name else (key,)


_SCOPED_KEYS: dict[tuple[str, str], tuple[tuple[str, bool], ...]] = {}


def _scoped_keys(key: str, name: str) -> tuple[tuple[str, bool], ...]:
    """The keys to try for `key` on a container named `name`, most specific first, each
    with whether it is container-scoped. Remembered: every container asks for the same
    few keys, and names repeat."""
    found = _SCOPED_KEYS.get((key, name))
    if found is None:
        bases = scoped_key_bases(key)
        scoped = [(f"{b}{SCOPE_CONTAINER}{name}", True) for b in bases] if name else []
        pod = [(f"{b}{SCOPE_POD}", False) for b in bases]
        found = (*scoped, *pod, (key, False))
        if len(name) <= _MEMO_NAME_MAX:  # names are input: never keep a huge one
            if len(_SCOPED_KEYS) > 4096:
                _SCOPED_KEYS.clear()
            _SCOPED_KEYS[(key, name)] = found
    return found


_MEMO_NAME_MAX = 253  # a Kubernetes name is at most this long

# The annotations `classify` looks up (each in all its scopes), and nothing else.
_CLASSIFY_KEYS: Final = (
    ANNOTATION_CONFIG_SOURCE,
    ANNOTATION_QOS_LEVEL,
    ANNOTATION_CPU_ENHANCEMENT,
    ANNOTATION_MEMORY_ENHANCEMENT,
)


def annotation_keys(name: str) -> frozenset[str]:
    """Every annotation key `classify` may read, on the pod or on the container, for a
    container named `name`: two containers whose annotations agree on these keys (present
    or not, and their values) are classified alike as far as annotations go."""
    return frozenset(k for key in _CLASSIFY_KEYS for k, _ in _scoped_keys(key, name))


class _Lookup:
    """The scoped view of one container's annotations (see the module docstring)."""

    def __init__(self, pod: Pod, container: Container) -> None:
        self._pod = pod.annotations
        self._container = container.annotations
        self._name = container.name

    def candidates(self, key: str) -> Iterator[_Found]:
        for k, container_scoped in _scoped_keys(key, self._name):
            # the pod's value first; the container's copy of it (CRI-O) only if it differs
            on_pod = self._pod.get(k)
            on_container = self._container.get(k)
            if on_pod is not None:
                yield _Found(k, on_pod, container_scoped)
            if on_container is not None and on_container != on_pod:
                yield _Found(k, on_container, container_scoped)

    def first(self, key: str) -> _Found | None:
        return next(self.candidates(key), None)


class _Warnings:
    def __init__(self) -> None:
        self.items: list[ClassificationWarning] = []

    def add(self, key: str, value: str, default: str, reason: str, field: str = "") -> None:
        self.items.append(ClassificationWarning(key, value, default, reason, field))


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")  # Go's decoder refuses NaN and Infinity too


def _json_map(lookup: _Lookup, key: str, warn: _Warnings) -> tuple[str, Mapping[str, str]]:
    """The first usable JSON object among the scopes of `key`, with its string values."""
    for found in lookup.candidates(key):
        try:
            parsed: object = json.loads(found.value, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            problem = f"is not valid JSON ({type(exc).__name__})"
        else:
            if isinstance(parsed, dict):
                kept: dict[str, str] = {}
                for name, value in parsed.items():
                    if isinstance(value, str):
                        kept[name] = value
                    else:
                        why = "Katalyst reads enhancements as strings only; quote the value"
                        nested = isinstance(value, (dict, list))
                        shown = f"<{type(value).__name__}>" if nested else json.dumps(value)
                        warn.add(found.key, shown, "key ignored", why, name)
                return found.key, MappingProxyType(kept)
            problem = f"is JSON but a {type(parsed).__name__}, not an object"
        warn.add(found.key, found.value, "a less specific annotation, else {}", problem)
    return key, _EMPTY_MAP


# --- value parsers ---------------------------------------------------------------------------


def _flag(emap: Mapping[str, str], key: str, name: str, default: bool, warn: _Warnings) -> bool:
    value = emap.get(name)
    if value is None:
        return default
    if value in ("true", "false"):
        return value == "true"
    warn.add(key, value, str(default).lower(), 'must be exactly "true" or "false"', name)
    return default


def _atoi(text: str) -> int | None:
    """Go's strconv.Atoi: ASCII digits, 64 bits; None where Go fails."""
    if not _ATOI.fullmatch(text):
        return None
    digits = text.lstrip("+-").lstrip("0") or "0"  # int() refuses over 4300 digits, zeros too
    if len(digits) > 20:  # past 64 bits
        return None
    number = -int(digits) if text.startswith("-") else int(digits)
    return number if _INT64_MIN <= number <= _INT64_MAX else None


def _oom_priority(
    emap: Mapping[str, str], key: str, qos_class: QosClass, warn: _Warnings
) -> int | None:
    text = emap.get(MEMORY_OOM_PRIORITY)
    number = None if text is None else _atoi(text)
    low, high = oom_priority_range(qos_class)
    if text is None or number in (OOM_PRIORITY_IGNORE, OOM_PRIORITY_TOP):
        return number
    if number is None:
        warn.add(key, text, "none", "not a decimal integer", MEMORY_OOM_PRIORITY)
        return None
    clamped = min(max(number, low), high)
    if clamped != number:
        why = (
            f"{qos_class} takes {low}..{high} ({OOM_PRIORITY_IGNORE}: opt out, "
            f"{OOM_PRIORITY_TOP}: never kill); clamped as Katalyst does"
        )
        warn.add(key, text, str(clamped), why, MEMORY_OOM_PRIORITY)
    return clamped


def _is_reserved_pool(name: str) -> bool:
    return name in _RESERVED_POOLS or name.startswith(_RESERVED_POOL_PREFIXES)


# --- the class -----------------------------------------------------------------------------


def _annotated_class(
    lookup: _Lookup,
) -> tuple[tuple[QosClass, ClassSource, str] | None, list[_Found]]:
    """The annotated class (or None) and the unusable qos_level values met on the way."""
    bad: list[_Found] = []
    for found in lookup.candidates(ANNOTATION_QOS_LEVEL):
        try:
            qos_class = QosClass(found.value)
        except ValueError:
            bad.append(found)
            continue
        scoped = ClassSource.CONTAINER_OVERRIDE if found.container_scoped else None
        reason = f"annotation {found.key}={found.value}"
        return (qos_class, scoped or ClassSource.ANNOTATION, reason), bad
    return None, bad


def _derived_class(
    pod: Pod, estimate: KubeQosEstimate, static_pod: bool, cpu_integral: bool, config: QosConfig
) -> tuple[QosClass, ClassSource, str]:
    if config.system_namespaces_to_system_cores:
        why = ""
        if pod.namespace in config.system_namespaces:
            why = f"namespace {pod.namespace} is a system namespace"
        elif static_pod:
            why = "a static pod (its kubelet config source is not the API server)"
        elif estimate.node_critical:
            why = "a system-node-critical pod"
        if why:
            return QosClass.SYSTEM_CORES, ClassSource.SYSTEM_POD, f"{why}; {estimate.reason}"
    qos = estimate.kube_qos
    if qos is None:
        why = f"Kubernetes QoS unknown ({estimate.reason}): Katalyst's default class"
        return QosClass.SHARED_CORES, ClassSource.DEFAULT, why
    why = f"Kubernetes QoS {qos} ({estimate.reason})"
    if qos is KubeQos.BEST_EFFORT and (static_pod or estimate.node_critical):
        why = f"{why}, but a critical pod never goes to the reclaimed pool"
        return QosClass.SHARED_CORES, ClassSource.KUBERNETES_QOS, why
    if qos is KubeQos.BEST_EFFORT:
        return QosClass.RECLAIMED_CORES, ClassSource.KUBERNETES_QOS, why
    if qos is KubeQos.GUARANTEED and config.guaranteed_integral_to_dedicated and cpu_integral:
        return QosClass.DEDICATED_CORES, ClassSource.KUBERNETES_QOS, f"{why} with whole CPUs"
    return QosClass.SHARED_CORES, ClassSource.KUBERNETES_QOS, why


@dataclass(frozen=True, slots=True)
class _CpuMemory:
    numa_binding: bool
    numa_exclusive: bool
    numa_share: bool
    full_pcpus_pairing: bool
    cpuset_pool: str | None


def _cpu_memory(
    qos_class: QosClass,
    cpu: tuple[str, Mapping[str, str]],
    mem: tuple[str, Mapping[str, str]],
    warn: _Warnings,
) -> _CpuMemory:
    """The CPU and memory enhancements the class supports in Katalyst; the rest is dropped."""
    (cpu_key, cpu_map), (mem_key, mem_map) = cpu, mem
    dedicated = qos_class is QosClass.DEDICATED_CORES

    binding = _flag(mem_map, mem_key, MEMORY_NUMA_BINDING, False, warn)
    if binding and qos_class is QosClass.SYSTEM_CORES:
        why = "Katalyst binds NUMA for dedicated, shared and reclaimed cores, not system_cores"
        warn.add(mem_key, "true", "false", why, MEMORY_NUMA_BINDING)
        binding = False

    exclusive = _flag(mem_map, mem_key, MEMORY_NUMA_EXCLUSIVE, False, warn)
    if exclusive and not (binding and dedicated):
        need = "numa_binding=true" if dedicated else "dedicated_cores with numa_binding=true"
        warn.add(mem_key, "true", "false", f"only valid for {need}", MEMORY_NUMA_EXCLUSIVE)
        exclusive = False

    share = _flag(cpu_map, cpu_key, CPU_NUMA_SHARE, True, warn)
    if not share and qos_class not in (QosClass.SHARED_CORES, QosClass.DEDICATED_CORES):
        why = "only shared_cores and dedicated_cores can refuse to share NUMA nodes"
        warn.add(cpu_key, "false", "true", why, CPU_NUMA_SHARE)
        share = True

    pairing = _flag(cpu_map, cpu_key, CPU_FULL_PCPUS_PAIRING, False, warn)
    if pairing and not (dedicated and binding):
        why = "only valid for dedicated_cores with numa_binding=true"
        warn.add(cpu_key, "true", "false", why, CPU_FULL_PCPUS_PAIRING)
        pairing = False
    elif pairing and exclusive:
        why = "Katalyst refuses it together with numa_exclusive; numa_exclusive is kept"
        warn.add(cpu_key, "true", "false", why, CPU_FULL_PCPUS_PAIRING)
        pairing = False

    pool = cpu_map.get(CPU_CPUSET_POOL)
    if pool is not None and qos_class not in (QosClass.SHARED_CORES, QosClass.SYSTEM_CORES):
        warn.add(cpu_key, pool, "none", f"{qos_class} has a fixed pool", CPU_CPUSET_POOL)
        pool = None
    elif pool is not None and (
        pool == "" or (qos_class is QosClass.SHARED_CORES and _is_reserved_pool(pool))
    ):
        why = "empty, or the name of one of Katalyst's built-in pools"
        warn.add(cpu_key, pool, "none", why, CPU_CPUSET_POOL)
        pool = None
    return _CpuMemory(binding, exclusive, share, pairing, pool)


def classify(pod: Pod, container: Container, config: QosConfig) -> Classification:
    """Decide the container's class and enhancements; never raises on annotation content."""
    lookup = _Lookup(pod, container)
    warn = _Warnings()
    estimate = estimate_kube_qos(container)
    size = estimate.cpu_limit_millicores or estimate.cpu_request_millicores or None
    cpu_integral = size is not None and size % MILLI_PER_CPU == 0
    config_source = lookup.first(ANNOTATION_CONFIG_SOURCE)
    static_pod = config_source is not None and config_source.value != CONFIG_SOURCE_API

    annotated, unusable = _annotated_class(lookup)
    if annotated is None:
        annotated = _derived_class(pod, estimate, static_pod, cpu_integral, config)
    qos_class, source, reason = annotated
    allowed = _CLASS_NAMES
    for bad in unusable:
        warn.add(bad.key, bad.value, f"{qos_class} ({source})", f"not one of {allowed}")

    cpu = _json_map(lookup, ANNOTATION_CPU_ENHANCEMENT, warn)
    mem = _json_map(lookup, ANNOTATION_MEMORY_ENHANCEMENT, warn)
    cm = _cpu_memory(qos_class, cpu, mem, warn)
    return Classification(
        qos_class=qos_class,
        source=source,
        reason=reason,
        kube_qos=estimate.kube_qos,
        critical_pod=static_pod or estimate.node_critical,
        cpu_request_millicores=estimate.cpu_request_millicores,
        cpu_limit_millicores=estimate.cpu_limit_millicores,
        cpu_millicores=size,
        cpu_integral=cpu_integral,
        numa_binding=cm.numa_binding,
        numa_exclusive=cm.numa_exclusive,
        numa_share=cm.numa_share,
        full_pcpus_pairing=cm.full_pcpus_pairing,
        cpuset_pool=cm.cpuset_pool,
        oom_priority=_oom_priority(mem[1], mem[0], qos_class, warn),
        warnings=tuple(warn.items),
    )
