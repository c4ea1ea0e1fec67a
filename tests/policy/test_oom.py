"""OOM bands: default values, Katalyst priority mapping, config validation, order."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from nri_plugin.policy.kube_qos import KubeQos
from nri_plugin.policy.oom import (
    DEFAULT_OOM_BANDS,
    OomBand,
    OomBands,
    OomBandsError,
    decide_oom_score_adj,
)
from nri_plugin.policy.qos import (
    OOM_PRIORITY_IGNORE,
    OOM_PRIORITY_TOP,
    QosClass,
    QosConfig,
    classify,
    oom_priority_range,
)
from qos_model.containers import Container, MemoryResources, Pod, Resources
from tests.builders import MEMORY_ENHANCEMENT, MiB, kubelet_cpu

SYSTEM, DEDICATED = QosClass.SYSTEM_CORES, QosClass.DEDICATED_CORES
SHARED, RECLAIMED = QosClass.SHARED_CORES, QosClass.RECLAIMED_CORES
G, B, BE = KubeQos.GUARANTEED, KubeQos.BURSTABLE, KubeQos.BEST_EFFORT
MOST_PROTECTED_FIRST = (SYSTEM, DEDICATED, SHARED, RECLAIMED)


@dataclass(frozen=True)
class Case:
    desc: str
    qos_class: QosClass
    kube_qos: KubeQos | None
    priority: int | None
    expected: int


DEFAULTS = [
    Case("reclaimed BestEffort, unannotated: the kubelet's 1000", RECLAIMED, BE, None, 1000),
    Case("reclaimed, unknown Kubernetes QoS: Katalyst default (band top)", RECLAIMED, None, None,
         1000),
    Case("reclaimed Burstable, unannotated", RECLAIMED, B, None, 833),
    Case("reclaimed Guaranteed, unannotated", RECLAIMED, G, None, 667),
    Case("shared Burstable, unannotated: above host daemons at 0", SHARED, B, None, 166),
    Case("shared Guaranteed, unannotated: below host daemons", SHARED, G, None, -166),
    Case("shared BestEffort, unannotated", SHARED, BE, None, 499),
    Case("dedicated Guaranteed, unannotated", DEDICATED, G, None, -766),
    Case("dedicated Burstable, unannotated", DEDICATED, B, None, -633),
    Case("system Guaranteed, unannotated", SYSTEM, G, None, -965),
    Case("system BestEffort, unannotated", SYSTEM, BE, None, -900),
    Case("-300 opts out: same as unannotated", SHARED, G, OOM_PRIORITY_IGNORE, -166),
    Case("lowest shared priority: band top", SHARED, G, 0, 499),
    Case("highest shared priority: band bottom", SHARED, BE, 99, -499),
    Case("middle of reclaimed: 1000 - round(50 * 500 / 99)", RECLAIMED, BE, -50, 747),
    Case("highest dedicated priority", DEDICATED, G, 199, -899),
    Case("highest system priority", SYSTEM, G, 299, -998),
    Case("above the class range: clamped to its top", SHARED, G, 150, -499),
    Case("below the class range: clamped to its bottom", SYSTEM, G, 100, -900),
    Case("300 (never kill): the lowest value of any band", RECLAIMED, BE, OOM_PRIORITY_TOP, -998),
]  # fmt: skip


@pytest.mark.parametrize("case", DEFAULTS, ids=lambda c: c.desc)
def test_each_class_kube_qos_and_priority_gets_its_default_oom_score_adj(
    case: Case,
) -> None:
    d = decide_oom_score_adj(case.qos_class, case.kube_qos, case.priority)
    assert d.oom_score_adj == case.expected
    assert str(case.expected) in d.reason


def test_reason_names_the_band_and_the_clamp() -> None:
    d = decide_oom_score_adj(SHARED, G, 150)
    assert "[-499, 499]" in d.reason and "clamped to 99" in d.reason and "0..99" in d.reason


def test_custom_bands_are_used() -> None:
    bands = OomBands.from_mapping({"reclaimed_cores": [900, 1000], "shared_cores": (-100, 100)})
    assert bands.system_cores == DEFAULT_OOM_BANDS.system_cores
    assert decide_oom_score_adj(RECLAIMED, BE, None, bands).oom_score_adj == 1000
    assert decide_oom_score_adj(RECLAIMED, BE, -1, bands).oom_score_adj == 900
    assert decide_oom_score_adj(SHARED, BE, 0, bands).oom_score_adj == 100


def test_the_classification_feeds_the_mapping() -> None:
    # the captured containerd container (Burstable, 500m) with a shared priority
    ctr = Container(
        id="c",
        name="app",
        resources=Resources(cpu=kubelet_cpu(500), memory=MemoryResources(limit=128 * MiB)),
        oom_score_adj=500,
    )
    pod = Pod(id="p", annotations={MEMORY_ENHANCEMENT: '{"oom_priority":"66"}'})
    c = classify(pod, ctr, QosConfig())
    d = decide_oom_score_adj(c.qos_class, c.kube_qos, c.oom_priority)
    assert (c.qos_class, c.kube_qos, c.oom_priority, d.oom_score_adj) == (SHARED, B, 66, -166)


# --- config validation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    desc: str
    build: object  # a zero-argument callable
    message: str


BAD = [
    Bad("overlapping bands", lambda: OomBands(shared_cores=OomBand(-600, 499)),
        "shared_cores [-600, 499] must lie entirely above dedicated_cores [-899, -500]"),
    Bad("touching bands", lambda: OomBands(reclaimed_cores=OomBand(499, 1000)),
        "reclaimed_cores [499, 1000] must lie entirely above shared_cores"),
    Bad("reversed order", lambda: OomBands(system_cores=OomBand(900, 950),
        reclaimed_cores=OomBand(960, 1000)),
        "dedicated_cores [-899, -500] must lie entirely above system_cores [900, 950]"),
    Bad("-1000 exempts from the OOM killer", lambda: OomBand(-1000, -900), "-1000 would exempt"),
    Bad("lowest above highest", lambda: OomBand(10, 5), "lowest <= highest"),
    Bad("above 1000", lambda: OomBand(900, 1001), "<= 1000"),
    Bad("a bool is not a number", lambda: OomBand(True, 5), "lowest must be an integer"),
    Bad("a float is not a number", lambda: OomBand(1, 5.0), "highest must be an integer"),  # type: ignore[arg-type]
    Bad("not an OomBand", lambda: OomBands(shared_cores=(-499, 499)),  # type: ignore[arg-type]
        "shared_cores must be an OomBand"),
    Bad("unknown class in config", lambda: OomBands.from_mapping({"gold_cores": [1, 2]}),
        "unknown class 'gold_cores'"),
    Bad("wrong shape in config", lambda: OomBands.from_mapping({"shared_cores": [1, 2, 3]}),
        "shared_cores must be [lowest, highest]"),
    Bad("a string in config", lambda: OomBands.from_mapping({"shared_cores": "-499..499"}),
        "shared_cores must be [lowest, highest]"),
    Bad("bad numbers in config name the class", lambda: OomBands.from_mapping(
        {"system_cores": ["-998", -900]}), "system_cores: oom band: lowest must be an integer"),
]  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=lambda c: c.desc)
def test_bad_config_is_refused_clearly(case: Bad) -> None:
    with pytest.raises(OomBandsError) as info:
        case.build()  # type: ignore[operator]
    assert case.message in str(info.value)


# --- hypothesis: monotonic in priority, ordered across classes, for any valid config -----------


@st.composite
def valid_bands(draw: st.DrawFn) -> OomBands:
    """Four disjoint ordered bands; a band may be a single value."""
    edges = sorted(draw(st.lists(st.integers(-999, 1000), min_size=4, max_size=4, unique=True)))
    gaps = sorted(draw(st.lists(st.integers(-999, 1000), min_size=4, max_size=4, unique=True)))
    assume(all(e not in gaps for e in edges))
    points = sorted(edges + gaps)
    # consecutive points pair up; a single-value band when both points of a pair coincide
    pairs = [(points[i], points[i + 1]) for i in range(0, 8, 2)]
    squash = draw(st.lists(st.booleans(), min_size=4, max_size=4))
    bands = [OomBand(lo, lo if flat else hi) for (lo, hi), flat in zip(pairs, squash, strict=True)]
    return OomBands(*bands)


priorities = st.none() | st.integers(-400, 400) | st.sampled_from([-300, 300, -100, 99, 199, 299])
kube = st.sampled_from([None, G, B, BE])


@given(valid_bands(), st.sampled_from(list(QosClass)), kube, st.integers(-400, 300), st.data())
def test_higher_priority_never_gets_a_higher_value(
    bands: OomBands, qos_class: QosClass, kube_qos: KubeQos | None, p1: int, data: st.DataObject
) -> None:
    # The scale ends at 300 ("never kill"). As in Katalyst, only exactly 300 is top; 301 is
    # out of range and clamped to the class's highest. -300 means "no priority", not a point.
    p2 = data.draw(st.integers(p1, OOM_PRIORITY_TOP))
    assume(OOM_PRIORITY_IGNORE not in (p1, p2))
    low_p = decide_oom_score_adj(qos_class, kube_qos, p1, bands).oom_score_adj
    high_p = decide_oom_score_adj(qos_class, kube_qos, p2, bands).oom_score_adj
    assert high_p <= low_p


@given(valid_bands(), st.sampled_from(list(QosClass)), kube, priorities)
def test_values_stay_in_the_class_band(
    bands: OomBands, qos_class: QosClass, kube_qos: KubeQos | None, priority: int | None
) -> None:
    value = decide_oom_score_adj(qos_class, kube_qos, priority, bands).oom_score_adj
    band = bands.system_cores if priority == OOM_PRIORITY_TOP else bands.band(qos_class)
    assert band.lowest <= value <= band.highest
    assert -1000 < value <= 1000


@given(valid_bands(), kube, kube, priorities, priorities, st.data())
def test_classes_are_ordered_whatever_the_inputs(
    bands: OomBands,
    kube1: KubeQos | None,
    kube2: KubeQos | None,
    prio1: int | None,
    prio2: int | None,
    data: st.DataObject,
) -> None:
    assume(OOM_PRIORITY_TOP not in (prio1, prio2))  # "never kill" leaves its class on purpose
    i = data.draw(st.integers(0, 2))
    j = data.draw(st.integers(i + 1, 3))
    safer, riskier = MOST_PROTECTED_FIRST[i], MOST_PROTECTED_FIRST[j]
    v_safer = decide_oom_score_adj(safer, kube1, prio1, bands).oom_score_adj
    v_riskier = decide_oom_score_adj(riskier, kube2, prio2, bands).oom_score_adj
    assert v_safer < v_riskier


@given(valid_bands(), st.sampled_from(list(QosClass)))
def test_unannotated_order_follows_the_kubelet(bands: OomBands, qos_class: QosClass) -> None:
    values = [decide_oom_score_adj(qos_class, k, None, bands).oom_score_adj for k in (G, B, BE)]
    assert values == sorted(values)
    assert decide_oom_score_adj(qos_class, None, None, bands).oom_score_adj == values[2]
    # Katalyst's default priority (the class's lowest) equals the unannotated BestEffort place
    low, _ = oom_priority_range(qos_class)
    assert decide_oom_score_adj(qos_class, G, low, bands).oom_score_adj == values[2]


@given(st.lists(st.integers(-1100, 1100), min_size=8, max_size=8))
def test_construction_succeeds_exactly_for_ordered_disjoint_bands(points: list[int]) -> None:
    ok = all(-1000 < p <= 1000 for p in points) and all(
        points[k] <= points[k + 1] if k % 2 == 0 else points[k] < points[k + 1] for k in range(7)
    )
    try:
        OomBands(*(OomBand(points[k], points[k + 1]) for k in range(0, 8, 2)))
    except OomBandsError:
        assert not ok
    else:
        assert ok
