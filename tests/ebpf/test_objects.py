"""The committed BPF objects match their sources and load.

The objects are built by ebpf/build.py and committed, so CI needs no compiler; the stamp
next to each object records the sha256 of the source it was built from. Editing a
``.bpf.c`` without rebuilding fails here, not on a node.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from ebpf import build
from ebpf.libbpf import BpfUnavailable, libbpf


def test_every_source_has_an_object_built_from_it() -> None:
    sources = build.sources()
    assert sources, "no ebpf/*.bpf.c found"
    for source in sources:
        assert build.object_for(source).is_file(), f"{source.name} has no committed object"
    assert build.stale_objects() == []


def test_an_edited_source_is_reported_stale(tmp_path: Path) -> None:
    """The check bites: a copy of the tree whose C changed after the build is stale."""
    ebpf_dir, objects_dir = tmp_path / "ebpf", tmp_path / "ebpf" / "objects"
    shutil.copytree(build.EBPF_DIR, ebpf_dir, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    assert build.stale_objects(ebpf_dir, objects_dir) == []
    source = build.sources(ebpf_dir)[0]
    source.write_text(source.read_text() + "\n/* edited */\n")
    problems = build.stale_objects(ebpf_dir, objects_dir)
    assert len(problems) == 1
    assert "changed since" in problems[0] and "python3 -m ebpf.build" in problems[0]


def test_a_tampered_object_is_reported(tmp_path: Path) -> None:
    ebpf_dir, objects_dir = tmp_path / "ebpf", tmp_path / "ebpf" / "objects"
    shutil.copytree(build.EBPF_DIR, ebpf_dir, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    obj = build.object_for(build.sources(ebpf_dir)[0], objects_dir)
    obj.write_bytes(obj.read_bytes() + b"\0")
    assert "does not match its stamp" in build.stale_objects(ebpf_dir, objects_dir)[0]


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root")
@pytest.mark.parametrize("source", build.sources(), ids=lambda p: p.name)
def test_the_object_loads(source: Path) -> None:
    from ebpf.libbpf import BpfObject

    try:
        libbpf()
    except BpfUnavailable as exc:
        pytest.skip(str(exc))
    with BpfObject.load(build.object_for(source)) as obj:
        names = obj.program_names()
        assert names
        for name in names:
            assert obj.program_fd(name) >= 0
        for name in obj.map_names():
            with obj.map(name) as bpf_map:
                assert bpf_map.info.key_size > 0
