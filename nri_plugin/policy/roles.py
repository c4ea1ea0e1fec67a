"""Container roles: init, sidecar (restartable init), app or ephemeral, and what each may get.

Why it matters: an init container runs to completion before the app starts, and NRI does
not reliably tell a plugin when a container exits on its own (a StopContainer for a
self-exit depends on the runtime; cri-tools#2125 tests it only "when the runtime delivers
it"), while the kubelet removes exited init containers lazily. An exclusive CPU set given
to an init container could therefore stay held long after it exited. A sidecar runs for
the pod's whole life next to the app, and must not take the app's class by inheritance.

What the runtime shows (researched, not guessed):

* The kubelet's CRI labels name the pod and the container only (`io.kubernetes.pod.*`,
  `io.kubernetes.container.name`, kubelet `pkg/kubelet/kuberuntime/labels.go`). Its
  container annotations carry the hash, restartCount, termination path/policy, ports,
  preStop and, in recent kubelets only, `io.kubernetes.container.type`: "init" for every
  entry of `spec.initContainers` (regular *and* restartable), "container" for an app
  container, "ephemeral" for a debug container. Older kubelets do not set it. containerd
  passes the CRI container annotations on to NRI as container annotations, CRI-O too (the
  recorded captures in tests/data/nri-captures show both runtimes doing so).
* No CRI field or annotation marks a restartable init container (`restartPolicy: Always`);
  KEP-4112 (pass resources down to CRI) discusses such a type but is not merged.
* containers/nri-plugins' resource-annotator webhook writes the pod annotation
  `noderesource.dev/resources`: JSON {"initContainers": {name: ...}, "containers": {...}}.
  Koordinator's koordlet treats init containers only through the API server's pod
  statuses (koordinator#2349), not from anything the runtime says.

So a role is decided, first usable source wins:

1. our annotation, per container: `nri-qos.io/role/container.<name>` (or the form that
   passes the API server, `role.nri-qos.io/container.<name>`, as qos.py reads scoped
   keys), then the pod map `nri-qos.io/container-roles` ({"<name>": "<role>"});
2. what an in-cluster adapter learnt from the pod spec (`known`, Engine.pod_roles): the
   only source that tells a sidecar from an init container without help from the user;
3. the kubelet's `io.kubernetes.container.type` ("init" is taken as init: the safe side);
4. nri-plugins' `noderesource.dev/resources` map;
5. otherwise an app container.

No heuristic guesses sidecars: "an init container still running when the next container
of its pod is created is restartable" needs every exit to be reported, which NRI does not
promise; a silent exit would turn an exited init container into a sidecar with exclusive
CPUs. A sidecar that the kubelet types "init" runs like one (the shared pool), which is
also a sidecar's default; it needs (1) or (2) only to get a class of its own.

What a role does to the classification (`apply_role`):

* init and ephemeral: never dedicated_cores (they run in the shared pool) and never bound
  to a NUMA node, so they neither hold exclusive CPUs after they exit nor decide where the
  app's NUMA binding goes. The alternative, running an init container on the CPUs its
  pod's app will get (the kubelet CPU manager's reuse), needs the app's size before the
  app exists: only the pod spec knows it, so it waits for the adapter;
* sidecar: the class its own container-scoped annotations give; a pod-wide
  dedicated_cores (annotated or derived) is not inherited, so a sidecar never takes a part
  of the app's exclusive set, and gets a set of its own only when asked per container;
* app: unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

from nri_plugin.policy.qos import (
    SCOPE_CONTAINER,
    Classification,
    ClassSource,
    QosClass,
    scoped_key_bases,
)
from qos_model.containers import Container, Pod
from qos_model.text import clip

ROLE_ANNOTATION: Final = "nri-qos.io/role"
"""Per container: `nri-qos.io/role/container.<name>` or `role.nri-qos.io/container.<name>`."""
ROLES_ANNOTATION: Final = "nri-qos.io/container-roles"
"""Pod-wide JSON object: {"<container name>": "init" | "sidecar" | "app" | "ephemeral"}."""
KUBELET_TYPE_ANNOTATION: Final = "io.kubernetes.container.type"
"""Set by recent kubelets on the CRI container config: "init", "container", "ephemeral"."""
RESOURCES_ANNOTATION: Final = "noderesource.dev/resources"
"""containers/nri-plugins' resource-annotator: {"initContainers": {...}, "containers": {...}}."""

_JSON_LIMIT: Final = 64 * 1024  # a pod's annotations are at most 256 KiB; ours are tiny


class Role(StrEnum):
    APP = "app"
    INIT = "init"
    SIDECAR = "sidecar"  # a restartable init container (restartPolicy: Always)
    EPHEMERAL = "ephemeral"


class RoleSource(StrEnum):
    ANNOTATION = "annotation"
    POD_SPEC = "pod-spec"
    KUBELET = "kubelet"
    RESOURCE_ANNOTATOR = "resource-annotator"
    DEFAULT = "default"


_KUBELET_TYPES: Final[Mapping[str, Role]] = {
    "init": Role.INIT,
    "container": Role.APP,
    "ephemeral": Role.EPHEMERAL,
}


@dataclass(frozen=True, slots=True)
class RoleDecision:
    role: Role
    source: RoleSource
    reason: str
    warnings: tuple[str, ...] = ()  # annotation values that could not be used, and why


APP_BY_DEFAULT: Final = RoleDecision(Role.APP, RoleSource.DEFAULT, "nothing marks another role")


def decide_role(
    pod: Pod, container: Container, known: Mapping[str, str] | None = None
) -> RoleDecision:
    """The container's role from the sources in the module docstring; never raises."""
    warnings: list[str] = []
    name = container.name
    explicit = _annotated_role(pod, container, warnings)
    if explicit is not None:
        return replace(explicit, warnings=tuple(warnings))
    if known is not None and name in known:
        role = _role(known[name])
        if role is not None:
            why = "the pod spec, as the in-cluster adapter reported it"
            return RoleDecision(role, RoleSource.POD_SPEC, why, tuple(warnings))
    kind = container.annotations.get(KUBELET_TYPE_ANNOTATION, "")
    if kind in _KUBELET_TYPES:
        why = f"kubelet annotation {KUBELET_TYPE_ANNOTATION}={kind}"
        return RoleDecision(_KUBELET_TYPES[kind], RoleSource.KUBELET, why, tuple(warnings))
    annotated = _resource_annotator_role(pod, name)
    if annotated is not None:
        return replace(annotated, warnings=tuple(warnings))
    return replace(APP_BY_DEFAULT, warnings=tuple(warnings)) if warnings else APP_BY_DEFAULT


def annotation_keys(name: str) -> frozenset[str]:
    """Every annotation key `decide_role` may read, on the pod or on the container, for a
    container named `name`."""
    scoped = [f"{base}{SCOPE_CONTAINER}{name}" for base in scoped_key_bases(ROLE_ANNOTATION)]
    fixed = (ROLES_ANNOTATION, KUBELET_TYPE_ANNOTATION, RESOURCES_ANNOTATION)
    return frozenset((*scoped, *fixed) if name else fixed)


def apply_role(c: Classification, decision: RoleDecision) -> Classification:
    """The classification as the role allows it (see the module docstring). `role_reason`
    says how the role was found; `reason` says why the class is what it is, and names
    the role when the role changed what the annotations asked for."""
    role = decision.role
    if role is Role.APP and c.role == role:
        return c  # the usual case: nothing to say, so the text below is not built
    said = f"{role} container ({decision.reason})"
    if role is Role.APP:
        return replace(c, role=role, role_reason=said)
    if role is Role.SIDECAR:
        inherited = c.qos_class is QosClass.DEDICATED_CORES
        if inherited and c.source is not ClassSource.CONTAINER_OVERRIDE:
            why = (
                f"{c.reason}, but a sidecar does not share its pod's dedicated_cores: "
                "shared_cores unless qos_level is set for this container"
            )
            return _shared(c, role, said, why)
        return replace(c, role=role, role_reason=said)
    # init and ephemeral containers: never exclusive, never NUMA-bound
    if c.qos_class is QosClass.DEDICATED_CORES:
        why = (
            f"{c.reason}, but an {role} container runs in the shared pool: it never holds "
            "exclusive CPUs, which it could keep after it exits"
        )
        return _shared(c, role, said, why)
    if c.numa_binding:
        why = f"{c.reason}; an {role} container is not NUMA-bound: the app decides the node"
        return replace(
            c, role=role, role_reason=said, reason=why, numa_binding=False, numa_share=True
        )
    return replace(c, role=role, role_reason=said)


def _shared(c: Classification, role: Role, said: str, why: str) -> Classification:
    return replace(
        c,
        qos_class=QosClass.SHARED_CORES,
        reason=why,
        role=role,
        role_reason=said,
        numa_binding=False,
        numa_exclusive=False,
        numa_share=True,
        full_pcpus_pairing=False,
        oom_priority=None,  # a priority in dedicated_cores' range means nothing in shared's
    )


def _role(value: str) -> Role | None:
    try:
        return Role(value)
    except ValueError:
        return None


def _annotated_role(pod: Pod, container: Container, warnings: list[str]) -> RoleDecision | None:
    name = container.name
    if name:
        for base in scoped_key_bases(ROLE_ANNOTATION):
            key = f"{base}{SCOPE_CONTAINER}{name}"
            on_pod = pod.annotations.get(key)
            on_container = container.annotations.get(key)
            values = [on_pod] if on_container in (None, on_pod) else [on_pod, on_container]
            for value in values:
                if value is None:
                    continue
                role = _role(value)
                if role is not None:
                    return RoleDecision(role, RoleSource.ANNOTATION, f"annotation {key}={value}")
                warnings.append(f"annotation {clip(key)}={clip(repr(value))}: {_ROLE_NAMES}")
    for where in (pod.annotations, container.annotations):
        raw = where.get(ROLES_ANNOTATION)
        if raw is None:
            continue
        roles = _json_object(raw)
        if roles is None:
            warnings.append(f"annotation {ROLES_ANNOTATION}: not a JSON object; ignored")
            continue
        entry = roles.get(name)
        if entry is None:
            continue
        role = _role(entry) if isinstance(entry, str) else None
        if role is not None:
            why = f"annotation {ROLES_ANNOTATION}[{clip(name)}]={entry}"
            return RoleDecision(role, RoleSource.ANNOTATION, why)
        shown = clip(repr(entry))
        warnings.append(f"annotation {ROLES_ANNOTATION}[{clip(name)}]={shown}: {_ROLE_NAMES}")
    return None


_ROLE_NAMES: Final = "not one of " + ", ".join(r.value for r in Role) + "; ignored"


def _resource_annotator_role(pod: Pod, name: str) -> RoleDecision | None:
    raw = pod.annotations.get(RESOURCES_ANNOTATION)
    parsed = _json_object(raw) if raw is not None else None
    if parsed is None:
        return None
    why = f"listed under {{}} in the pod annotation {RESOURCES_ANNOTATION}"
    init = parsed.get("initContainers")
    if isinstance(init, dict) and name in init:
        return RoleDecision(Role.INIT, RoleSource.RESOURCE_ANNOTATOR, why.format("initContainers"))
    app = parsed.get("containers")
    if isinstance(app, dict) and name in app:
        return RoleDecision(Role.APP, RoleSource.RESOURCE_ANNOTATOR, why.format("containers"))
    return None


def _json_object(raw: str) -> dict[str, object] | None:
    if len(raw) > _JSON_LIMIT:
        return None
    try:
        parsed: object = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


__all__ = [
    "KUBELET_TYPE_ANNOTATION",
    "RESOURCES_ANNOTATION",
    "ROLES_ANNOTATION",
    "ROLE_ANNOTATION",
    "Role",
    "RoleDecision",
    "RoleSource",
    "annotation_keys",
    "apply_role",
    "decide_role",
]
