"""A small typed ctypes loader over the system's ``libbpf.so.1`` (1.x).

Why ctypes and not bcc or a PyPI binding: the objects are compiled once and committed
(ebpf/build.py), so a node needs neither a compiler nor kernel headers, only libbpf, which
iproute2 already pulls in; the PyPI bindings are immature (host-capabilities.md, "eBPF").

Three handles, each owning what it holds and released by ``close()`` (or ``with``):

- ``BpfObject``: an opened and loaded ``.bpf.o`` (its programs and maps live while it is
  open). Maps can be given pin paths before loading: libbpf then reuses a compatible map
  already pinned there, or pins the new one, which is how an agent restart adopts live
  state instead of emptying it.
- ``BpfMap``: one map by file descriptor (its own ``dup`` of the object's, or one reopened
  from a bpffs pin with ``BpfMap.from_pinned``), with byte-level lookup/update/delete/keys,
  so every key and value layout is the caller's business.
- ``BpfLink``: a program attached where its section name says (``tp_btf/...`` and the like).

Everything that means "BPF cannot be used here" (no libbpf, no object file, a load refused
by the kernel or the verifier) raises ``BpfUnavailable`` with one line saying what is
missing and what to do; the libbpf log of the failed step is kept in ``.log``. Map
operations raise ``OSError`` with the errno (E2BIG for a full map, and so on).
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import logging
import os
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

log = logging.getLogger("nri_qos.ebpf")

LIBBPF_SONAME = "libbpf.so.1"

# Update flags (uapi/linux/bpf.h).
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

# Map types whose values are one slot per possible CPU.
_PERCPU_MAP_TYPES = frozenset({5, 6, 10, 21})  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH, ..
_LIBBPF_WARN, _LIBBPF_INFO, _LIBBPF_DEBUG = 0, 1, 2


class BpfUnavailable(Exception):
    """BPF cannot be used here; the message is one line: what is missing, what to do."""

    def __init__(self, message: str, log_lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.log = log_lines or []


# --- the library -------------------------------------------------------------------------

_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_lib: ctypes.CDLL | None = None
_libc: ctypes.CDLL | None = None
_lib_lock = threading.Lock()
_load_lock = threading.Lock()  # libbpf's print callback is process-wide: one load at a time
_messages: deque[str] = deque(maxlen=200)


def _on_libbpf_print(level: int, fmt: bytes | None, args: int | None) -> int:
    """libbpf's print callback: format with vsnprintf (fmt + va_list), keep and log it."""
    if fmt is None or _libc is None:
        return 0
    buf = ctypes.create_string_buffer(4096)
    _libc.vsnprintf(buf, ctypes.c_size_t(len(buf)), fmt, ctypes.c_void_p(args))
    for line in buf.value.decode(errors="replace").splitlines():
        if level <= _LIBBPF_INFO:
            _messages.append(line)
        log.debug("libbpf: %s", line)
    return 0


_print_callback = _PRINT_FN(_on_libbpf_print)  # module-level: must outlive every libbpf call

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "libbpf_set_print": (ctypes.c_void_p, [_PRINT_FN]),
    "libbpf_num_possible_cpus": (ctypes.c_int, []),
    "bpf_object__open_file": (ctypes.c_void_p, [ctypes.c_char_p, ctypes.c_void_p]),
    "bpf_object__load": (ctypes.c_int, [ctypes.c_void_p]),
    "bpf_object__close": (None, [ctypes.c_void_p]),
    "bpf_object__next_program": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]),
    "bpf_object__next_map": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]),
    "bpf_object__find_program_by_name": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
    "bpf_object__find_map_by_name": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
    "bpf_program__name": (ctypes.c_char_p, [ctypes.c_void_p]),
    "bpf_program__fd": (ctypes.c_int, [ctypes.c_void_p]),
    "bpf_program__attach": (ctypes.c_void_p, [ctypes.c_void_p]),
    "bpf_link__destroy": (ctypes.c_int, [ctypes.c_void_p]),
    "bpf_map__name": (ctypes.c_char_p, [ctypes.c_void_p]),
    "bpf_map__fd": (ctypes.c_int, [ctypes.c_void_p]),
    "bpf_map__set_pin_path": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p]),
    "bpf_map_lookup_elem": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
    "bpf_map_update_elem": (
        ctypes.c_int,
        [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64],
    ),
    "bpf_map_delete_elem": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p]),
    "bpf_map_get_next_key": (ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
    "bpf_obj_pin": (ctypes.c_int, [ctypes.c_int, ctypes.c_char_p]),
    "bpf_obj_get": (ctypes.c_int, [ctypes.c_char_p]),
    "bpf_obj_get_info_by_fd": (
        ctypes.c_int,
        [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)],
    ),
}


def libbpf() -> ctypes.CDLL:
    """The loaded library, typed; raises BpfUnavailable when it is not installed."""
    global _lib, _libc
    with _lib_lock:
        if _lib is not None:
            return _lib
        try:
            lib = ctypes.CDLL(LIBBPF_SONAME, use_errno=True)
            libc = ctypes.CDLL(None, use_errno=True)
        except OSError as exc:
            raise BpfUnavailable(
                f"{LIBBPF_SONAME} cannot be loaded ({exc}); install libbpf 1.x (apt libbpf1)"
            ) from exc
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                func = getattr(lib, name)
            except AttributeError as exc:
                raise BpfUnavailable(
                    f"{LIBBPF_SONAME} has no {name}; install libbpf 1.0 or newer"
                ) from exc
            func.restype = restype
            func.argtypes = argtypes
        libc.vsnprintf.restype = ctypes.c_int
        libc.vsnprintf.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_void_p,
        ]
        _libc = libc
        lib.libbpf_set_print(_print_callback)
        _lib = lib
        return lib


def _errno_of(rc: int) -> int:
    """libbpf 1.x returns -errno (and sets errno); NULL-returning calls only set errno."""
    return -rc if rc < 0 else (ctypes.get_errno() or errno_codes.EIO)


def _describe(code: int) -> str:
    return f"{errno_codes.errorcode.get(code, str(code))} ({os.strerror(code)})"


def possible_cpus() -> int:
    """How many per-CPU slots a per-CPU map value has (possible, not online, CPUs)."""
    n = int(libbpf().libbpf_num_possible_cpus())
    if n <= 0:
        raise OSError(_errno_of(n), "cannot count possible CPUs")
    return n


# --- maps --------------------------------------------------------------------------------


class _MapInfo(ctypes.Structure):
    # The leading fields of struct bpf_map_info; the kernel accepts a shorter struct.
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _ProgInfo(ctypes.Structure):
    # The leading fields of struct bpf_prog_info.
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
    ]


@dataclass(frozen=True, slots=True)
class MapInfo:
    """What the kernel says about a map (so a reopened pin is self-describing)."""

    name: str
    map_id: int
    map_type: int
    key_size: int
    value_size: int
    max_entries: int

    @property
    def per_cpu(self) -> bool:
        return self.map_type in _PERCPU_MAP_TYPES


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    rc = libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if rc < 0:
        code = _errno_of(rc)
        raise OSError(code, f"cannot read map info of fd {fd}: {os.strerror(code)}")
    return MapInfo(
        name=info.name.decode(errors="replace"),
        map_id=info.id,
        map_type=info.type,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
    )


def program_id(fd: int) -> int:
    """The kernel's id of a loaded program (what `tc filter show` and bpftool print)."""
    info = _ProgInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    rc = libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if rc < 0:
        code = _errno_of(rc)
        raise OSError(code, f"cannot read program info of fd {fd}: {os.strerror(code)}")
    return int(info.id)


def is_bpffs(path: Path) -> bool:
    """True when `path` (an existing directory) is on a bpf filesystem (pins only work there)."""
    bpf_fs_magic = 0xCAFE4A11
    try:
        fs_type = _statfs_type(path)
    except OSError:
        return False
    return fs_type == bpf_fs_magic


def _statfs_type(path: Path) -> int:
    class _StatFs(ctypes.Structure):
        _fields_: ClassVar[list[tuple[str, Any]]] = [
            ("f_type", ctypes.c_long),
            ("_rest", ctypes.c_byte * 120),
        ]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = _StatFs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(path))
    return int(buf.f_type) & 0xFFFFFFFF


class BpfMap:
    """One BPF map by file descriptor; owns the fd. Keys and values are raw bytes of the
    map's key_size and value size (per-CPU maps: one value slot per possible CPU)."""

    def __init__(self, fd: int, *, name: str = "") -> None:
        self._fd: int | None = fd
        try:
            self.info = map_info(fd)
        except OSError:
            os.close(fd)
            raise
        self.name = name or self.info.name
        slots = possible_cpus() if self.info.per_cpu else 1
        self._slot_size = (self.info.value_size + 7) // 8 * 8 if slots > 1 else 0
        self.value_buffer_size = self._slot_size * slots if slots > 1 else self.info.value_size

    @classmethod
    def from_pinned(cls, path: Path) -> BpfMap:
        """Reopen a map pinned in bpffs (bpf_obj_get). Raises OSError (ENOENT: no pin)."""
        rc = libbpf().bpf_obj_get(os.fsencode(path))
        if rc < 0:
            code = _errno_of(rc)
            raise OSError(code, f"cannot open pinned map {path}: {os.strerror(code)}", str(path))
        return cls(rc)

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"map {self.name!r} is closed")
        return self._fd

    def _key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        if len(key) != self.info.key_size:
            raise ValueError(
                f"map {self.name!r} keys are {self.info.key_size} bytes, got {len(key)}"
            )
        return ctypes.create_string_buffer(key, len(key))

    def lookup(self, key: bytes) -> bytes | None:
        """The value for `key`, None when there is none."""
        value = ctypes.create_string_buffer(self.value_buffer_size)
        rc = libbpf().bpf_map_lookup_elem(self.fd, self._key(key), value)
        if rc < 0:
            code = _errno_of(rc)
            if code == errno_codes.ENOENT:
                return None
            raise OSError(code, f"lookup in map {self.name!r} failed: {os.strerror(code)}")
        return value.raw

    def per_cpu_values(self, raw: bytes) -> list[bytes]:
        """Split a per-CPU map value into its slots (each value_size bytes)."""
        if not self.info.per_cpu:
            return [raw]
        size = self.info.value_size
        return [raw[i : i + size] for i in range(0, len(raw), self._slot_size)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        """Set `key` to `value` (BPF_ANY, BPF_NOEXIST or BPF_EXIST). Raises OSError."""
        if len(value) != self.value_buffer_size:
            raise ValueError(
                f"map {self.name!r} values are {self.value_buffer_size} bytes, got {len(value)}"
            )
        buf = ctypes.create_string_buffer(value, len(value))
        rc = libbpf().bpf_map_update_elem(self.fd, self._key(key), buf, flags)
        if rc < 0:
            code = _errno_of(rc)
            raise OSError(code, f"update of map {self.name!r} failed: {os.strerror(code)}")

    def delete(self, key: bytes) -> bool:
        """Remove `key`; False when it was not there."""
        rc = libbpf().bpf_map_delete_elem(self.fd, self._key(key))
        if rc < 0:
            code = _errno_of(rc)
            if code == errno_codes.ENOENT:
                return False
            raise OSError(code, f"delete from map {self.name!r} failed: {os.strerror(code)}")
        return True

    def keys(self) -> Iterator[bytes]:
        """Every key, by bpf_map_get_next_key (a snapshot-free walk: concurrent changes may
        be seen or missed, as with any BPF map iteration)."""
        lib = libbpf()
        current: ctypes.Array[ctypes.c_char] | None = None
        while True:
            nxt = ctypes.create_string_buffer(self.info.key_size)
            rc = lib.bpf_map_get_next_key(self.fd, current, nxt)
            if rc < 0:
                code = _errno_of(rc)
                if code == errno_codes.ENOENT:
                    return
                raise OSError(code, f"walk of map {self.name!r} failed: {os.strerror(code)}")
            yield nxt.raw
            current = nxt

    def __iter__(self) -> Iterator[bytes]:
        return self.keys()

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted while walking
                yield key, value

    def pin(self, path: Path) -> None:
        """Pin the map at `path` (a new name in a bpffs directory). Raises OSError."""
        rc = libbpf().bpf_obj_pin(self.fd, os.fsencode(path))
        if rc < 0:
            code = _errno_of(rc)
            raise OSError(code, f"cannot pin map {self.name!r}: {os.strerror(code)}", str(path))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- objects and links -------------------------------------------------------------------


class BpfLink:
    """An attached program; `close()` detaches it."""

    def __init__(self, pointer: int, program: str) -> None:
        self._link: int | None = pointer
        self.program = program

    def close(self) -> None:
        if self._link is not None:
            libbpf().bpf_link__destroy(self._link)
            self._link = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class BpfObject:
    """An opened and loaded BPF object file. Use `BpfObject.load(path)`."""

    def __init__(self, pointer: int, path: Path) -> None:
        self._obj: int | None = pointer
        self.path = path

    @classmethod
    def load(cls, path: Path, *, pin_maps: Mapping[str, Path] | None = None) -> BpfObject:
        """Open and load `path`. `pin_maps` gives maps a bpffs path: a compatible map
        already pinned there is reused (its entries survive), otherwise the new map is
        pinned there. Raises BpfUnavailable with one line saying what to do."""
        lib = libbpf()
        if not os.path.isfile(path):  # False, not an error, for a path we may not stat
            raise BpfUnavailable(f"no BPF object at {path}; build it with python3 -m ebpf.build")
        with _load_lock:
            _messages.clear()
            obj = lib.bpf_object__open_file(os.fsencode(path), None)
            if not obj:
                code = ctypes.get_errno() or errno_codes.EINVAL
                raise BpfUnavailable(
                    f"cannot open BPF object {path}: {_describe(code)}{_last_message()}",
                    list(_messages),
                )
            try:
                for map_name, pin_path in (pin_maps or {}).items():
                    bpf_map = lib.bpf_object__find_map_by_name(obj, map_name.encode())
                    if not bpf_map:
                        raise BpfUnavailable(f"{path.name} has no map {map_name!r} to pin")
                    rc = lib.bpf_map__set_pin_path(bpf_map, os.fsencode(pin_path))
                    if rc < 0:
                        raise BpfUnavailable(
                            f"cannot pin map {map_name!r} at {pin_path}: {_describe(_errno_of(rc))}"
                        )
                rc = lib.bpf_object__load(obj)
                if rc < 0:
                    raise BpfUnavailable(
                        _load_failure(path, _errno_of(rc)) + _last_message(), list(_messages)
                    )
            except BaseException:
                lib.bpf_object__close(obj)
                raise
        return cls(obj, path)

    @property
    def _pointer(self) -> int:
        if self._obj is None:
            raise ValueError(f"BPF object {self.path.name} is closed")
        return self._obj

    def program_names(self) -> list[str]:
        lib = libbpf()
        names = []
        prog = lib.bpf_object__next_program(self._pointer, None)
        while prog:
            names.append(lib.bpf_program__name(prog).decode())
            prog = lib.bpf_object__next_program(self._pointer, prog)
        return names

    def map_names(self) -> list[str]:
        lib = libbpf()
        names = []
        bpf_map = lib.bpf_object__next_map(self._pointer, None)
        while bpf_map:
            names.append(lib.bpf_map__name(bpf_map).decode())
            bpf_map = lib.bpf_object__next_map(self._pointer, bpf_map)
        return names

    def _program(self, name: str) -> int:
        prog = libbpf().bpf_object__find_program_by_name(self._pointer, name.encode())
        if not prog:
            raise KeyError(f"{self.path.name} has no program {name!r} ({self.program_names()})")
        return int(prog)

    def program_fd(self, name: str) -> int:
        """The program's fd (owned by this object: valid until `close()`)."""
        fd = int(libbpf().bpf_program__fd(self._program(name)))
        if fd < 0:
            raise ValueError(f"program {name!r} of {self.path.name} is not loaded")
        return fd

    def map(self, name: str) -> BpfMap:
        """The map as a `BpfMap` with its own fd (a dup), so it may outlive this object."""
        bpf_map = libbpf().bpf_object__find_map_by_name(self._pointer, name.encode())
        if not bpf_map:
            raise KeyError(f"{self.path.name} has no map {name!r} ({self.map_names()})")
        fd = int(libbpf().bpf_map__fd(bpf_map))
        if fd < 0:
            raise ValueError(f"map {name!r} of {self.path.name} is not loaded")
        return BpfMap(os.dup(fd), name=name)

    def attach(self, name: str) -> BpfLink:
        """Attach the program where its section says (tp_btf/..., fentry/...)."""
        lib = libbpf()
        with _load_lock:
            _messages.clear()
            link = lib.bpf_program__attach(self._program(name))
            if not link:
                code = ctypes.get_errno() or errno_codes.EINVAL
                raise BpfUnavailable(
                    f"cannot attach {name!r} of {self.path.name}: {_describe(code)}"
                    f"{_last_message()}",
                    list(_messages),
                )
        return BpfLink(int(link), name)

    def close(self) -> None:
        """Free the object: its program and map fds close (pinned maps and attached
        filters or links that hold a reference stay alive in the kernel)."""
        if self._obj is not None:
            libbpf().bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _last_message() -> str:
    """The most telling libbpf line of the failed step, for the one-line error."""
    lines = [line.strip() for line in _messages if line.strip()]
    if not lines:
        return ""
    for line in reversed(lines):
        if "failed" in line or "error" in line.lower():
            return f"; libbpf: {line}"
    return f"; libbpf: {lines[-1]}"


def _load_failure(path: Path, code: int) -> str:
    if code in (errno_codes.EPERM, errno_codes.EACCES) and os.geteuid() != 0:
        return f"cannot load {path.name}: {_describe(code)}; run as root (needs CAP_BPF)"
    if code == errno_codes.EPERM:
        return f"cannot load {path.name}: {_describe(code)}; needs CAP_BPF/CAP_SYS_ADMIN"
    return (
        f"the kernel refused {path.name}: {_describe(code)}; the kernel may lack a helper or "
        "BTF (/sys/kernel/btf/vmlinux), or the object is stale (python3 -m ebpf.build)"
    )
