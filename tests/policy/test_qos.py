"""classify(): Katalyst annotations, scoping, derivation from NRI values, bad input."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nri_plugin.policy.kube_qos import KubeQos, estimate_kube_qos, kubelet_quota, kubelet_shares
from nri_plugin.policy.qos import (
    ANNOTATION_CONFIG_SOURCE,
    ANNOTATION_CPU_ENHANCEMENT,
    ANNOTATION_MEMORY_ENHANCEMENT,
    ANNOTATION_QOS_LEVEL,
    OOM_PRIORITY_IGNORE,
    OOM_PRIORITY_TOP,
    Classification,
    ClassSource,
    QosClass,
    QosConfig,
    QosConfigError,
    classify,
    oom_priority_range,
)
from qos_model.containers import Container, CpuResources, MemoryResources, Pod, Resources

MiB = 1 << 20
DEDICATED = QosClass.DEDICATED_CORES
SHARED = QosClass.SHARED_CORES
RECLAIMED = QosClass.RECLAIMED_CORES
SYSTEM = QosClass.SYSTEM_CORES
OFF = QosConfig()
ON = QosConfig(guaranteed_integral_to_dedicated=True, system_namespaces_to_system_cores=True)


def res(
    shares: int | None = None,
    quota: int | None = None,
    period: int | None = None,
    memory: int | None = None,
) -> Resources:
    return Resources(
        cpu=CpuResources(shares=shares, quota=quota, period=period),
        memory=MemoryResources(limit=memory),
    )


# the container from the real containerd 2.3.4 capture: Burstable by its oom_score_adj
CAPTURED = res(shares=512, quota=50_000, period=100_000, memory=128 * MiB)
GUARANTEED_2CPU = res(shares=2048, quota=200_000, period=100_000, memory=1024 * MiB)
BEST_EFFORT = res(shares=2)


def make(
    pod_annotations: Mapping[str, str] | None = None,
    ctr_annotations: Mapping[str, str] | None = None,
    *,
    resources: Resources | None = CAPTURED,
    oom: int | None = 500,
    name: str = "app",
    namespace: str = "default",
) -> tuple[Pod, Container]:
    pod = Pod(
        id="sandbox", name="web", namespace=namespace, annotations=dict(pod_annotations or {})
    )
    ctr = Container(
        id="c1",
        pod_id="sandbox",
        name=name,
        annotations=dict(ctr_annotations or {}),
        resources=resources,
        oom_score_adj=oom,
    )
    return pod, ctr


def run(
    pod_annotations: Mapping[str, str] | None = None,
    ctr_annotations: Mapping[str, str] | None = None,
    config: QosConfig = OFF,
    **kw: object,
) -> Classification:
    pod, ctr = make(pod_annotations, ctr_annotations, **kw)  # type: ignore[arg-type]
    return classify(pod, ctr, config)


def warned(c: Classification) -> set[tuple[str, str, str]]:
    """(key, field, default) of every warning, for compact assertions."""
    return {(w.key, w.field, w.default) for w in c.warnings}


# --- Kubernetes QoS derived from NRI values ----------------------------------------------------


@dataclass(frozen=True)
class Derive:
    desc: str
    resources: Resources | None
    oom: int | None
    kube_qos: KubeQos | None
    request: int | None
    limit: int | None
    node_critical: bool = False


DERIVE = [
    Derive("real capture: 500m/500m and a memory limit, but oom 500 = Burstable pod",
           CAPTURED, 500, KubeQos.BURSTABLE, 500, 500),
    Derive("Guaranteed 2 CPUs", GUARANTEED_2CPU, -997, KubeQos.GUARANTEED, 2000, 2000),
    Derive("Guaranteed on an old kubelet (-998), no resources", None, -998,
           KubeQos.GUARANTEED, None, None),
    Derive("old kubelet's -998 on BestEffort resources: node-critical", BEST_EFFORT, -998,
           KubeQos.BEST_EFFORT, 0, None, node_critical=True),
    Derive("BestEffort: shares 2, oom 1000", BEST_EFFORT, 1000, KubeQos.BEST_EFFORT, 0, None),
    Derive("no resources at all, no oom_score_adj", None, None, None, None, None),
    Derive("no resources, oom 1000", None, 1000, KubeQos.BEST_EFFORT, None, None),
    Derive("no resources, oom -997", None, -997, KubeQos.GUARANTEED, None, None),
    Derive("empty resources, oom 2 (old kubelet's lowest Burstable)", Resources(), 2,
           KubeQos.BURSTABLE, None, None),
    Derive("oom 999: the kubelet's highest Burstable", BEST_EFFORT, 999, KubeQos.BURSTABLE, 0,
           None),
    Derive("quota -1 is no limit: Burstable from resources", res(shares=1024, quota=-1,
           period=100_000, memory=256 * MiB), None, KubeQos.BURSTABLE, 1000, None),
    Derive("shares 2 and nothing else, no oom: BestEffort", BEST_EFFORT, None,
           KubeQos.BEST_EFFORT, 0, None),
    Derive("memory limit without quota, no oom: Burstable", res(shares=2, memory=64 * MiB), None,
           KubeQos.BURSTABLE, 0, None),
    Derive("Guaranteed with CFS quota off: no quota, oom -997 decides", res(shares=4096,
           memory=MiB), -997, KubeQos.GUARANTEED, 4000, None),
    Derive("Guaranteed resources, non-kubelet oom (-500): resources decide", GUARANTEED_2CPU,
           -500, KubeQos.GUARANTEED, 2000, 2000),
    Derive("Guaranteed resources, oom 0 (not a kubelet value)", GUARANTEED_2CPU, 0,
           KubeQos.GUARANTEED, 2000, 2000),
    Derive("oom -997 but no memory limit: node-critical BestEffort", BEST_EFFORT, -997,
           KubeQos.BEST_EFFORT, 0, None, node_critical=True),
    Derive("oom -997 but cpu request < limit: node-critical Burstable", res(shares=512,
           quota=100_000, period=100_000, memory=MiB), -997, KubeQos.BURSTABLE, 500, 1000,
           node_critical=True),
    Derive("quota without period uses the kernel's 100ms", res(shares=256, quota=25_000,
           memory=MiB), None, KubeQos.GUARANTEED, 250, 250),
    Derive("custom period 50ms", res(shares=1536, quota=75_000, period=50_000, memory=MiB),
           None, KubeQos.GUARANTEED, 1500, 1500),
    Derive("kubelet's minimum quota 1000 is 10m", res(shares=10, quota=1000, period=100_000,
           memory=MiB), None, KubeQos.GUARANTEED, 10, 10),
    Derive("memory 'max' reported as a huge number is no limit", res(shares=2,
           memory=9_223_372_036_854_771_712), None, KubeQos.BEST_EFFORT, 0, None),
]  # fmt: skip


@pytest.mark.parametrize("case", DERIVE, ids=lambda c: c.desc)
def test_kube_qos_is_read_back_from_the_kubelets_oom_score_adj_and_cgroup_values(
    case: Derive,
) -> None:
    _, ctr = make(resources=case.resources, oom=case.oom)
    est = estimate_kube_qos(ctr)
    assert (est.kube_qos, est.cpu_request_millicores, est.cpu_limit_millicores) == (
        case.kube_qos,
        case.request,
        case.limit,
    )
    assert est.node_critical is case.node_critical
    assert est.reason


@dataclass(frozen=True)
class Derived:
    desc: str
    resources: Resources | None
    oom: int | None
    config: QosConfig
    qos_class: QosClass
    source: ClassSource
    cpu_millicores: int | None = None
    cpu_integral: bool = False
    namespace: str = "default"
    pod_annotations: Mapping[str, str] = field(default_factory=dict)


DERIVED = [
    Derived("real capture -> shared", CAPTURED, 500, ON, SHARED, ClassSource.KUBERNETES_QOS, 500),
    Derived("Guaranteed integral, switch off -> shared", GUARANTEED_2CPU, -997, OFF, SHARED,
            ClassSource.KUBERNETES_QOS, 2000, True),
    Derived("Guaranteed integral, switch on -> dedicated", GUARANTEED_2CPU, -997, ON, DEDICATED,
            ClassSource.KUBERNETES_QOS, 2000, True),
    Derived("Guaranteed 1500m, switch on -> shared", res(shares=1536, quota=150_000,
            period=100_000, memory=MiB), -997, ON, SHARED, ClassSource.KUBERNETES_QOS, 1500),
    Derived("Guaranteed, CFS quota off, 4 CPUs from shares -> dedicated", res(shares=4096,
            memory=MiB), -997, ON, DEDICATED, ClassSource.KUBERNETES_QOS, 4000, True),
    Derived("BestEffort -> reclaimed", BEST_EFFORT, 1000, ON, RECLAIMED,
            ClassSource.KUBERNETES_QOS),
    Derived("nothing known -> shared (Katalyst default)", None, None, ON, SHARED,
            ClassSource.DEFAULT),
    Derived("kube-system with the switch -> system", CAPTURED, 500, ON, SYSTEM,
            ClassSource.SYSTEM_POD, 500, namespace="kube-system"),
    Derived("kube-system without the switch -> derived", CAPTURED, 500, OFF, SHARED,
            ClassSource.KUBERNETES_QOS, 500, namespace="kube-system"),
    Derived("configured namespace list replaces the default", CAPTURED, 500,
            QosConfig(system_namespaces_to_system_cores=True, system_namespaces=("infra",)),
            SHARED, ClassSource.KUBERNETES_QOS, 500, namespace="kube-system"),
    Derived("a namespace from the configured list", CAPTURED, 500,
            QosConfig(system_namespaces_to_system_cores=True, system_namespaces=("infra",)),
            SYSTEM, ClassSource.SYSTEM_POD, 500, namespace="infra"),
    Derived("static pod (config.source=file) -> system", CAPTURED, 500, ON, SYSTEM,
            ClassSource.SYSTEM_POD, 500, pod_annotations={ANNOTATION_CONFIG_SOURCE: "file"}),
    Derived("API pod (config.source=api) is not critical", CAPTURED, 500, ON, SHARED,
            ClassSource.KUBERNETES_QOS, 500, pod_annotations={ANNOTATION_CONFIG_SOURCE: "api"}),
    Derived("node-critical (oom -997, BestEffort resources) -> system", BEST_EFFORT, -997, ON,
            SYSTEM, ClassSource.SYSTEM_POD),
    Derived("node-critical BestEffort without the switch -> shared, never reclaimed",
            BEST_EFFORT, -997, OFF, SHARED, ClassSource.KUBERNETES_QOS),
    Derived("static BestEffort pod without the switch -> shared, never reclaimed", BEST_EFFORT,
            1000, OFF, SHARED, ClassSource.KUBERNETES_QOS,
            pod_annotations={ANNOTATION_CONFIG_SOURCE: "http"}),
    Derived("annotation beats the system namespace", CAPTURED, 500, ON, RECLAIMED,
            ClassSource.ANNOTATION, 500, namespace="kube-system",
            pod_annotations={ANNOTATION_QOS_LEVEL: "reclaimed_cores"}),
]  # fmt: skip


@pytest.mark.parametrize("case", DERIVED, ids=lambda c: c.desc)
def test_without_qos_level_the_class_follows_kube_qos_and_the_system_pod_switches(
    case: Derived,
) -> None:
    c = run(
        case.pod_annotations,
        config=case.config,
        resources=case.resources,
        oom=case.oom,
        namespace=case.namespace,
    )
    assert (c.qos_class, c.source) == (case.qos_class, case.source)
    assert (c.cpu_millicores, c.cpu_integral) == (case.cpu_millicores, case.cpu_integral)
    assert c.reason and not c.warnings


def test_critical_pod_flag_is_independent_of_the_class() -> None:
    assert run(
        {ANNOTATION_CONFIG_SOURCE: "file", ANNOTATION_QOS_LEVEL: "shared_cores"}
    ).critical_pod
    assert run(resources=BEST_EFFORT, oom=-997).critical_pod
    assert not run(resources=GUARANTEED_2CPU, oom=-997).critical_pod


@given(st.integers(min_value=3, max_value=262_144 * 1000 // 1024))
def test_shares_give_back_the_kubelet_request(millicores: int) -> None:
    shares = kubelet_shares(millicores)
    _, ctr = make(resources=res(shares=shares))
    expected = millicores if shares > 2 else 0
    assert estimate_kube_qos(ctr).cpu_request_millicores == expected


@given(st.integers(min_value=1, max_value=512_000), st.integers(1000, 1_000_000))
def test_quota_gives_back_the_kubelet_limit(millicores: int, period: int) -> None:
    quota = kubelet_quota(millicores, period)
    _, ctr = make(resources=res(quota=quota, period=period))
    limit = estimate_kube_qos(ctr).cpu_limit_millicores
    assert limit == millicores or (quota == 1000 and limit == -(-1000 * 1000 // period))


# --- qos_level and scoping ---------------------------------------------------------------------

K = ANNOTATION_QOS_LEVEL


@dataclass(frozen=True)
class Scope:
    desc: str
    pod: Mapping[str, str]
    ctr: Mapping[str, str]
    qos_class: QosClass
    source: ClassSource
    warnings: frozenset[tuple[str, str, str]] = frozenset()


SCOPES = [
    Scope("plain key", {K: "dedicated_cores"}, {}, DEDICATED, ClassSource.ANNOTATION),
    Scope("each Katalyst value: system", {K: "system_cores"}, {}, SYSTEM, ClassSource.ANNOTATION),
    Scope("each Katalyst value: shared", {K: "shared_cores"}, {}, SHARED, ClassSource.ANNOTATION),
    Scope("each Katalyst value: reclaimed", {K: "reclaimed_cores"}, {}, RECLAIMED,
          ClassSource.ANNOTATION),
    Scope("/pod beats the plain key", {K: "shared_cores", f"{K}/pod": "reclaimed_cores"}, {},
          RECLAIMED, ClassSource.ANNOTATION),
    Scope("/container.<name> beats /pod", {f"{K}/pod": "reclaimed_cores",
          f"{K}/container.app": "dedicated_cores"}, {}, DEDICATED, ClassSource.CONTAINER_OVERRIDE),
    Scope("another container's override is ignored", {K: "shared_cores",
          f"{K}/container.sidecar": "dedicated_cores"}, {}, SHARED, ClassSource.ANNOTATION),
    Scope("container annotations alone (a CRI client)", {}, {K: "reclaimed_cores"}, RECLAIMED,
          ClassSource.ANNOTATION),
    Scope("same scope, different values: the pod wins", {K: "shared_cores"},
          {K: "reclaimed_cores"}, SHARED, ClassSource.ANNOTATION),
    Scope("scope before origin: container-scoped key on the container wins over pod's plain",
          {K: "shared_cores"}, {f"{K}/container.app": "system_cores"}, SYSTEM,
          ClassSource.CONTAINER_OVERRIDE),
    Scope("bad override falls through to the pod value", {K: "dedicated_cores",
          f"{K}/container.app": "gold"}, {}, DEDICATED, ClassSource.ANNOTATION,
          frozenset({(f"{K}/container.app", "", "dedicated_cores (annotation)")})),
    Scope("bad pod value, good container copy at the same scope", {K: "Dedicated_Cores"},
          {K: "dedicated_cores"}, DEDICATED, ClassSource.ANNOTATION,
          frozenset({(K, "", "dedicated_cores (annotation)")})),
    Scope("unknown class: derived class used, the warning names it", {K: "gold"}, {}, SHARED,
          ClassSource.KUBERNETES_QOS, frozenset({(K, "", "shared_cores (kubernetes-qos)")})),
    Scope("empty value", {K: ""}, {}, SHARED, ClassSource.KUBERNETES_QOS,
          frozenset({(K, "", "shared_cores (kubernetes-qos)")})),
    Scope("Kubernetes-valid override form (name.domain/container.<name>)",
          {K: "shared_cores", "qos_level.katalyst.kubewharf.io/container.app": "dedicated_cores"},
          {}, DEDICATED, ClassSource.CONTAINER_OVERRIDE),
    Scope("Kubernetes-valid pod form beats the plain key",
          {K: "shared_cores", "qos_level.katalyst.kubewharf.io/pod": "reclaimed_cores"},
          {}, RECLAIMED, ClassSource.ANNOTATION),
    Scope("any container-scoped form beats any pod-scoped form",
          {"qos_level.katalyst.kubewharf.io/pod": "reclaimed_cores",
           f"{K}/container.app": "system_cores"}, {}, SYSTEM, ClassSource.CONTAINER_OVERRIDE),
    Scope("CRI-O copy of a bad value warns once", {K: "gold"}, {K: "gold"}, SHARED,
          ClassSource.KUBERNETES_QOS, frozenset({(K, "", "shared_cores (kubernetes-qos)")})),
]  # fmt: skip


@pytest.mark.parametrize("case", SCOPES, ids=lambda c: c.desc)
def test_the_most_specific_usable_qos_level_wins_in_either_key_form(case: Scope) -> None:
    c = run(case.pod, case.ctr)
    assert (c.qos_class, c.source) == (case.qos_class, case.source)
    assert warned(c) == case.warnings
    assert len(c.warnings) == len(case.warnings)  # a CRI-O copy must not warn twice
    seen = set(case.pod.values()) | set(case.ctr.values())
    assert all(w.value in seen and w.reason for w in c.warnings)


def test_container_without_a_name_skips_the_container_scope() -> None:
    c = run({f"{K}/container.": "system_cores", K: "reclaimed_cores"}, name="")
    assert c.qos_class is RECLAIMED


# --- enhancements ------------------------------------------------------------------------------

CPU, MEM = ANNOTATION_CPU_ENHANCEMENT, ANNOTATION_MEMORY_ENHANCEMENT


def enh(qos: str, **maps: Mapping[str, object] | str) -> dict[str, str]:
    """Pod annotations: a class plus enhancement maps (dicts are JSON-encoded)."""
    keys = {"cpu": CPU, "mem": MEM}
    out = {K: qos}
    for name, value in maps.items():
        out[keys[name]] = value if isinstance(value, str) else json.dumps(value)
    return out


@dataclass(frozen=True)
class Enh:
    desc: str
    annotations: dict[str, str]
    expect: Mapping[str, object]
    warnings: frozenset[tuple[str, str, str]] = frozenset()


BIND = {"numa_binding": "true"}
DED, SHR, REC, SYS = "dedicated_cores", "shared_cores", "reclaimed_cores", "system_cores"

ENHANCEMENTS = [
    # memory: numa_binding / numa_exclusive
    Enh("numa_binding on dedicated", enh(DED, mem=BIND), {"numa_binding": True}),
    Enh("numa_binding on shared (Katalyst supports it)", enh(SHR, mem=BIND),
        {"numa_binding": True}),
    Enh("numa_binding on reclaimed (Katalyst supports it)", enh(REC, mem=BIND),
        {"numa_binding": True}),
    Enh("numa_binding on system is dropped", enh(SYS, mem=BIND), {"numa_binding": False},
        frozenset({(MEM, "numa_binding", "false")})),
    Enh('"True" is not "true"', enh(DED, mem={"numa_binding": "True"}), {"numa_binding": False},
        frozenset({(MEM, "numa_binding", "false")})),
    Enh("a JSON boolean is not a string: key ignored", enh(DED, mem={"numa_binding": True}),
        {"numa_binding": False}, frozenset({(MEM, "numa_binding", "key ignored")})),
    Enh('explicit "false"', enh(DED, mem={"numa_binding": "false"}), {"numa_binding": False}),
    Enh("numa_exclusive with binding on dedicated", enh(DED, mem={**BIND,
        "numa_exclusive": "true"}), {"numa_exclusive": True, "numa_binding": True}),
    Enh("numa_exclusive without binding", enh(DED, mem={"numa_exclusive": "true"}),
        {"numa_exclusive": False}, frozenset({(MEM, "numa_exclusive", "false")})),
    Enh("numa_exclusive on shared", enh(SHR, mem={**BIND, "numa_exclusive": "true"}),
        {"numa_exclusive": False, "numa_binding": True},
        frozenset({(MEM, "numa_exclusive", "false")})),
    # memory: oom_priority
    Enh("oom_priority in the shared range", enh(SHR, mem={"oom_priority": "42"}),
        {"oom_priority": 42}),
    Enh("oom_priority lowest of dedicated", enh(DED, mem={"oom_priority": "100"}),
        {"oom_priority": 100}),
    Enh("oom_priority highest of reclaimed", enh(REC, mem={"oom_priority": "-1"}),
        {"oom_priority": -1}),
    Enh("oom_priority with a + sign (Atoi accepts it)", enh(SYS, mem={"oom_priority": "+250"}),
        {"oom_priority": 250}),
    Enh("oom_priority above the class range is clamped", enh(SHR, mem={"oom_priority": "150"}),
        {"oom_priority": 99}, frozenset({(MEM, "oom_priority", "99")})),
    Enh("oom_priority below the class range is clamped", enh(DED, mem={"oom_priority": "-50"}),
        {"oom_priority": 100}, frozenset({(MEM, "oom_priority", "100")})),
    Enh("oom_priority -300 (ignore) is kept", enh(SHR, mem={"oom_priority": "-300"}),
        {"oom_priority": OOM_PRIORITY_IGNORE}),
    Enh("oom_priority 300 (top) is kept", enh(REC, mem={"oom_priority": "300"}),
        {"oom_priority": OOM_PRIORITY_TOP}),
    Enh("oom_priority not a number", enh(SHR, mem={"oom_priority": "high"}),
        {"oom_priority": None}, frozenset({(MEM, "oom_priority", "none")})),
    Enh("oom_priority with a space", enh(SHR, mem={"oom_priority": " 5"}),
        {"oom_priority": None}, frozenset({(MEM, "oom_priority", "none")})),
    Enh("oom_priority beyond int64", enh(SHR, mem={"oom_priority": "9" * 25}),
        {"oom_priority": None}, frozenset({(MEM, "oom_priority", "none")})),
    Enh("oom_priority with leading zeros (Atoi accepts them)", enh(SHR,
        mem={"oom_priority": "0" * 30 + "7"}), {"oom_priority": 7}),
    Enh("oom_priority int64 max is a number, clamped", enh(SHR,
        mem={"oom_priority": str((1 << 63) - 1)}), {"oom_priority": 99},
        frozenset({(MEM, "oom_priority", "99")})),
    Enh("oom_priority one past int64 is not", enh(SHR, mem={"oom_priority": str(1 << 63)}),
        {"oom_priority": None}, frozenset({(MEM, "oom_priority", "none")})),
    Enh("oom_priority with 5000 digits (past Python's int() limit)", enh(SHR,
        mem={"oom_priority": "9" * 5000}), {"oom_priority": None},
        frozenset({(MEM, "oom_priority", "none")})),
    Enh("oom_priority as a JSON number", enh(SHR, mem={"oom_priority": 50}),
        {"oom_priority": None}, frozenset({(MEM, "oom_priority", "key ignored")})),
    # cpu
    Enh("numa_share false on shared", enh(SHR, cpu={"numa_share": "false"}),
        {"numa_share": False}),
    Enh("numa_share false on dedicated", enh(DED, cpu={"numa_share": "false"}),
        {"numa_share": False}),
    Enh("numa_share false on reclaimed is dropped", enh(REC, cpu={"numa_share": "false"}),
        {"numa_share": True}, frozenset({(CPU, "numa_share", "true")})),
    Enh("numa_share garbage", enh(SHR, cpu={"numa_share": "no"}), {"numa_share": True},
        frozenset({(CPU, "numa_share", "true")})),
    Enh("cpuset_pool on shared", enh(SHR, cpu={"cpuset_pool": "batch"}), {"cpuset_pool": "batch"}),
    Enh("cpuset_pool on system", enh(SYS, cpu={"cpuset_pool": "system-infra"}),
        {"cpuset_pool": "system-infra"}),
    Enh("cpuset_pool on dedicated is dropped", enh(DED, cpu={"cpuset_pool": "batch"}),
        {"cpuset_pool": None}, frozenset({(CPU, "cpuset_pool", "none")})),
    Enh("cpuset_pool empty", enh(SHR, cpu={"cpuset_pool": ""}), {"cpuset_pool": None},
        frozenset({(CPU, "cpuset_pool", "none")})),
    Enh("cpuset_pool naming Katalyst's reclaim pool", enh(SHR, cpu={"cpuset_pool": "reclaim"}),
        {"cpuset_pool": None}, frozenset({(CPU, "cpuset_pool", "none")})),
    Enh("full_pcpus_pairing on dedicated with binding", enh(DED, mem=BIND,
        cpu={"full_pcpus_pairing": "true"}), {"full_pcpus_pairing": True}),
    Enh("full_pcpus_pairing without binding", enh(DED, cpu={"full_pcpus_pairing": "true"}),
        {"full_pcpus_pairing": False}, frozenset({(CPU, "full_pcpus_pairing", "false")})),
    Enh("full_pcpus_pairing on shared", enh(SHR, mem=BIND, cpu={"full_pcpus_pairing": "true"}),
        {"full_pcpus_pairing": False}, frozenset({(CPU, "full_pcpus_pairing", "false")})),
    Enh("full_pcpus_pairing with numa_exclusive: exclusive kept", enh(DED,
        mem={**BIND, "numa_exclusive": "true"}, cpu={"full_pcpus_pairing": "true"}),
        {"full_pcpus_pairing": False, "numa_exclusive": True},
        frozenset({(CPU, "full_pcpus_pairing", "false")})),
    # JSON shape
    Enh("bad JSON: no enhancement at all", enh(DED, mem="{numa_binding: true}"),
        {"numa_binding": False, "oom_priority": None},
        frozenset({(MEM, "", "a less specific annotation, else {}")})),
    Enh("JSON array: no enhancement at all", enh(DED, mem='["numa_binding"]'),
        {"numa_binding": False, "oom_priority": None},
        frozenset({(MEM, "", "a less specific annotation, else {}")})),
    Enh("NaN is not JSON", enh(DED, mem='{"oom_priority": NaN}'), {"oom_priority": None},
        frozenset({(MEM, "", "a less specific annotation, else {}")})),
    Enh("a bad value drops only its key", enh(DED, mem={"numa_binding": 1, "oom_priority": "150"}),
        {"oom_priority": 150, "numa_binding": False},
        frozenset({(MEM, "numa_binding", "key ignored")})),
]  # fmt: skip


@pytest.mark.parametrize("case", ENHANCEMENTS, ids=lambda c: c.desc)
def test_enhancements_are_kept_only_where_katalyst_honours_them(case: Enh) -> None:
    c = run(case.annotations)
    for name, value in case.expect.items():
        assert getattr(c, name) == value, name
    assert warned(c) == case.warnings
    assert all(w.reason for w in c.warnings)


def test_defaults_without_enhancements() -> None:
    c = run({K: DED})
    assert (c.numa_binding, c.numa_exclusive, c.numa_share, c.full_pcpus_pairing) == (
        False, False, True, False,
    )  # fmt: skip
    assert (c.cpuset_pool, c.oom_priority, c.warnings) == (None, None, ())


def test_enhancement_maps_follow_the_scopes_and_are_not_merged() -> None:
    pod = {
        K: DED,
        MEM: json.dumps({"numa_binding": "true", "oom_priority": "150"}),
        f"{MEM}/container.app": json.dumps({"oom_priority": "120"}),
    }
    c = run(pod)
    assert (c.oom_priority, c.numa_binding) == (120, False)  # the pod map's binding is not merged


def test_bad_scoped_map_falls_back_to_the_pod_map() -> None:
    c = run({K: SHR, CPU: '{"cpuset_pool": "batch"}', f"{CPU}/container.app": "{"})
    assert c.cpuset_pool == "batch"
    assert warned(c) == {(f"{CPU}/container.app", "", "a less specific annotation, else {}")}


def test_oom_priority_is_checked_against_the_final_class() -> None:
    c = run({K: "gold", MEM: json.dumps({"oom_priority": "150"})}, resources=BEST_EFFORT, oom=1000)
    assert c.qos_class is RECLAIMED
    assert c.oom_priority == -1  # clamped into reclaimed's range, not dedicated's


# --- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "namespaces",
    ["kube-system", ("kube-system", ""), ["kube-system"], (1,)],
    ids=["bare string", "empty name", "list", "not a string"],
)
def test_bad_config_is_refused(namespaces: object) -> None:
    with pytest.raises(QosConfigError, match="system_namespaces"):
        QosConfig(system_namespaces=namespaces)  # type: ignore[arg-type]


# --- hypothesis: never raises, and the invariants hold ------------------------------------------

KNOWN_KEYS = [K, CPU, MEM, ANNOTATION_CONFIG_SOURCE]
ENH_KEYS = ["numa_binding", "numa_exclusive", "oom_priority", "numa_share", "cpuset_pool",
            "full_pcpus_pairing"]  # fmt: skip
INTERESTING = ["true", "false", "True", "", "0", "-300", "300", "299", "-1", "0-3", "3-1",
               "0-99999999999", "dedicated_cores", "system_cores", "reclaimed_cores",
               "shared_cores", "reclaim", "host_ns", "file", "api", "1e9", "+5", "٣"]  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from(INTERESTING),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
json_maps = st.dictionaries(
    st.sampled_from(ENH_KEYS) | st.text(max_size=6), json_values, max_size=6
)
values = (
    st.text()
    | st.sampled_from(INTERESTING)
    | json_maps.map(json.dumps)
    | json_values.map(json.dumps)
    | st.just("[" * 5000)
    | st.integers(4000, 6000).map(lambda n: "9" * n)
    | st.integers(4000, 6000).map(lambda n: "0-" + "9" * n)
    | st.integers(4000, 6000).map(lambda n: "0" * n + "1")
    | st.integers(4000, 6000).map(lambda n: "1-" + "0" * n + "2")
    | st.from_regex(r"[+-]?0*[0-9]{1,25}", fullmatch=True)
)
keys = st.builds(
    lambda k, scope: k + scope,
    st.sampled_from(KNOWN_KEYS) | st.text(max_size=10),
    st.sampled_from(["", "/pod", "/container.app", "/container.", "/container.other"]),
)
annotation_dicts = st.dictionaries(keys, values, max_size=8)
maybe_int = st.none() | st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
resources = st.none() | st.builds(
    Resources,
    cpu=st.none() | st.builds(CpuResources, shares=maybe_int, quota=maybe_int, period=maybe_int),
    memory=st.none() | st.builds(MemoryResources, limit=maybe_int),
)
configs = st.builds(
    QosConfig, st.booleans(), st.booleans(), st.sampled_from([("kube-system",), (), ("a", "b")])
)


@settings(max_examples=400, deadline=None)
@given(
    pod_ann=annotation_dicts,
    ctr_ann=annotation_dicts,
    res_=resources,
    oom=st.none() | st.integers(-1000, 1000) | st.sampled_from([-998, -997, 2, 3, 999, 1000]),
    name=st.sampled_from(["app", "", "other"]) | st.text(max_size=5),
    namespace=st.sampled_from(["default", "kube-system", "a"]),
    config=configs,
)
def test_classify_never_raises_and_keeps_its_invariants(
    pod_ann: dict[str, str],
    ctr_ann: dict[str, str],
    res_: Resources | None,
    oom: int | None,
    name: str,
    namespace: str,
    config: QosConfig,
) -> None:
    pod = Pod(id="p", namespace=namespace, annotations=pod_ann)
    ctr = Container(id="c", name=name, annotations=ctr_ann, resources=res_, oom_score_adj=oom)
    c = classify(pod, ctr, config)

    assert isinstance(c.qos_class, QosClass) and isinstance(c.source, ClassSource)
    assert c.reason and all(w.reason and w.key for w in c.warnings)
    low, high = oom_priority_range(c.qos_class)
    assert c.oom_priority in (None, OOM_PRIORITY_IGNORE, OOM_PRIORITY_TOP) or (
        low <= c.oom_priority <= high
    )
    dedicated = c.qos_class is DEDICATED
    assert not c.numa_exclusive or (c.numa_binding and dedicated)
    assert not c.full_pcpus_pairing or (dedicated and c.numa_binding and not c.numa_exclusive)
    assert not c.numa_binding or c.qos_class is not SYSTEM
    assert c.numa_share or c.qos_class in (SHARED, DEDICATED)
    assert c.cpuset_pool is None or (c.cpuset_pool and c.qos_class in (SHARED, SYSTEM))
    if c.source in (ClassSource.ANNOTATION, ClassSource.CONTAINER_OVERRIDE):
        # from the pod's or the container's annotations (both may carry the same key)
        assert c.qos_class.value in [*pod_ann.values(), *ctr_ann.values()]
    if c.source is ClassSource.SYSTEM_POD:
        assert config.system_namespaces_to_system_cores
    if c.qos_class is RECLAIMED and c.source is ClassSource.KUBERNETES_QOS:
        assert c.kube_qos is KubeQos.BEST_EFFORT and not c.critical_pod
