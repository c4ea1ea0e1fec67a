#!/usr/bin/env python3
"""Regenerate the protobuf modules of nri_plugin.protocol from our .proto files.

The generated modules are committed so that installing nri-qos needs only the protobuf
runtime, not protoc. tests/test_proto_drift.py runs this script into a temporary directory
and fails when the result differs from what is committed, so edit the .proto, run this,
and commit both.

Usage: python scripts/gen_protos.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "nri_plugin" / "protocol" / "proto"
DEFAULT_OUT = ROOT / "nri_plugin" / "protocol"
PROTOS = ("nri.proto", "ttrpc.proto")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) and return the files it wrote."""
    try:
        import grpc_tools
        from grpc_tools import protoc  # type: ignore[import-untyped]
    except ImportError:
        sys.exit("grpcio-tools is missing: pip install -e '.[test]' (it pins the protoc we use)")
    bundled = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{bundled}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *[str(PROTO_DIR / p) for p in PROTOS],
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed; see the messages above")
    return sorted(out_dir.glob("*_pb2.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    written = generate(parser.parse_args().out)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
