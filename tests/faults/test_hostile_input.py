"""Input from pods and runtimes is quoted clipped: a 1 MiB annotation or name never becomes
a 1 MiB decision event, plan entry or log line."""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from typing import Any

from nri_plugin.policy.engine import Engine
from nri_plugin.policy.qos import (
    ANNOTATION_CPU_ENHANCEMENT,
    ANNOTATION_MEMORY_ENHANCEMENT,
    ANNOTATION_QOS_LEVEL,
)
from tests.builders import container, pod
from tests.policy.sysfs_builder import MachineShape

MIB_TEXT = "x" * (1 << 20)
LIMIT = 4096


def long_strings(value: Any, path: str = "") -> list[str]:
    """Paths of every string longer than LIMIT inside dataclasses, sequences and maps."""
    if isinstance(value, str):
        return [path] if len(value) > LIMIT else []
    if is_dataclass(value) and not isinstance(value, type):
        parts = ((f"{path}.{f.name}", getattr(value, f.name)) for f in fields(value))
        return [p for where, v in parts for p in long_strings(v, where)]
    if isinstance(value, (list, tuple, frozenset, set)):
        return [p for i, v in enumerate(value) for p in long_strings(v, f"{path}[{i}]")]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in long_strings(v, f"{path}[{str(k)[:20]}]")]
    return []


def test_huge_annotations_and_names_are_clipped_in_notes_and_plans() -> None:
    engine = Engine(MachineShape(cores_per_l3=8).expected_topology())
    annotations = {
        ANNOTATION_QOS_LEVEL: MIB_TEXT,
        ANNOTATION_CPU_ENHANCEMENT: MIB_TEXT,
        ANNOTATION_MEMORY_ENHANCEMENT: MIB_TEXT,
    }
    hostile = replace(pod("big"), name=MIB_TEXT, annotations=annotations)
    step = engine.pod_started(hostile)
    assert long_strings(step) == []
    step = engine.container_created(hostile, replace(container("big", 1000), name=MIB_TEXT))
    assert step.intents.notes, "the bad annotations must be reported"
    assert long_strings(step) == []
    assert long_strings(engine.plan.containers["ctr-big"]) == []
