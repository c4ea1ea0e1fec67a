"""The committed protobuf modules must be exactly what our .proto files generate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import REPO

GENERATED = REPO / "nri_plugin" / "protocol"
DEBUG_GENERATED = REPO / "nri_plugin" / "debug" / "proto"


def _load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_modules_match_the_proto_files(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a test dependency")
    written = _load_generator().generate(tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["nri_pb2.py", "nri_pb2.pyi", "ttrpc_pb2.py", "ttrpc_pb2.pyi"]
    stale = [n for n in names if (tmp_path / n).read_bytes() != (GENERATED / n).read_bytes()]
    assert not stale, (
        f"{stale} differ from what the .proto files generate: "
        "run `python scripts/gen_protos.py` and commit the result"
    )


def test_generated_debug_api_modules_match_the_proto_file(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a test dependency")
    written = _load_generator().generate_debug(tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["debug_pb2.py", "debug_pb2.pyi", "debug_pb2_grpc.py"]
    stale = [n for n in names if (tmp_path / n).read_bytes() != (DEBUG_GENERATED / n).read_bytes()]
    assert not stale, (
        f"{stale} differ from what nri_plugin/debug/proto/debug.proto generates: "
        "run `python scripts/gen_protos.py` and commit the result"
    )
