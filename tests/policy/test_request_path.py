"""What the engine remembers on the request path gives what deciding again would give.

* classification is remembered by `engine._classify_key`, which holds the annotations
  `qos.annotation_keys` and `roles.annotation_keys` name: they must be every key
  classify() and decide_role() look up, on the pod and on the container;
* a remembered classification (and its notes) equals a fresh one;
* originals_annotation writes exactly what json.dumps wrote.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

from hypothesis import given, settings
from hypothesis import strategies as st

from nri_plugin.policy import qos, roles
from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.intents import Note
from nri_plugin.policy.qos import QosConfig, classify
from nri_plugin.policy.roles import apply_role, decide_role
from nri_plugin.policy.state import originals_annotation
from qos_model.containers import Container, CpuResources, Pod, Resources
from tests.policy.sysfs_builder import MachineShape
from tests.policy.test_qos import annotation_dicts, configs, resources, values

ROLE_KEYS = st.sampled_from(
    [
        roles.ROLES_ANNOTATION,
        roles.KUBELET_TYPE_ANNOTATION,
        roles.RESOURCES_ANNOTATION,
        f"{roles.ROLE_ANNOTATION}/container.app",
        "role.nri-qos.io/container.app",
        f"{roles.ROLE_ANNOTATION}/container.",
    ]
)
ROLE_VALUES = st.sampled_from(
    ["init", "sidecar", "app", "ephemeral", "container", "nope", '{"app": "init"}', "{}"]
)
role_dicts = st.dictionaries(ROLE_KEYS, ROLE_VALUES | values, max_size=3)
both = st.builds(lambda a, b: {**a, **b}, annotation_dicts, role_dicts)
names = st.sampled_from(["app", "", "other"]) | st.text(max_size=5)
known_roles = st.none() | st.dictionaries(names, ROLE_VALUES, max_size=2)


class Watched(Mapping[str, str]):
    """Annotations that remember which keys were looked up; reading them all fails."""

    def __init__(self, data: dict[str, str]) -> None:
        self._data = data
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return self._data[key]

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("the annotations were iterated: every key is an input")

    def __len__(self) -> int:
        return len(self._data)


@settings(max_examples=300, deadline=None)
@given(pod_ann=both, ctr_ann=both, name=names, known=known_roles, config=configs)
def test_classification_reads_only_the_keys_it_declares(
    pod_ann: dict[str, str],
    ctr_ann: dict[str, str],
    name: str,
    known: dict[str, str] | None,
    config: QosConfig,
) -> None:
    on_pod, on_ctr = Watched(pod_ann), Watched(ctr_ann)
    pod = Pod(id="p", namespace="default", annotations=on_pod)
    ctr = Container(id="c", name=name, annotations=on_ctr)
    apply_role(classify(pod, ctr, config), decide_role(pod, ctr, known))
    declared = qos.annotation_keys(name) | roles.annotation_keys(name)
    assert on_pod.read <= declared
    assert on_ctr.read <= declared


def _engine() -> Engine:
    return Engine(MachineShape(cores_per_l3=4).expected_topology(), EngineConfig())


def _fresh(engine: Engine, pod: Pod, ctr: Container) -> tuple[object, list[Note]]:
    """What _classify did before it remembered anything (and the notes it gave)."""
    known = engine._pod_roles.get(pod.uid) if pod.uid else None
    role = decide_role(pod, ctr, known)
    return apply_role(classify(pod, ctr, engine.config.qos), role), []


@settings(max_examples=200, deadline=None)
@given(
    pod_ann=both,
    ctr_ann=both,
    name=names,
    res=resources,
    oom=st.none() | st.sampled_from([-997, 0, 500, 1000]),
    roles_=known_roles,
)
def test_a_remembered_classification_equals_a_fresh_one(
    pod_ann: dict[str, str],
    ctr_ann: dict[str, str],
    name: str,
    res: Resources | None,
    oom: int | None,
    roles_: dict[str, str] | None,
) -> None:
    engine = _engine()
    if roles_ is not None:
        engine._pod_roles["uid"] = roles_
    pod = Pod(id="p", uid="uid", namespace="default", name="pod", annotations=pod_ann)
    first = Container(id="c1", name=name, annotations=ctr_ann, resources=res, oom_score_adj=oom)
    # a second container with the same inputs (and dicts that are equal, not the same)
    second = Container(
        id="c2", name=name, annotations=dict(ctr_ann), resources=res, oom_score_adj=oom
    )
    notes_first: list[Note] = []
    notes_second: list[Note] = []
    got_first = engine._classify(pod, first, notes_first)
    got_second = engine._classify(pod, second, notes_second)  # remembered
    expected, _ = _fresh(engine, pod, first)
    assert got_first == expected and got_second == expected
    # the same notes for each container, subjects and texts included
    assert [(n.kind, n.subject, n.message, n.severity) for n in notes_first] == [
        (n.kind, n.subject, n.message, n.severity) for n in notes_second
    ]


def test_a_new_qos_config_forgets_what_was_remembered() -> None:
    engine = _engine()
    pod = Pod(id="p", namespace="kube-system")
    ctr = Container(id="c", name="app")
    before = engine._classify(pod, ctr, [])
    engine.reconfigure(EngineConfig(qos=QosConfig(system_namespaces_to_system_cores=True)))
    after = engine._classify(pod, ctr, [])
    assert before.qos_class is qos.QosClass.SHARED_CORES
    assert after.qos_class is qos.QosClass.SYSTEM_CORES


class Flag(int):
    """An int subclass (json.dumps writes its int value, str() may not)."""

    def __str__(self) -> str:
        return "flag"

    __repr__ = __str__


ints = st.none() | st.integers(-(1 << 70), 1 << 70) | st.booleans() | st.builds(Flag, st.integers())


@given(oom=ints, shares=ints)
def test_originals_annotation_is_what_json_dumps_writes(
    oom: int | None, shares: int | None
) -> None:
    ctr = Container(id="c", oom_score_adj=oom, resources=Resources(cpu=CpuResources(shares=shares)))
    original: dict[str, int] = {}
    if oom is not None:
        original["oom_score_adj"] = oom
    if shares is not None:
        original["cpu_shares"] = shares
    expected = json.dumps(original, sort_keys=True, separators=(",", ":"))
    assert originals_annotation(ctr) == expected
    assert originals_annotation(Container(id="c", oom_score_adj=oom)) == json.dumps(
        {} if oom is None else {"oom_score_adj": oom}, separators=(",", ":")
    )
