"""The resctrl filesystem (/sys/fs/resctrl): probe, our control groups, tasks, monitoring.

Every path is under a configurable root and every change goes through `HostWriter`, so
the same code runs on a host, against tests/isolation/fake_resctrl.py, and in dry-run.
Only directories named `Resctrl.PREFIX + class` are ours; anything else under resctrl
belongs to someone else and is never touched.
"""

from __future__ import annotations

import errno as errno_codes
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from isolation import inflight
from isolation.errors import HostError
from isolation.rdt.model import (
    CacheInfo,
    MbInfo,
    MonInfo,
    RdtClassConfig,
    RdtInfo,
    RdtUnavailable,
    check_token,
)
from isolation.rdt.schemata import (
    Schemata,
    differing,
    format_schemata,
    parse_schemata,
    schemata_for,
)
from isolation.writes import HostWriter
from isolation.writes import read_file as _read

log = logging.getLogger("nri_qos.host.rdt")

_HOST_ROOT = Path("/")
MOUNT_POINT = "sys/fs/resctrl"
MON_EVENTS = ("llc_occupancy", "mbm_total_bytes", "mbm_local_bytes")


@dataclass(frozen=True)
class MonSample:
    """Counters of one group, summed over the L3 domains that could report them (None
    when no domain could: the event is not supported, or every domain said
    "Unavailable"/"Unassigned")."""

    llc_occupancy: int | None
    mbm_total_bytes: int | None
    mbm_local_bytes: int | None


def _mount_options(root: Path, mount: str) -> set[str] | None:
    """Options of the resctrl mount at `mount` in root/proc/mounts; None when not listed
    (or when there is no mounts table, as in a bare test root)."""
    try:
        text = _read(root / "proc/mounts")
    except HostError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "resctrl" and fields[1] == mount:
            return set(fields[3].split(","))
    return None


class Resctrl:
    PREFIX = "nri-qos-"

    def __init__(
        self,
        root: Path = _HOST_ROOT,
        writer: HostWriter | None = None,
        mount_point: str = MOUNT_POINT,
    ) -> None:
        """`mount_point`: where resctrl is mounted, relative to `root` (the kernel's
        convention is sys/fs/resctrl; `[rdt] mount` changes it)."""
        self.root = root
        self.mount_point = mount_point.strip("/")
        self.mount = root / self.mount_point
        self.writer = writer if writer is not None else HostWriter()

    # ------------------------------------------------------------------ probe

    def probe(self) -> RdtInfo:
        """What this host's resctrl offers; RdtUnavailable when it cannot isolate anything."""
        info_dir = self.mount / "info"
        if not info_dir.is_dir():
            if not self.mount.is_dir():
                raise RdtUnavailable(
                    f"no resctrl: {self.mount} does not exist (kernel without "
                    "CONFIG_X86_CPU_RESCTRL, or a CPU without RDT)"
                )
            raise RdtUnavailable(
                f"no resctrl: {self.mount} is not mounted (kernel without "
                "CONFIG_X86_CPU_RESCTRL, or run `mount -t resctrl resctrl /sys/fs/resctrl`)"
            )
        options = _mount_options(self.root, "/" + self.mount_point) or set()
        try:
            root_schemata = self._root_schemata()
            cdp = (info_dir / "L3CODE").is_dir()
            l3 = self._probe_l3(info_dir / ("L3CODE" if cdp else "L3"), root_schemata, cdp)
            mb = self._probe_mb(info_dir / "MB", root_schemata, "mba_MBps" in options)
            mon = self._probe_mon(info_dir / "L3_MON")
        except (HostError, ValueError) as exc:
            raise RdtUnavailable(f"no usable resctrl: cannot read {info_dir}: {exc}") from exc
        if l3 is None and mb is None:
            raise RdtUnavailable(
                f"no resctrl allocation: {info_dir} has neither L3 nor MB (cache and memory "
                "bandwidth allocation are off in firmware or the kernel, e.g. rdt=!l3cat)"
            )
        return RdtInfo(l3=l3, mb=mb, mon=mon, cdp=cdp)

    def _root_schemata(self) -> Schemata:
        path = self.mount / "schemata"
        return parse_schemata(_read(path)) if path.exists() else {}

    @staticmethod
    def _int(directory: Path, name: str, base: int = 10) -> int:
        return int(_read(directory / name).strip(), base)

    def _probe_l3(self, d: Path, schemata: Schemata, cdp: bool) -> CacheInfo | None:
        if not d.is_dir():
            return None
        sparse = (d / "sparse_masks").exists() and self._int(d, "sparse_masks") == 1
        return CacheInfo(
            num_closids=self._int(d, "num_closids"),
            cbm_mask=self._int(d, "cbm_mask", 16),
            min_cbm_bits=self._int(d, "min_cbm_bits"),
            shareable_bits=self._int(d, "shareable_bits", 16),
            domains=tuple(sorted(schemata.get("L3CODE" if cdp else "L3", {}))),
            sparse_masks=sparse,
        )

    def _probe_mb(self, d: Path, schemata: Schemata, mbps: bool) -> MbInfo | None:
        if not d.is_dir():
            return None
        return MbInfo(
            num_closids=self._int(d, "num_closids"),
            min_bandwidth=self._int(d, "min_bandwidth"),
            bandwidth_gran=self._int(d, "bandwidth_gran"),
            delay_linear=self._int(d, "delay_linear") == 1,
            mbps=mbps,
            domains=tuple(sorted(schemata.get("MB", {}))),
        )

    def _probe_mon(self, d: Path) -> MonInfo | None:
        if not d.is_dir():
            return None
        features = frozenset(_read(d / "mon_features").split())
        return MonInfo(num_rmids=self._int(d, "num_rmids"), features=features)

    # ------------------------------------------------------------------ groups

    def group_name(self, cls: str) -> str:
        """The control group (and the clos_id handed to the runtime) of a class."""
        return self.PREFIX + check_token(cls, "RDT class")

    def _group(self, cls: str) -> Path:
        return self.mount / self.group_name(cls)

    def _mon(self, cls: str, name: str) -> Path:
        return self._group(cls) / "mon_groups" / check_token(name, "monitoring group")

    def _last_cmd_status(self) -> str:
        """What the kernel said about the last command ("" for "ok": nothing to add)."""
        text = _read(self.mount / "info/last_cmd_status").strip()
        return "" if text == "ok" else text

    def _num_rmids(self) -> int | None:
        try:
            return self._int(self.mount / "info/L3_MON", "num_rmids")
        except (HostError, ValueError):
            return None

    def ensure_class(self, cls: str, config: RdtClassConfig, info: RdtInfo) -> str:
        """Create the class's control group if missing and bring its schemata to what
        `config` asks (only resources the host has). No write when the read-back already
        matches. Returns a one-line outcome; raises HostError (ENOSPC: out of CLOSIDs or
        RMIDs; EINVAL: with the kernel's info/last_cmd_status) or ValueError (config)."""
        name = self.group_name(cls)
        wanted = schemata_for(info, config)  # ValueError before touching the host
        path = self.mount / name
        created = False
        if not path.is_dir():
            try:
                created = self.writer.mkdir(path, f"RDT class {cls}", detail=self._last_cmd_status)
            except HostError as exc:
                raise self._mkdir_error(exc, info) from exc
        current = parse_schemata(_read(path / "schemata")) if path.is_dir() else {}
        change = differing(current, wanted)
        verb = ("would create" if self.writer.dry_run else "created") if created else "exists"
        if not change:
            return f"{name}: {verb}, schemata already {_oneline(wanted)}"
        self.writer.write(
            path / "schemata",
            format_schemata(change),
            f"RDT class {cls}",
            detail=self._last_cmd_status,
        )
        note = ""
        if info.mb is not None and info.mb.mbps and config.mb_mbps is None and config.mb_percent:
            note = " (MB unlimited: mounted with mba_MBps and no mb_mbps given)"
        if not self.writer.dry_run:
            after = parse_schemata(_read(path / "schemata"))
            left = differing(after, wanted)
            if left:
                return f"{name}: {verb}, wrote {_oneline(change)} but reads back {_oneline(after)}"
        done = "would set" if self.writer.dry_run else "set"
        return f"{name}: {verb}, {done} {_oneline(change)}{note}"

    def _mkdir_error(self, exc: HostError, info: RdtInfo) -> HostError:
        if exc.errno != errno_codes.ENOSPC:
            return exc
        try:
            said = self._last_cmd_status()
        except HostError:
            said = ""
        if "rmid" in said.lower():
            what = f"out of RMIDs (num_rmids={info.mon.num_rmids if info.mon else '?'})"
        else:
            what = f"out of CLOSIDs (num_closids={info.num_closids})"
        return HostError(
            exc.path,
            exc.errno,
            f"cannot create RDT group {exc.path}: {what}; remove unused groups or use fewer "
            "RDT classes",
        )

    def remove_unused(self, keep: Iterable[str]) -> list[str]:
        """Remove our control groups (PREFIX*) whose class is not in `keep` (their tasks
        go back to the root group); foreign groups are left alone. Returns the removed
        group names."""
        keep = set(keep)
        removed: list[str] = []
        inflight.touching(self.mount)
        try:
            entries = sorted(os.listdir(self.mount))
        except OSError as exc:
            code = exc.errno or errno_codes.EIO
            raise HostError(self.mount, code, f"cannot list {self.mount}") from exc
        for entry in entries:
            if not entry.startswith(self.PREFIX) or not (self.mount / entry).is_dir():
                continue
            if entry[len(self.PREFIX) :] in keep:
                continue
            if self.writer.rmdir(self.mount / entry, "RDT class no longer configured"):
                removed.append(entry)
        return removed

    # ------------------------------------------------------------------ tasks

    def assign_tasks(
        self, cls: str, pids: Iterable[int], reason: str, *, mon: str | None = None
    ) -> int:
        """Move each pid into the class group (one write per pid; also into the class's
        monitoring group `mon`, if given). A pid that is gone (ESRCH) is skipped. Returns
        how many were placed (in dry-run: how many would be)."""
        group = self._group(cls)
        targets = [group / "tasks"]
        if mon is not None:
            targets.append(self._mon(cls, mon) / "tasks")
        placed = 0
        for pid in pids:
            if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
                # 0 would mean "the writing task": the agent itself
                raise ValueError(f"pid {pid!r} is not a positive process id")
            try:
                for target in targets:
                    self.writer.write(target, str(pid), reason, detail=self._last_cmd_status)
            except HostError as exc:
                if exc.errno == errno_codes.ESRCH:
                    log.debug("pid %d exited before it could join %s", pid, group.name)
                    continue
                raise
            placed += 1
        return placed

    def tasks_of(self, cls: str, *, mon: str | None = None) -> frozenset[int]:
        group = self._group(cls) if mon is None else self._mon(cls, mon)
        return frozenset(int(t) for t in _read(group / "tasks").split())

    # ------------------------------------------------------------------ monitoring

    def ensure_mon_group(self, cls: str, name: str, reason: str) -> bool:
        """Create mon_groups/<name> under the class group; False when it existed. ENOSPC
        becomes "out of RMIDs"."""
        path = self._mon(cls, name)
        if path.is_dir():
            return False
        try:
            return self.writer.mkdir(path, reason, detail=self._last_cmd_status)
        except HostError as exc:
            if exc.errno != errno_codes.ENOSPC:
                raise
            rmids = self._num_rmids()
            raise HostError(
                path,
                exc.errno,
                f"cannot create monitoring group {name}: out of RMIDs "
                f"(num_rmids={rmids if rmids is not None else '?'})",
            ) from exc

    def remove_mon_group(self, cls: str, name: str, reason: str) -> bool:
        """Remove mon_groups/<name> (its tasks stay in the class group); False when gone."""
        return self.writer.rmdir(self._mon(cls, name), reason)

    def mon_groups(self, cls: str) -> list[str]:
        path = self._group(cls) / "mon_groups"
        inflight.touching(path)
        try:
            return sorted(e for e in os.listdir(path) if (path / e).is_dir())
        except OSError as exc:
            code = exc.errno or errno_codes.EIO
            raise HostError(path, code, f"cannot list {path}: {os.strerror(code)}") from exc

    def read_monitoring(self, cls: str, name: str | None = None) -> MonSample:
        """The class group's counters (which the kernel sums over its monitoring groups
        too), or one monitoring group's."""
        base = self._group(cls) if name is None else self._mon(cls, name)
        mon_data = base / "mon_data"
        inflight.touching(mon_data)
        try:
            domains = sorted(e for e in os.listdir(mon_data) if e.startswith("mon_L3_"))
        except OSError as exc:
            code = exc.errno or errno_codes.EIO
            raise HostError(mon_data, code, f"cannot list {mon_data}") from exc
        totals: dict[str, int | None] = dict.fromkeys(MON_EVENTS)
        for domain in domains:
            for event in MON_EVENTS:
                path = mon_data / domain / event
                if not path.exists():
                    continue
                text = _read(path).strip()
                if text.isdigit():  # else "Unavailable", "Unassigned", "Error"
                    totals[event] = (totals[event] or 0) + int(text)
        return MonSample(
            llc_occupancy=totals["llc_occupancy"],
            mbm_total_bytes=totals["mbm_total_bytes"],
            mbm_local_bytes=totals["mbm_local_bytes"],
        )

    def read_schemata(self, cls: str) -> Schemata:
        return parse_schemata(_read(self._group(cls) / "schemata"))


def _oneline(lines: Schemata) -> str:
    return format_schemata(lines).strip().replace("\n", " ") or "(nothing)"
