"""The kernel's resctrl filesystem with its semantics, in pyfakefs.

This CI host has no resctrl (CONFIG_X86_CPU_RESCTRL is not set), so isolation.rdt runs
against `FakeResctrl`: a pyfakefs tree at the production path (/sys/fs/resctrl, plus the
resctrl line of /proc/mounts) laid out as Documentation/arch/x86/resctrl.rst describes,
whose writes, mkdir and rmdir behave like the kernel's (fs/resctrl/rdtgroup.c and
ctrlmondata.c, paraphrased, not copied):

- mkdir at the top takes a CLOSID (and an RMID with monitoring), under mon_groups an
  RMID; ENOSPC with "Out of CLOSIDs"/"Out of RMIDs" in info/last_cmd_status when none is
  left; mkdir anywhere else is EPERM. rmdir frees them and hands the tasks to the parent.
- New groups start with the default schemata (all ways, 100 % or the MBps maximum).
- A schemata write needs a trailing newline, is parsed line by line, may name only some
  domains, and is applied only if every line is valid; otherwise EINVAL and
  info/last_cmd_status says why in the kernel's words (an unknown domain id is EINVAL
  with no text, as in the kernel). MB percentages are rounded up to bandwidth_gran.
- Reads render the kernel's format: names right-aligned to the longest, masks
  zero-padded and MB values space-padded to a common width, every domain listed.
- A task is in exactly one control group (and at most one of its monitoring groups);
  writing a pid moves it, a missing pid is ESRCH ("No task N").
- mon_data counters are settable (`set_counter`), including "Unavailable"; a control
  group's counters are the sum over its own RMID and its monitoring groups'.

Not modelled: exclusive/pseudo-locked modes, RMID limbo (EBUSY), L2, SNC, cpus writes.
Used by tests/isolation/test_rdt*.py (test_rdt_fake.py guards the fake itself).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from pyfakefs.fake_file import FakeFile
from pyfakefs.fake_filesystem import FakeFilesystem

ROOT_TEXT = "/sys/fs/resctrl"
MBPS_MAX = 0xFFFFFFFF  # MBA_MAX_MBPS: the software controller's "no limit"
EVENTS = ("llc_occupancy", "mbm_total_bytes", "mbm_local_bytes")
RESERVED = ("info", "mon_groups", "mon_data")

MOUNTS = """\
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
/dev/vda1 / ext4 rw,relatime,errors=remount-ro 0 0
"""


def rc(*parts: str) -> Path:
    """A path under the resctrl root, made at run time (see fake_cgroup2.cg for why)."""
    path = Path(ROOT_TEXT)
    for part in parts:
        path /= part.lstrip("/")
    return path


def _const(text: str) -> Callable[[], str]:
    return lambda: text


def _oserror(code: int, path: object) -> OSError:
    return OSError(code, os.strerror(code), str(path))


@dataclass
class _Schema:
    name: str  # "L3", "L3CODE", "L3DATA", "MB"
    cache: bool
    num_closid: int


@dataclass
class _Mon:
    rmid: int


@dataclass
class _Ctrl:
    closid: int
    rmid: int | None
    values: dict[str, dict[int, int]] = field(default_factory=dict)
    mons: dict[str, _Mon] = field(default_factory=dict)


class FakeResctrl:
    """A mounted resctrl with kernel semantics for the files the agent touches."""

    def __init__(
        self,
        fs: FakeFilesystem,
        *,
        l3_domains: tuple[int, ...] = (0,),
        cbm_mask: int = 0xFFFFF,
        min_cbm_bits: int = 1,
        shareable_bits: int = 0,
        num_closids: int = 16,
        num_rmids: int = 64,
        mb: bool = True,
        mba_mbps: bool = False,
        cdp: bool = False,
        mon: bool = True,
        sparse_masks: bool = False,
        l3: bool = True,
        min_bandwidth: int = 10,
        bandwidth_gran: int = 10,
        mb_num_closids: int | None = None,
        mounted: bool = True,
        cpus: int = 8,
        l3_bytes: int = 30 << 20,
    ) -> None:
        self.fs = fs
        self.domains = tuple(sorted(l3_domains))
        self.cbm_mask = cbm_mask
        self.cbm_len = cbm_mask.bit_length()
        self.min_cbm_bits = min_cbm_bits
        self.shareable_bits = shareable_bits
        self.sparse_masks = sparse_masks
        self.min_bandwidth = min_bandwidth
        self.bandwidth_gran = bandwidth_gran
        self.mba_mbps = mba_mbps
        self.mon = mon
        self.num_rmids = num_rmids
        self.cpus = cpus
        self.l3_bytes = l3_bytes
        self.schemas: list[_Schema] = []
        if l3:
            names = ("L3CODE", "L3DATA") if cdp else ("L3",)
            per = num_closids // 2 if cdp else num_closids
            self.schemas += [_Schema(n, True, per) for n in names]
        if mb:
            self.schemas.append(_Schema("MB", False, mb_num_closids or num_closids))
        self.last_cmd = ""  # "" reads as "ok"
        self.groups: dict[str, _Ctrl] = {}
        self.tasks: dict[int, tuple[str, str | None]] = {}  # pid -> (ctrl, mon)
        self.counters: dict[tuple[int, int, str], int | str] = {}
        self._files: dict[str, tuple[FakeFile, Callable[[], str]]] = {}
        self._next_pid = 1000
        options = ["rw", "relatime"] + (["cdp"] if cdp else []) + (["mba_MBps"] if mba_mbps else [])
        mounts = MOUNTS + (
            f"resctrl {ROOT_TEXT} resctrl {','.join(options)} 0 0\n" if mounted else ""
        )
        if fs.exists("/proc/mounts"):
            fs.get_object("/proc/mounts").set_contents(
                (fs.get_object("/proc/mounts").contents or "") + mounts
            )
        else:
            fs.create_file("/proc/mounts", contents=mounts)
        fs.create_dir(ROOT_TEXT)
        if not mounted:  # the kernel has resctrl, nobody mounted it: an empty directory
            return
        self._original_makedir = fs.makedir
        self._original_rmdir = fs.rmdir
        fs.makedir = self._makedir  # type: ignore[method-assign]
        fs.rmdir = self._rmdir  # type: ignore[method-assign]
        self._make_info()
        self.groups[""] = _Ctrl(closid=0, rmid=0 if mon else None, values=self._defaults())
        self._make_group_files("")
        self.self_pid = self.spawn()  # the process that writes (pid 0 in tasks means it)

    # ------------------------------------------------------------------ layout

    @property
    def closids_supported(self) -> int:
        return min((s.num_closid for s in self.schemas), default=1)

    def _defaults(self) -> dict[str, dict[int, int]]:
        full = {True: self.cbm_mask, False: MBPS_MAX if self.mba_mbps else 100}
        return {s.name: dict.fromkeys(self.domains, full[s.cache]) for s in self.schemas}

    def _file(
        self,
        path: str,
        render: Callable[[], str],
        write: Callable[[str, str], None] | None = None,
    ) -> None:
        def on_write(fake: FakeFile) -> None:
            raw = fake.contents or ""
            if raw == "":  # the O_TRUNC at open; the value comes with write(2)
                return
            try:
                if write is None:  # a 0444 kernfs file: no write operation
                    raise _oserror(errno.EACCES, path)
                write(raw, path)
            finally:
                self._render_all()  # read-back is always the kernel's view

        fake = self.fs.create_file(path, contents=render(), side_effect=on_write)
        self._files[path] = (fake, render)

    def _make_info(self) -> None:
        info = f"{ROOT_TEXT}/info"
        self._file(f"{info}/last_cmd_status", lambda: (self.last_cmd or "ok") + "\n")
        for s in self.schemas:
            d = f"{info}/{s.name}"
            if s.cache:
                static = {
                    "num_closids": f"{s.num_closid}",
                    "cbm_mask": f"{self.cbm_mask:x}",
                    "min_cbm_bits": f"{self.min_cbm_bits}",
                    "shareable_bits": f"{self.shareable_bits:x}",
                    "sparse_masks": f"{int(self.sparse_masks)}",
                }
                self._file(f"{d}/bit_usage", partial(self._bit_usage, s.name))
            else:
                static = {
                    "num_closids": f"{s.num_closid}",
                    "min_bandwidth": f"{self.min_bandwidth}",
                    "bandwidth_gran": f"{self.bandwidth_gran}",
                    "delay_linear": "1",
                    "thread_throttle_mode": "max",
                }
            for name, text in static.items():
                self._file(f"{d}/{name}", _const(text + "\n"))
        if self.mon:
            d = f"{info}/L3_MON"
            for name, text in {
                "num_rmids": f"{self.num_rmids}",
                "mon_features": "\n".join(EVENTS),
                "max_threshold_occupancy": "1048576",
            }.items():
                self._file(f"{d}/{name}", _const(text + "\n"))

    def _dir_of(self, ctrl: str, mon: str | None = None) -> str:
        base = f"{ROOT_TEXT}/{ctrl}" if ctrl else ROOT_TEXT
        return f"{base}/mon_groups/{mon}" if mon is not None else base

    def _make_group_files(self, ctrl: str, mon: str | None = None) -> None:
        d = self._dir_of(ctrl, mon)
        self._file(f"{d}/tasks", lambda: self._tasks_text(ctrl, mon), self._tasks_writer(ctrl, mon))
        root = ctrl == "" and mon is None
        self._file(f"{d}/cpus", lambda: self._cpus(root, hex_mask=True), self._refuse_cpus)
        self._file(f"{d}/cpus_list", lambda: self._cpus(root, hex_mask=False), self._refuse_cpus)
        if mon is None and self.schemas:
            self._file(
                f"{d}/schemata", lambda: self._schemata_text(ctrl), self._schemata_writer(ctrl)
            )
            self._file(f"{d}/size", lambda: self._size_text(ctrl))
            self._file(f"{d}/mode", lambda: "shareable\n")
        if self.mon:
            if mon is None:
                self.fs.create_dir(f"{d}/mon_groups")
            for dom in self.domains:
                for event in EVENTS:
                    self._file(
                        f"{d}/mon_data/mon_L3_{dom:02d}/{event}",
                        partial(self._counter_text, ctrl, mon, dom, event),
                    )

    def _render_all(self) -> None:
        for fake, render in self._files.values():
            text = render()
            if fake.contents != text:
                fake.set_initial_contents(text)

    # ------------------------------------------------------------------ rendering

    def _data_width(self) -> int:
        widths = [(self.cbm_len + 3) // 4 if s.cache else 3 for s in self.schemas]
        return max(widths, default=3)

    def _schemata_text(self, ctrl: str) -> str:
        group = self.groups[ctrl]
        name_width = max(len(s.name) for s in self.schemas)
        width = self._data_width()
        lines = []
        for s in self.schemas:
            if group.closid >= s.num_closid:
                continue
            values = group.values[s.name]
            if s.cache:
                cells = [f"{d}={values[d]:0{width}x}" for d in self.domains]
            else:
                cells = [f"{d}={values[d]:>{width}}" for d in self.domains]
            lines.append(f"{s.name:>{name_width}}:" + ";".join(cells) + "\n")
        return "".join(lines)

    def _size_text(self, ctrl: str) -> str:
        group = self.groups[ctrl]
        name_width = max(len(s.name) for s in self.schemas)
        lines = []
        for s in self.schemas:
            values = group.values[s.name]
            if s.cache:
                sizes = [
                    values[d].bit_count() * self.l3_bytes // self.cbm_len for d in self.domains
                ]
            else:
                sizes = [values[d] for d in self.domains]
            cells = ";".join(f"{d}={v}" for d, v in zip(self.domains, sizes, strict=True))
            lines.append(f"{s.name:>{name_width}}:{cells}\n")
        return "".join(lines)

    def _bit_usage(self, schema: str) -> str:
        cells = []
        for d in self.domains:
            used = 0
            for group in self.groups.values():
                used |= group.values[schema][d]
            marks = []
            for bit in reversed(range(self.cbm_len)):
                hw, sw = self.shareable_bits >> bit & 1, used >> bit & 1
                marks.append("X" if hw and sw else "H" if hw else "S" if sw else "0")
            cells.append(f"{d}=" + "".join(marks))
        return ";".join(cells) + "\n"

    def _tasks_text(self, ctrl: str, mon: str | None) -> str:
        pids = sorted(
            pid for pid, (c, m) in self.tasks.items() if c == ctrl and (mon is None or m == mon)
        )
        return "".join(f"{pid}\n" for pid in pids)

    def _cpus(self, root: bool, *, hex_mask: bool) -> str:
        if hex_mask:
            mask = (1 << self.cpus) - 1 if root else 0
            return f"{mask:0{max((self.cpus + 3) // 4, 1)}x}\n"
        return (f"0-{self.cpus - 1}" if root else "") + "\n"

    def _counter_text(self, ctrl: str, mon: str | None, dom: int, event: str) -> str:
        group = self.groups[ctrl]
        if mon is not None:
            rmids = [group.mons[mon].rmid]
        else:  # a CTRL_MON group counts for its monitoring groups too
            rmids = [
                r for r in [group.rmid, *(m.rmid for m in group.mons.values())] if r is not None
            ]
        values = [self.counters.get((r, dom, event), 0) for r in rmids]
        numbers = [v for v in values if isinstance(v, int)]
        if numbers:
            return f"{sum(numbers)}\n"
        return f"{values[0]}\n"

    # ------------------------------------------------------------------ writes

    def _fail(self, code: int, path: object, message: str = "") -> OSError:
        self.last_cmd = message
        return _oserror(code, path)

    def _refuse_cpus(self, raw: str, path: str) -> None:
        raise self._fail(errno.EINVAL, path, "FakeResctrl does not model cpus writes")

    def _tasks_writer(self, ctrl: str, mon: str | None) -> Callable[[str, str], None]:
        def write(raw: str, path: str) -> None:
            self.last_cmd = ""
            for token in raw.strip().split(","):
                try:
                    pid = int(token.strip(), 0)
                except ValueError:
                    raise self._fail(
                        errno.EINVAL, path, f"Task list parsing error pid {token.strip()}"
                    ) from None
                if pid < 0:
                    raise self._fail(errno.EINVAL, path, f"Task list parsing error pid {pid}")
                pid = pid or self.self_pid
                if pid not in self.tasks:
                    raise self._fail(errno.ESRCH, path, f"No task {pid}")
                if mon is not None and self.tasks[pid][0] != ctrl:
                    raise self._fail(
                        errno.EINVAL, path, "Can't move task to different control group"
                    )
                self.tasks[pid] = (ctrl, mon)

        return write

    def _schemata_writer(self, ctrl: str) -> Callable[[str, str], None]:
        def write(raw: str, path: str) -> None:
            if not raw.endswith("\n"):
                raise _oserror(errno.EINVAL, path)  # before the status is cleared
            self.last_cmd = ""
            group = self.groups[ctrl]
            staged: dict[str, dict[int, int]] = {}
            for line in raw[:-1].split("\n"):
                resname, colon, rest = line.partition(":")
                resname = resname.strip()
                if not colon:
                    raise self._fail(errno.EINVAL, path, "Missing ':'")
                if rest == "":
                    raise self._fail(errno.EINVAL, path, f"Missing '{resname}' value")
                schema = next(
                    (s for s in self.schemas if s.name == resname and group.closid < s.num_closid),
                    None,
                )
                if schema is None:
                    raise self._fail(
                        errno.EINVAL, path, f"Unknown or unsupported resource name '{resname}'"
                    )
                self._parse_line(schema, rest, staged.setdefault(schema.name, {}), path)
            for name, values in staged.items():
                group.values[name].update(values)

        return write

    def _parse_line(self, schema: _Schema, line: str, staged: dict[int, int], path: str) -> None:
        tokens = line.split(";")
        if tokens[-1] == "":  # "0=f;" ends the list; an empty token inside does not
            tokens.pop()
        for token in tokens:
            ident, eq, value = token.partition("=")
            if not eq or not ident.isdigit():
                raise self._fail(errno.EINVAL, path, "Missing '=' or non-numeric domain")
            dom = int(ident)
            if dom not in self.domains:
                raise _oserror(errno.EINVAL, path)  # the kernel says nothing here
            if dom in staged:
                raise self._fail(errno.EINVAL, path, f"Duplicate domain {dom}")
            value = value.strip()
            staged[dom] = self._cbm(value, path) if schema.cache else self._bw(value, path)

    def _cbm(self, text: str, path: str) -> int:
        digits = text[2:] if text.lower().startswith("0x") else text
        try:
            if not digits or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise ValueError(text)
            val = int(digits, 16)
        except ValueError:
            raise self._fail(errno.EINVAL, path, f"Non-hex character in the mask {text}") from None
        if (self.min_cbm_bits > 0 and val == 0) or val > self.cbm_mask:
            raise self._fail(errno.EINVAL, path, "Mask out of range")
        first = (val & -val).bit_length() - 1 if val else self.cbm_len
        zero = first
        while zero < self.cbm_len and val >> zero & 1:
            zero += 1
        if not self.sparse_masks and val >> zero:
            raise self._fail(errno.EINVAL, path, f"The mask {val:x} has non-consecutive 1-bits")
        if zero - first < self.min_cbm_bits:
            raise self._fail(
                errno.EINVAL, path, f"Need at least {self.min_cbm_bits} bits in the mask"
            )
        return val

    def _bw(self, text: str, path: str) -> int:
        if not text.isdigit() or int(text) > MBPS_MAX:
            raise self._fail(errno.EINVAL, path, f"Invalid MB value {text}")
        bw = int(text)
        if self.mba_mbps:  # the software controller takes any MBps
            return bw
        if not self.min_bandwidth <= bw <= 100:
            raise self._fail(
                errno.EINVAL, path, f"MB value {bw} out of range [{self.min_bandwidth},100]"
            )
        gran = self.bandwidth_gran
        return -(-bw // gran) * gran

    # ------------------------------------------------------------------ dirs

    @staticmethod
    def _parts(path: object) -> tuple[str, ...] | None:
        pure, root = PurePosixPath(os.fspath(path)), PurePosixPath(ROOT_TEXT)  # type: ignore[call-overload]
        if pure != root and root not in pure.parents:
            return None
        return pure.relative_to(root).parts

    def _alloc_rmid(self, path: object) -> int | None:
        if not self.mon:
            return None
        used = {g.rmid for g in self.groups.values()} | {
            m.rmid for g in self.groups.values() for m in g.mons.values()
        }
        free = [r for r in range(self.num_rmids) if r not in used]
        if not free:
            raise self._fail(errno.ENOSPC, path, "Out of RMIDs")
        return free[0]

    def _makedir(self, dir_path: Any, mode: int = 0o777) -> None:
        parts = self._parts(dir_path)
        if parts is None or self.fs.exists(dir_path):
            self._original_makedir(dir_path, mode)  # not ours, or EEXIST
            return
        self.last_cmd = ""
        try:
            self._make_group(parts, dir_path, mode)
        finally:
            self._render_all()  # info/last_cmd_status included

    def _make_group(self, parts: tuple[str, ...], dir_path: Any, mode: int) -> None:
        if len(parts) == 1:
            used = {g.closid for g in self.groups.values()}
            free = [c for c in range(self.closids_supported) if c not in used]
            if not free:
                raise self._fail(errno.ENOSPC, dir_path, "Out of CLOSIDs")
            rmid = self._alloc_rmid(dir_path)
            self._original_makedir(dir_path, mode)
            self.groups[parts[0]] = _Ctrl(closid=free[0], rmid=rmid, values=self._defaults())
            self._make_group_files(parts[0])
        elif self.mon and (
            (len(parts) == 2 and parts[0] == "mon_groups")
            or (len(parts) == 3 and parts[1] == "mon_groups" and parts[0] in self.groups)
        ):
            ctrl = "" if len(parts) == 2 else parts[0]
            rmid = self._alloc_rmid(dir_path)
            assert rmid is not None
            self._original_makedir(dir_path, mode)
            self.groups[ctrl].mons[parts[-1]] = _Mon(rmid)
            self._make_group_files(ctrl, parts[-1])
        else:
            raise _oserror(errno.EPERM, dir_path)

    def _rmdir(self, target_directory: Any, allow_symlink: bool = False) -> None:
        parts = self._parts(target_directory)
        if parts is None:
            self._original_rmdir(target_directory, allow_symlink)
            return
        if not self.fs.exists(target_directory):
            raise _oserror(errno.ENOENT, target_directory)
        if len(parts) == 1 and parts[0] in self.groups:
            ctrl, mon = parts[0], None
        elif (
            len(parts) == 2 and parts[0] == "mon_groups" and parts[1] in self.groups[""].mons
        ) or (
            len(parts) == 3
            and parts[1] == "mon_groups"
            and parts[0] in self.groups
            and parts[2] in self.groups[parts[0]].mons
        ):
            ctrl, mon = ("" if len(parts) == 2 else parts[0]), parts[-1]
        else:
            raise _oserror(errno.EPERM if parts else errno.EBUSY, target_directory)
        group = self.groups[ctrl]
        if mon is None:  # tasks of the group and of its monitoring groups go to the root
            freed = [group.rmid, *(m.rmid for m in group.mons.values())]
            self.tasks = {
                p: (("", None) if c == ctrl else (c, m)) for p, (c, m) in self.tasks.items()
            }
            del self.groups[ctrl]
        else:  # tasks stay in the control group
            freed = [group.mons.pop(mon).rmid]
            self.tasks = {
                p: ((c, None) if (c, m) == (ctrl, mon) else (c, m))
                for p, (c, m) in self.tasks.items()
            }
        self.counters = {k: v for k, v in self.counters.items() if k[0] not in freed}
        prefix = self._dir_of(ctrl, mon) + "/"
        for path in [p for p in self._files if p.startswith(prefix)]:
            del self._files[path]
        self.fs.remove_object(self._dir_of(ctrl, mon))
        self._render_all()

    # ------------------------------------------------------------------ test helpers

    def spawn(self) -> int:
        """A new process, born in the root group."""
        self._next_pid += 1
        self.tasks[self._next_pid] = ("", None)
        self._render_all()
        return self._next_pid

    def exit(self, pid: int) -> None:
        del self.tasks[pid]
        self._render_all()

    def group_of(self, pid: int) -> tuple[str, str | None]:
        """(control group name, monitoring group name or None); "" is the root group."""
        return self.tasks[pid]

    def set_counter(
        self,
        group: str,
        event: str,
        value: int | str,
        *,
        domain: int = 0,
        mon: str | None = None,
    ) -> None:
        """Set a counter of a group's own RMID (`value` may be "Unavailable")."""
        ctrl = self.groups[group]
        rmid = ctrl.mons[mon].rmid if mon is not None else ctrl.rmid
        assert rmid is not None and event in EVENTS and domain in self.domains
        self.counters[(rmid, domain, event)] = value
        self._render_all()

    @property
    def last_cmd_status(self) -> str:
        return self.last_cmd or "ok"

    def closids_in_use(self) -> set[int]:
        return {g.closid for g in self.groups.values()}

    def rmids_in_use(self) -> set[int]:
        return {g.rmid for g in self.groups.values() if g.rmid is not None} | {
            m.rmid for g in self.groups.values() for m in g.mons.values()
        }
