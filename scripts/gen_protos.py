#!/usr/bin/env python3
"""Regenerate the protobuf modules of nri_plugin.protocol and nri_plugin.debug from our
.proto files.

The generated modules are committed so that installing nri-qos needs only the protobuf
and grpcio runtimes, not protoc. tests/test_proto_drift.py runs this script into a
temporary directory and fails when the result differs from what is committed, so edit
the .proto, run this, and commit both.

The debug API's proto is compiled with the repository root as its include path, so its
descriptor is registered as "nri_plugin/debug/proto/debug.proto" (no clash with another
library's "debug.proto" in the process-wide descriptor pool) and its gRPC module imports
its messages by their package path.

Usage: python scripts/gen_protos.py [--out DIR]   (DIR gets the protocol modules, and
DIR/debug the debug API's)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "nri_plugin" / "protocol" / "proto"
DEFAULT_OUT = ROOT / "nri_plugin" / "protocol"
PROTOS = ("nri.proto", "ttrpc.proto")
DEBUG_PROTO = Path("nri_plugin") / "debug" / "proto" / "debug.proto"
DEBUG_OUT = ROOT / DEBUG_PROTO.parent


def _protoc(args: list[str]) -> None:
    try:
        import grpc_tools
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError:
        sys.exit("grpcio-tools is missing: pip install -e '.[test]' (it pins the protoc we use)")
    bundled = Path(grpc_tools.__file__).parent / "_proto"
    if protoc.main(["protoc", f"-I{bundled}", *args]) != 0:
        sys.exit("protoc failed; see the messages above")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) on the NRI protos and return the files it wrote."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _protoc(
        [
            f"-I{PROTO_DIR}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            *[str(PROTO_DIR / p) for p in PROTOS],
        ]
    )
    return sorted(out_dir.glob("*_pb2.py*"))


def generate_debug(out_dir: Path) -> list[Path]:
    """The debug API's messages, stubs and gRPC service module, written flat into
    `out_dir`; returns them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as staging:
        _protoc(
            [
                f"-I{ROOT}",
                f"--python_out={staging}",
                f"--pyi_out={staging}",
                f"--grpc_python_out={staging}",
                str(ROOT / DEBUG_PROTO),
            ]
        )
        made = Path(staging) / DEBUG_PROTO.parent
        for path in sorted(made.glob("debug_pb2*")):
            shutil.copyfile(path, out_dir / path.name)
    return sorted(out_dir.glob("debug_pb2*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    out = parser.parse_args().out
    written = generate(out or DEFAULT_OUT)
    written += generate_debug(out / "debug" if out else DEBUG_OUT)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
