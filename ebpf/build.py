"""Build the committed BPF objects: every ``ebpf/*.bpf.c`` -> ``ebpf/objects/<name>.bpf.o``.

The objects are committed so that neither CI nor a node needs a compiler (the way
cilium/ebpf's bpf2go ships generated objects). Each object gets a ``.sha256`` stamp with
the sha256 of its source, of the object itself, and the clang version that made it;
``stale_objects()`` compares the stamps with the tree, so a C edit without a rebuild fails
the tests (tests/ebpf/test_objects.py) instead of shipping an old program.

Usage: ``python3 -m ebpf.build`` (needs clang and llvm-strip, e.g. Debian's clang-14,
llvm-14 and libbpf-dev for ``<bpf/bpf_helpers.h>``), or ``python3 -m ebpf.build --check``
to only verify the stamps (no compiler needed). ``CLANG``/``LLVM_STRIP`` override the tools.

clang runs in ``ebpf/`` on the bare file name with ``-fdebug-compilation-dir=.``, so no
absolute path of the checkout ends up in the object's BTF line info and a rebuild in
another checkout gives the same bytes.

CO-RE sources (``#include "vmlinux.h"``, e.g. runq.bpf.c) get a ``vmlinux.h`` generated
for the build only, into a temporary directory, from the build host's BTF
(``bpftool btf dump file /sys/kernel/btf/vmlinux format c``; ``VMLINUX_BTF``/``BPFTOOL``
override). It is never committed: libbpf relocates the field accesses against the running
kernel's BTF at load time. The temporary path is mapped to ``/vmlinux`` in the debug info,
so it does not leak into the object; the object's bytes do depend on the build host's
kernel types (rebuild on the same kernel to reproduce them).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

EBPF_DIR = Path(__file__).resolve().parent
OBJECTS_DIR = EBPF_DIR / "objects"
SOURCE_SUFFIX = ".bpf.c"

# Same flags as the probes in docs (host-capabilities "eBPF"): -g keeps BTF (libbpf needs it
# for maps and CO-RE); llvm-strip -g then drops DWARF, which only makes the object bigger.
CLANG_FLAGS = ("-O2", "-g", "-target", "bpf", "-Wall", "-Werror", "-fdebug-compilation-dir=.")
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
VMLINUX_INCLUDE = '#include "vmlinux.h"'
ARCH_DEFINES = {"x86_64": "x86", "aarch64": "arm64", "ppc64le": "powerpc", "s390x": "s390"}


class BuildError(Exception):
    """The build cannot run or a compile failed; the message says what to do."""


@dataclass(frozen=True)
class Stamp:
    """What ``<name>.bpf.o.sha256`` records."""

    source_sha256: str
    object_sha256: str
    clang: str

    def render(self, source: str, obj: str) -> str:
        return f"{self.source_sha256}  {source}\n{self.object_sha256}  {obj}\nclang: {self.clang}\n"

    @classmethod
    def parse(cls, text: str) -> Stamp:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) != 3 or not lines[2].startswith("clang: "):
            raise ValueError("expected '<sha> <source>', '<sha> <object>', 'clang: <version>'")
        return cls(lines[0].split()[0], lines[1].split()[0], lines[2].removeprefix("clang: "))


def sources(ebpf_dir: Path = EBPF_DIR) -> list[Path]:
    return sorted(ebpf_dir.glob(f"*{SOURCE_SUFFIX}"))


def object_for(source: Path, objects_dir: Path = OBJECTS_DIR) -> Path:
    return objects_dir / (source.name.removesuffix(SOURCE_SUFFIX) + ".bpf.o")


def stamp_for(obj: Path) -> Path:
    return obj.with_name(obj.name + ".sha256")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stale_objects(ebpf_dir: Path = EBPF_DIR, objects_dir: Path = OBJECTS_DIR) -> list[str]:
    """One line per source whose committed object is missing or does not match it."""
    problems = []
    for source in sources(ebpf_dir):
        obj = object_for(source, objects_dir)
        stamp_path = stamp_for(obj)
        if not obj.is_file() or not stamp_path.is_file():
            problems.append(f"{source.name}: no {obj.name} or its stamp; run python3 -m ebpf.build")
            continue
        try:
            stamp = Stamp.parse(stamp_path.read_text())
        except ValueError as exc:
            problems.append(f"{stamp_path.name}: unreadable stamp ({exc}); rebuild")
            continue
        if stamp.source_sha256 != sha256(source):
            problems.append(
                f"{source.name} changed since {obj.name} was built; run python3 -m ebpf.build"
            )
        elif stamp.object_sha256 != sha256(obj):
            problems.append(f"{obj.name} does not match its stamp; rebuild, do not edit objects")
    return problems


def _tool(env: str, *names: str) -> str:
    candidates = [os.environ[env]] if os.environ.get(env) else list(names)
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    raise BuildError(
        f"none of {', '.join(candidates)} found; install clang-14 and llvm-14 (apt) or set {env}"
    )


def _include_dirs() -> list[str]:
    """The multiarch dir for <asm/types.h>, which <linux/bpf.h> includes (Debian layout)."""
    machine = platform.machine()
    multiarch = Path(f"/usr/include/{machine}-linux-gnu")
    return [f"-I{multiarch}"] if multiarch.is_dir() else []


def clang_version(clang: str) -> str:
    out = subprocess.run([clang, "--version"], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()[0].strip()


def needs_vmlinux_h(source: Path) -> bool:
    """True for a CO-RE source that includes the generated vmlinux.h."""
    return any(line.strip() == VMLINUX_INCLUDE for line in source.read_text().splitlines())


def write_vmlinux_h(directory: Path) -> Path:
    """Generate ``directory/vmlinux.h`` from the kernel's BTF with bpftool. Raises BuildError."""
    btf = Path(os.environ.get("VMLINUX_BTF") or VMLINUX_BTF)
    if not btf.is_file():
        raise BuildError(f"no {btf} (kernel without BTF); set VMLINUX_BTF to a vmlinux with BTF")
    bpftool = _tool("BPFTOOL", "bpftool", "/usr/sbin/bpftool")
    header = directory / "vmlinux.h"
    with header.open("wb") as out:
        done = subprocess.run(
            [bpftool, "btf", "dump", "file", str(btf), "format", "c"],
            stdout=out,
            stderr=subprocess.PIPE,
        )
    if done.returncode != 0:
        raise BuildError(f"bpftool could not dump {btf}: {done.stderr.decode().strip()}")
    return header


def build(source: Path, objects_dir: Path = OBJECTS_DIR) -> Path:
    """Compile and strip one source, then write its stamp. Raises BuildError."""
    clang = _tool("CLANG", "clang-14", "clang")
    strip = _tool("LLVM_STRIP", "llvm-strip-14", "llvm-strip")
    with tempfile.TemporaryDirectory(prefix="ebpf-build-") as scratch:
        extra: list[str] = []
        if needs_vmlinux_h(source):
            write_vmlinux_h(Path(scratch))
            extra = [f"-I{scratch}", f"-fdebug-prefix-map={scratch}=/vmlinux"]
        return _compile(clang, strip, source, objects_dir, extra)


def _compile(clang: str, strip: str, source: Path, objects_dir: Path, extra: list[str]) -> Path:
    arch = ARCH_DEFINES.get(platform.machine(), platform.machine())
    objects_dir.mkdir(parents=True, exist_ok=True)
    obj = object_for(source, objects_dir)
    tmp = obj.with_name(obj.name + ".tmp")
    command = [
        clang,
        *CLANG_FLAGS,
        f"-D__TARGET_ARCH_{arch}",
        *_include_dirs(),
        *extra,
        "-c",
        source.name,
        "-o",
        str(tmp),
    ]
    done = subprocess.run(command, cwd=source.parent, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"clang failed on {source.name}:\n{done.stderr.strip()}")
    subprocess.run([strip, "-g", str(tmp)], check=True)
    os.replace(tmp, obj)
    stamp = Stamp(sha256(source), sha256(obj), clang_version(clang))
    stamp_for(obj).write_text(stamp.render(source.name, obj.name))
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m ebpf.build", description=__doc__)
    parser.add_argument("--check", action="store_true", help="only verify the stamps")
    args = parser.parse_args(argv)
    if args.check:
        problems = stale_objects()
        for line in problems:
            print(line, file=sys.stderr)
        return 1 if problems else 0
    try:
        for source in sources():
            obj = build(source)
            print(f"{source.name} -> {obj.relative_to(EBPF_DIR.parent)} ({obj.stat().st_size} B)")
    except BuildError as exc:
        print(f"ebpf build: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
