"""What `nri-qos lab` reads back for RDT, I/O and network, and the stand-in resctrl it
uses on hosts that have none.

A host without resctrl (this CI machine: no CONFIG_X86_CPU_RESCTRL) still shows the whole
RDT path: the lab lays out a directory like a mounted resctrl (info/, the root group,
one group per class as the agent makes them) and points both sides at it — the plugin
with `[rdt] mount`, the embedded runtime like runc's intelRdt. A plain directory cannot
do what the kernel does on mkdir (populate the group's files), so the class groups are
laid out in advance and per-container monitoring groups are off; every value read from
it is marked `"simulated": true`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import struct
import subprocess
import threading
from pathlib import Path
from typing import Any

from isolation.cgroups import CgroupError, CgroupFs
from isolation.errors import HostError
from isolation.netclass import (
    DEFAULT_CLASS,
    NetClassTree,
    cgroup2_id,
    default_classes,
    pin_dir_for,
)
from isolation.rdt import DEFAULT_CLASSES, Resctrl

POD_INTERFACE = "eth0"
LINK_MBIT = 1000

_INFO = {
    "last_cmd_status": "ok",
    "L3/num_closids": "16",
    "L3/cbm_mask": "fffff",
    "L3/min_cbm_bits": "1",
    "L3/shareable_bits": "0",
    "L3/bit_usage": "0=" + "X" * 20,
    "L3/sparse_masks": "0",
    "MB/num_closids": "8",
    "MB/min_bandwidth": "10",
    "MB/bandwidth_gran": "10",
    "MB/delay_linear": "1",
    "MB/thread_throttle_mode": "max",
    "L3_MON/num_rmids": "128",
    "L3_MON/mon_features": "llc_occupancy\nmbm_total_bytes\nmbm_local_bytes",
    "L3_MON/max_threshold_occupancy": "1048576",
}
_GROUP_FILES = {
    "tasks": "",
    "cpus": "ff",
    "cpus_list": "0-7",
    "mode": "shareable",
    "size": "L3:0=31457280\n    MB:0=100",
    "schemata": "    L3:0=fffff\n    MB:0=100",
}


def simulated_resctrl(directory: Path) -> Path:
    """A resctrl-shaped tree in `directory` (one L3 domain, MBA, monitoring), with the
    agent's class groups already made. Returns the mount point."""
    mount = directory / "resctrl"
    for name, text in _INFO.items():
        path = mount / "info" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    groups = [mount] + [mount / (Resctrl.PREFIX + cls) for cls in DEFAULT_CLASSES]
    for group in groups:
        (group / "mon_groups").mkdir(parents=True, exist_ok=True)
        (group / "mon_data" / "mon_L3_00").mkdir(parents=True, exist_ok=True)
        for name, text in _GROUP_FILES.items():
            (group / name).write_text(text + ("\n" if text else ""))
        for event in ("llc_occupancy", "mbm_total_bytes", "mbm_local_bytes"):
            (group / "mon_data" / "mon_L3_00" / event).write_text("0\n")
    return mount


class TaskMoves:
    """The stand-in tree's answer to "which group did this pid last join".

    In resctrl a write to a group's `tasks` moves the pid there and the file lists every
    member; a plain file keeps only what the last writer wrote (one pid per write, with
    O_TRUNC). So the lab watches the tree's `tasks` files with inotify and records each
    pid written as a move into that group — the kernel's semantics, kept on the side. A
    thread blocks on the inotify fd (and a pipe that ends it): no polling."""

    _IN_CLOSE_WRITE = 0x00000008

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.moves: dict[int, str] = {}
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self._watches: dict[int, str] = {}
        for group in sorted(mount.glob(Resctrl.PREFIX + "*")):
            wd = self._libc.inotify_add_watch(
                self._fd, os.fsencode(group / "tasks"), self._IN_CLOSE_WRITE
            )
            if wd >= 0:
                self._watches[wd] = group.name.removeprefix(Resctrl.PREFIX)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="lab-resctrl", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        header = struct.calcsize("iIII")
        while True:
            ready, _, _ = select.select([self._fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            data = os.read(self._fd, 4096)
            offset = 0
            while offset + header <= len(data):
                wd, _mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                offset += header + length
                cls = self._watches.get(wd)
                if cls is None:
                    continue
                with contextlib.suppress(OSError):
                    for token in (
                        (self.mount / (Resctrl.PREFIX + cls) / "tasks").read_text().split()
                    ):
                        if token.isdigit():
                            self.moves[int(token)] = cls

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")
        self._thread.join(timeout=2)
        for fd in (self._fd, self._stop_r, self._stop_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def rdt_class_of(
    mount: Path | None, pid: int | None, simulated: bool, moves: TaskMoves | None = None
) -> dict[str, Any]:
    """Which of our resctrl groups holds `pid` (None: the root group or unknown)."""
    value = None
    if moves is not None and pid:
        value = moves.moves.get(pid)
    elif mount is not None and pid:
        for group in sorted(mount.glob(Resctrl.PREFIX + "*")):
            try:
                tasks = (group / "tasks").read_text().split()
            except OSError:
                continue
            if str(pid) in tasks:
                value = group.name.removeprefix(Resctrl.PREFIX)
                break
    return {"value": value, "simulated": simulated, "source": str(mount or "none")}


def io_weight_of(blkio_group: Path | None) -> dict[str, Any]:
    """The container's disk weight as the kernel shows it: blkio.bfq.weight (v1)."""
    value = None
    source = "none"
    if blkio_group is not None:
        path = blkio_group / "blkio.bfq.weight"
        try:
            lines = path.read_text().splitlines()
            # "100" on v1; "default 100" then per-device lines where the kernel has them
            value = int(lines[0].split()[-1]) if lines else None
            source = str(path)
        except (OSError, ValueError, IndexError):
            pass
    return {"value": value, "simulated": False, "source": source}


class LabNetwork:
    """A network namespace the lab's pods share, with an `eth0` (one end of a veth pair,
    both ends inside it) for the plugin to shape, and a private bpffs for the classifier's
    pins. Everything is removed by `close`. `available` is False (with `why`) when the host
    cannot give it (not root, no netns): the lab then runs without network classes."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.path = f"/var/run/netns/{name}"
        self.pin_root = directory / "bpf"
        self.available = False
        self.why = ""
        self._mounted = False
        try:
            self._ip("netns", "add", name)
            self._ip("-n", name, "link", "add", POD_INTERFACE, "type", "veth", "peer", "name",
                     "eth0-peer")  # fmt: skip
            self._ip("-n", name, "link", "set", POD_INTERFACE, "up")
            self.pin_root.mkdir()
            subprocess.run(
                ["mount", "-t", "bpf", "bpf", str(self.pin_root)],
                check=True,
                capture_output=True,
            )
            self._mounted = True
            self.available = True
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            self.why = f"{exc} {detail.decode(errors='replace').strip()}".strip()
            self.close()

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    def config(self) -> str:
        """The plugin's [net] section for this namespace."""
        if not self.available:
            return ""
        return (
            "[net]\n"
            f'pod_interface = "{POD_INTERFACE}"\n'
            f"link_mbit = {LINK_MBIT}\n"
            f'pin_root = "{self.pin_root / "nri-qos"}"\n'
        )

    def net_class_of(self, cgroups_path: str, real: bool) -> dict[str, Any]:
        """The network class the plugin's classifier map gives the container's cgroup."""
        if not self.available or not real or not cgroups_path:
            return {"value": None, "simulated": False, "source": self.why or "none"}
        pin_dir = pin_dir_for(self.pin_root / "nri-qos", POD_INTERFACE, self.path)
        tree = NetClassTree(
            POD_INTERFACE,
            default_classes(LINK_MBIT * 10**6),
            default=DEFAULT_CLASS,
            netns=self.path,
            pin_dir=pin_dir,
        )
        try:
            cgroupfs = CgroupFs()
            unified = cgroupfs.unified_dir(cgroupfs.resolve(cgroups_path))
            if unified is None:
                return {"value": None, "simulated": False, "source": "no cgroup2 tree"}
            value = tree.classified().get(cgroup2_id(unified))
        except (HostError, CgroupError, OSError) as exc:
            return {"value": None, "simulated": False, "source": f"unreadable: {exc}"}
        finally:
            tree.close()
        return {"value": value, "simulated": False, "source": str(pin_dir)}

    def close(self) -> None:
        if self._mounted:
            with contextlib.suppress(OSError, subprocess.CalledProcessError):
                subprocess.run(["umount", str(self.pin_root)], check=True, capture_output=True)
            self._mounted = False
        with contextlib.suppress(OSError):
            self.pin_root.rmdir()
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            self._ip("netns", "del", self.name)
