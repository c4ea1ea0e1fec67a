"""Per-QoS-class network egress shaping: an HTB tree plus a cls_bpf classifier keyed by the
sending socket's cgroup.

Layout on one interface (``HANDLE`` = 0x7a51, distinctive so we recognise our own tree)::

    htb 7a51: root, default -> the default class
     └─ class 7a51:1   rate = ceil = the link
         ├─ class 7a51:10 "system"  (fq_codel leaf where the kernel has it)
         ├─ class 7a51:20 "online"
         └─ class 7a51:30 "batch"
    filter bpf (direct action) on 7a51: -> ebpf/netclass.bpf.c

The filter looks the socket's cgroup v2 id up in a pinned hash map (cgroup id -> classid)
that ``classify()`` fills, then falls back to a net_cls classid, then says "no opinion"
so HTB's default class gets the packet. It only sees the sender's cgroup inside the
sender's network namespace (host-capabilities.md, "Networking"): install the tree on the
container side of its veth (``netns=``), or on a host interface for host processes.

Why the pieces are as they are:

- Everything is netlink through pyroute2, in the target netns, never the ``tc`` CLI; every
  change goes through ``HostWriter.apply`` so a dry run records the plan and touches nothing.
- ``ensure()`` adopts an existing tree: it changes classes in place and keeps the filter
  and the pinned map, because replacing the root qdisc would drop queued packets and an
  agent restart must not reset the classification of running containers.
- The map is pinned in bpffs (``pin_dir``) for the same reason. We do not mount bpffs
  ourselves: that is a host-wide change systemd normally makes at /sys/fs/bpf; a missing
  mount is reported with the command that fixes it.
- Unclassified traffic (``DEFAULT_CLASS``) goes to "online", see there.
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import fcntl
import functools
import logging
import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from ebpf.libbpf import BpfMap, BpfObject, is_bpffs, program_id
from isolation.errors import HostError
from isolation.writes import HostChange, HostWriter

log = logging.getLogger("nri_qos.host.netclass")

T = TypeVar("T")

DEFAULT_CLASS = "online"
"""Where traffic we cannot attribute goes. Not "batch": unknown traffic is host daemons,
the kubelet, kernel traffic (ARP, ICMP), and containers whose classification failed or
has not happened yet. Throttling any of those to the batch ceiling can break health checks
and the control plane, which costs more than a stray batch flow competing inside the
online class. The agent demotes only what it has positively identified as batch."""

DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/nri-qos")
OBJECT_PATH = Path(__file__).resolve().parent.parent / "ebpf" / "objects" / "netclass.bpf.o"

PROGRAM = "netclass"
MAP_CLASSES = "cgroup_classes"
MAP_CONFIG = "netclass_config"
MAP_COUNTERS = "netclass_counters"
PINNED_MAPS = (MAP_CLASSES, MAP_CONFIG, MAP_COUNTERS)
FILTER_NAME = "nri-qos-netclass"  # TCA_BPF_NAME: how we recognise our filter
FILTER_PRIO = 1
FILTER_HANDLE = 1
ETH_P_ALL = 0x0003
TC_H_ROOT = 0xFFFFFFFF
PARENT_MINOR = 1
_CLONE_NEWNET = 0x40000000

_KEY = struct.Struct("=Q")  # cgroup id, as bpf_skb_cgroup_id returns it
_VALUE = struct.Struct("=I")  # classid major:minor

_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_RATE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z%]*)\s*$")


# --- pure parts --------------------------------------------------------------------------


@dataclass(frozen=True)
class NetClassSpec:
    """One HTB class: `rate_bps` is guaranteed, `ceil_bps` the most it may borrow up to;
    a lower `prio` is offered spare bandwidth first."""

    name: str
    minor: int
    rate_bps: int
    ceil_bps: int
    prio: int

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a net class needs a name")
        if not PARENT_MINOR < self.minor <= 0xFFFF:
            raise ValueError(f"class {self.name!r}: minor {self.minor:#x} not in 0x2..0xffff")
        if self.rate_bps <= 0 or self.ceil_bps < self.rate_bps:
            raise ValueError(
                f"class {self.name!r}: need 0 < rate <= ceil, got rate {self.rate_bps} "
                f"ceil {self.ceil_bps} bit/s"
            )
        if not 0 <= self.prio <= 7:
            raise ValueError(f"class {self.name!r}: HTB prio {self.prio} not in 0..7")


def default_classes(link_bps: int) -> list[NetClassSpec]:
    """system 40 %, online 30 %, batch 30 % of the link guaranteed; each may borrow up to
    the whole link, system first, then online, then batch (HTB prio 0/1/2)."""
    if link_bps <= 0:
        raise ValueError(f"link rate must be positive, got {link_bps} bit/s")
    return [
        NetClassSpec("system", 0x10, link_bps * 40 // 100, link_bps, 0),
        NetClassSpec("online", 0x20, link_bps * 30 // 100, link_bps, 1),
        NetClassSpec("batch", 0x30, link_bps * 30 // 100, link_bps, 2),
    ]


def parse_rate(text: str, link_bps: int) -> int:
    """A rate in bit/s from "30%" (of `link_bps`), "500kbit", "100mbit", "1gbit" or a
    plain number of bit/s. Units are decimal, as in tc. Byte units ("mbps") are refused:
    tc reads them as bytes, people often mean bits."""
    match = _RATE_RE.match(text.lower())
    if not match:
        raise ValueError(f"rate {text!r} is not a number with a unit (e.g. 100mbit, 30%)")
    number, unit = float(match.group(1)), match.group(2)
    if unit == "%":
        if link_bps <= 0:
            raise ValueError(f"rate {text!r} is a share of the link, but the link rate is unknown")
        if not 0 < number <= 100:
            raise ValueError(f"rate {text!r}: a share must be in (0, 100] %")
        bps = link_bps * number / 100
    elif unit in _RATE_UNITS or unit == "":
        bps = number * _RATE_UNITS.get(unit, 1)
    elif unit.endswith("bps"):
        raise ValueError(f"rate {text!r}: write bits (e.g. {match.group(1)}mbit), not bytes/s")
    else:
        raise ValueError(f"rate {text!r}: unknown unit {unit!r} (bit, kbit, mbit, gbit, %)")
    if bps < 1:
        raise ValueError(f"rate {text!r} is below 1 bit/s")
    return int(bps)


def cgroup2_id(path: Path) -> int:
    """The kernel's id of a cgroup2 directory: what bpf_skb_cgroup_id() returns for a
    socket created by a task in it (kernfs uses the id as inode number on 64-bit)."""
    if not (path / "cgroup.controllers").exists():
        raise HostError(path, errno_codes.ENOTDIR, f"{path} is not a cgroup2 directory")
    return os.stat(path).st_ino


def classid_text(classid: int) -> str:
    """tc's spelling of a classid: 0x7a510020 -> "7a51:20"."""
    return f"{classid >> 16:x}:{classid & 0xFFFF:x}"


def link_speed_bps(ifname: str, netns: str | None = None) -> int | None:
    """The link's speed in bit/s, None when the driver does not say (down, virtual, or
    unknown): /sys/class/net/<if>/speed on the host; in a netns, the same value through
    the ethtool ioctl on a socket made there (our sysfs shows the host's links)."""
    if netns is None:
        try:
            mbit = int((Path("/sys/class/net") / ifname / "speed").read_text().strip())
        except (OSError, ValueError):
            return None
    else:
        mbit_or_none = _ethtool_speed_mbit(ifname, netns)
        if mbit_or_none is None:
            return None
        mbit = mbit_or_none
    return mbit * 1_000_000 if mbit > 0 else None


def _ethtool_speed_mbit(ifname: str, netns: str) -> int | None:
    """ETHTOOL_GSET on a socket made in `netns` (whose interfaces the ioctl then sees)."""
    siocethtool, ethtool_gset = 0x8946, 0x00000001
    cmd = ctypes.create_string_buffer(struct.pack("=I", ethtool_gset) + bytes(40))
    request = bytearray(struct.pack("16sP", ifname.encode()[:15], ctypes.addressof(cmd)))
    request += bytes(40 - len(request))
    try:
        sock = socket_in_netns(netns, socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return None
    with sock:
        try:
            fcntl.ioctl(sock.fileno(), siocethtool, request)
        except OSError:
            return None
    speed_lo = struct.unpack_from("=H", cmd.raw, 12)[0]
    speed_hi = struct.unpack_from("=H", cmd.raw, 28)[0]
    speed = speed_hi << 16 | speed_lo
    return None if speed in (0, 0xFFFFFFFF) else speed


def socket_in_netns(netns: str, family: int, kind: int) -> socket.socket:
    """A socket that lives in `netns` (a name under /var/run/netns or a path). Made by a
    short-lived thread that enters the namespace (setns moves only the calling thread),
    so this process stays where it is and nothing is forked."""
    path = netns if "/" in netns else f"/var/run/netns/{netns}"
    made: list[socket.socket] = []
    failed: list[OSError] = []

    def enter_and_make() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, _CLONE_NEWNET) != 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"setns into {path}: {os.strerror(code)}")
            finally:
                os.close(fd)
            made.append(socket.socket(family, kind))
        except OSError as exc:
            failed.append(exc)

    thread = threading.Thread(target=enter_and_make, name=f"netns:{netns}")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]


@dataclass(frozen=True)
class ClassStats:
    """The kernel's counters and configured rates of one class (bit/s)."""

    name: str
    classid: str
    bytes: int
    packets: int
    rate_bps: int
    ceil_bps: int


@dataclass(frozen=True)
class _LiveClass:
    parent: int
    rate_bps: int
    ceil_bps: int
    prio: int
    bytes: int
    packets: int


@dataclass(frozen=True)
class _Live:
    """What is on the interface now."""

    root_kind: str | None
    root_handle: int
    default_minor: int
    classes: dict[int, _LiveClass]  # minor -> class (ours only, when the root is ours)
    leaves: set[int]  # classids that have a child qdisc we (or someone) added
    filter_present: bool


# --- the tree ----------------------------------------------------------------------------


class NetClassTree:
    """Our HTB tree and classifier on one interface (see the module docstring)."""

    HANDLE = 0x7A51

    def __init__(
        self,
        ifname: str,
        classes: Sequence[NetClassSpec],
        *,
        default: str,
        netns: str | None = None,
        writer: HostWriter | None = None,
        pin_dir: Path | None = None,
        object_path: Path | None = None,
    ) -> None:
        names = [spec.name for spec in classes]
        minors = [spec.minor for spec in classes]
        if not classes:
            raise ValueError("a net class tree needs at least one class")
        if len(set(names)) != len(names) or len(set(minors)) != len(minors):
            raise ValueError(f"class names and minors must be unique: {names} {minors}")
        if default not in names:
            raise ValueError(f"default class {default!r} is not one of {names}")
        self.link_bps = max(spec.ceil_bps for spec in classes)
        guaranteed = sum(spec.rate_bps for spec in classes)
        if guaranteed > self.link_bps:
            raise ValueError(
                f"the classes guarantee {guaranteed} bit/s, more than the link "
                f"({self.link_bps} bit/s, the largest ceil)"
            )
        self.ifname = ifname
        self.classes = list(classes)
        self.default = default
        self.netns = netns
        self.writer = writer or HostWriter()
        self.object_path = object_path or OBJECT_PATH
        label = _netns_label(netns)
        self.pin_dir = pin_dir or pin_dir_for(DEFAULT_PIN_ROOT, ifname, netns)
        self.where = f"{ifname}@{label}"
        self.program_id: int | None = None  # set when this instance loaded the program
        self._by_name = {spec.name: spec for spec in classes}
        self._ipr: Any = None
        self._index: int | None = None
        self._maps: dict[str, BpfMap] = {}

    # -- identities --

    def classid(self, minor: int) -> int:
        return self.HANDLE << 16 | minor

    @property
    def root_handle(self) -> int:
        return self.HANDLE << 16

    # -- netlink plumbing --

    def _netlink(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute

            try:
                # flags=0: never create the netns as a side effect of opening it
                self._ipr = IPRoute(netns=self.netns, flags=0) if self.netns else IPRoute()
            except OSError as exc:
                code = exc.errno or errno_codes.ENOENT
                raise HostError(
                    self.netns or "",
                    code,
                    f"cannot enter network namespace {self.netns!r}: {os.strerror(code)}",
                ) from exc
        return self._ipr

    def _ifindex(self) -> int:
        if self._index is None:
            found = self._netlink().link_lookup(ifname=self.ifname)
            if not found:
                raise HostError(
                    self.ifname,
                    errno_codes.ENODEV,
                    f"no interface {self.ifname} in {_netns_label(self.netns)}",
                )
            self._index = int(found[0])
        return self._index

    def _tc(self, action: str, what: str, value: str, reason: str, *args: Any, **kw: Any) -> None:
        """One tc change through the writer; a netlink error becomes one HostError line."""
        from pyroute2.netlink.exceptions import NetlinkError

        change = HostChange(action, f"{self.where} {what}", value, reason)

        def make() -> None:
            try:
                self._netlink().tc(*args, **kw)
            except NetlinkError as exc:
                raise HostError(
                    self.where,
                    exc.code,
                    f"{action} {what} {value} on {self.where} failed: {os.strerror(exc.code)}",
                ) from exc

        self.writer.apply(change, make)

    def _read(self) -> _Live:
        ipr = self._netlink()
        index = self._ifindex()
        root_kind, root_handle, default_minor = None, 0, 0
        leaves: set[int] = set()
        for qdisc in ipr.get_qdiscs(index):
            if qdisc["parent"] == TC_H_ROOT:
                root_kind = qdisc.get_attr("TCA_KIND")
                root_handle = qdisc["handle"]
                options = qdisc.get_attr("TCA_OPTIONS")
                init = options.get_attr("TCA_HTB_INIT") if options is not None else None
                if root_kind == "htb" and init is not None:
                    default_minor = init["defcls"]
            else:
                leaves.add(qdisc["parent"])
        classes: dict[int, _LiveClass] = {}
        filter_present = False
        if root_kind == "htb" and root_handle == self.root_handle:
            for msg in ipr.get_classes(index):
                if msg["handle"] >> 16 != self.HANDLE:
                    continue
                classes[msg["handle"] & 0xFFFF] = _live_class(msg)
            for msg in ipr.get_filters(index, parent=self.root_handle):
                options = msg.get_attr("TCA_OPTIONS")
                if (
                    msg.get_attr("TCA_KIND") == "bpf"
                    and options is not None
                    and options.get_attr("TCA_BPF_NAME") == FILTER_NAME
                ):
                    filter_present = True
        return _Live(root_kind, root_handle, default_minor, classes, leaves, filter_present)

    # -- install / adopt --

    def ensure(self) -> str:
        """Install the tree, or adopt ours if it is already there (change classes in place,
        keep the filter and the pinned map). Returns one line saying what happened.
        Raises HostError (refuses a root qdisc that is not ours) or BpfUnavailable."""
        if not self.writer.dry_run:
            self._check_pin_dir()
        live = self._read()
        ours = live.root_kind == "htb" and live.root_handle == self.root_handle
        if not ours and live.root_handle != 0:
            raise HostError(
                self.where,
                errno_codes.EEXIST,
                f"{self.where} already has a root qdisc {live.root_kind} "
                f"{classid_text(live.root_handle)} that nri-qos did not install; "
                "refusing to replace it (remove it first)",
            )
        prefix = "planned: " if self.writer.dry_run else ""
        if not ours:
            try:
                notes = self._install()
            except BaseException:
                self._undo_install()
                raise
            return f"{prefix}installed htb {self.HANDLE:x}: on {self.where}: " + "; ".join(notes)
        notes = self._adopt(live)
        return f"{prefix}adopted htb {self.HANDLE:x}: on {self.where}: " + "; ".join(notes)

    def _install(self) -> list[str]:
        default_minor = self._by_name[self.default].minor
        self._tc(
            "tc add qdisc",
            f"root htb {self.HANDLE:x}:",
            f"default {default_minor:x}",
            f"shape egress per QoS class; unclassified traffic -> {self.default}",
            "add",
            "htb",
            self._ifindex(),
            self.root_handle,
            default=default_minor,
        )
        self._tc(
            "tc add class",
            classid_text(self.classid(PARENT_MINOR)),
            f"rate {self.link_bps}bit ceil {self.link_bps}bit",
            "the link, which the QoS classes share",
            "add-class",
            "htb",
            self._ifindex(),
            self.classid(PARENT_MINOR),
            parent=self.root_handle,
            rate=self.link_bps // 8,
            ceil=self.link_bps // 8,
        )
        leaves = True
        for spec in self.classes:
            self._class("add", spec)
            if leaves:
                leaves = self._leaf(spec)
        notes = [f"{len(self.classes)} classes", f"default {self.default}"]
        if not leaves:
            notes.append("no fq_codel in this kernel: leaves keep HTB's pfifo")
        notes.append(self._attach_filter(replace=False))
        return notes

    def _undo_install(self) -> None:
        """A fresh install failed half-way (no BPF, say): take our new root qdisc away
        again rather than leave a tree without its classifier. Best effort; the error
        that stopped the install is the one reported."""
        if self.writer.dry_run:
            return
        try:
            live = self._read()
            if live.root_kind == "htb" and live.root_handle == self.root_handle:
                self._tc(
                    "tc del qdisc",
                    f"root htb {self.HANDLE:x}:",
                    "",
                    "undo a failed install",
                    "del",
                    "htb",
                    self._ifindex(),
                    self.root_handle,
                    parent=TC_H_ROOT,
                )
        except Exception as exc:
            log.warning("%s: could not undo a failed install: %s", self.where, exc)

    def _adopt(self, live: _Live) -> list[str]:
        notes: list[str] = []
        parent = live.classes.get(PARENT_MINOR)
        if parent is None or (parent.rate_bps, parent.ceil_bps) != (_wire(self.link_bps),) * 2:
            verb = "change" if parent else "add"
            self._tc(
                f"tc {verb} class",
                classid_text(self.classid(PARENT_MINOR)),
                f"rate {self.link_bps}bit ceil {self.link_bps}bit",
                "the link rate changed",
                f"{verb}-class",
                "htb",
                self._ifindex(),
                self.classid(PARENT_MINOR),
                parent=self.root_handle,
                rate=self.link_bps // 8,
                ceil=self.link_bps // 8,
            )
            notes.append(f"link {_fmt_bps(self.link_bps)}")
        for spec in self.classes:
            have = live.classes.get(spec.minor)
            if have is None:
                self._class("add", spec)
                if self.classid(spec.minor) not in live.leaves:
                    self._leaf(spec)
                notes.append(f"added {spec.name}")
            elif (have.rate_bps, have.ceil_bps, have.prio) != (
                _wire(spec.rate_bps),
                _wire(spec.ceil_bps),
                spec.prio,
            ):
                self._class("change", spec)
                notes.append(
                    f"changed {spec.name} (rate {_fmt_bps(have.rate_bps)}->"
                    f"{_fmt_bps(spec.rate_bps)}, ceil {_fmt_bps(have.ceil_bps)}->"
                    f"{_fmt_bps(spec.ceil_bps)}, prio {have.prio}->{spec.prio})"
                )
        want_default = self._by_name[self.default].minor
        if live.default_minor != want_default:
            notes.append(
                f"default stays {live.default_minor:x} (wanted {self.default}, "
                f"{want_default:x}): HTB cannot change it live; remove() and ensure() to change"
            )
        if live.filter_present:
            filter_note = self._reopen_or_reload()
        else:
            filter_note = self._attach_filter(replace=False)
        wanted = {spec.minor for spec in self.classes} | {PARENT_MINOR}
        for minor in sorted(set(live.classes) - wanted):
            if minor == live.default_minor:
                notes.append(f"kept class {minor:x}: it is the live default")
                continue
            self._drop_stale_class(minor)
            notes.append(f"removed class {minor:x}")
        return [*(notes or ["classes unchanged"]), filter_note]

    def _class(self, verb: str, spec: NetClassSpec) -> None:
        self._tc(
            f"tc {verb} class",
            classid_text(self.classid(spec.minor)),
            f"rate {spec.rate_bps}bit ceil {spec.ceil_bps}bit prio {spec.prio}",
            f"QoS class {spec.name}",
            f"{verb}-class",
            "htb",
            self._ifindex(),
            self.classid(spec.minor),
            parent=self.classid(PARENT_MINOR),
            rate=spec.rate_bps // 8,  # pyroute2 takes an int as bytes/s
            ceil=spec.ceil_bps // 8,
            prio=spec.prio,
        )

    def _leaf(self, spec: NetClassSpec) -> bool:
        """fq_codel under the class, so one flow cannot fill the class's queue; False when
        the kernel has no fq_codel (HTB's own pfifo leaf then stays)."""
        try:
            self._tc(
                "tc add qdisc",
                f"fq_codel parent {classid_text(self.classid(spec.minor))}",
                "",
                f"fair queueing among {spec.name}'s flows",
                "add",
                "fq_codel",
                self._ifindex(),
                0,
                parent=self.classid(spec.minor),
            )
        except HostError as exc:
            if exc.errno in (errno_codes.ENOENT, errno_codes.EOPNOTSUPP):
                log.info(
                    "%s: no fq_codel qdisc in this kernel; HTB's pfifo leaves stay", self.where
                )
                return False
            raise
        return True

    def _drop_stale_class(self, minor: int) -> None:
        classid = self.classid(minor)
        if not self.writer.dry_run and MAP_CLASSES in self._maps:
            for cgroup_id, value in list(self._map_items()):
                if value == classid:
                    self.unclassify(cgroup_id)
        self._tc(
            "tc del class",
            classid_text(classid),
            "",
            "no QoS class uses it any more",
            "del-class",
            "htb",
            self._ifindex(),
            classid,
            parent=self.classid(PARENT_MINOR),
        )

    # -- BPF --

    def _check_pin_dir(self) -> None:
        existing = self.pin_dir
        while not existing.exists():
            existing = existing.parent
        if not is_bpffs(existing):
            raise HostError(
                existing,
                errno_codes.ENOTSUP,
                f"{existing} is not on a bpf filesystem, so the classification map cannot be "
                f"pinned; mount one (mount -t bpf bpf /sys/fs/bpf) or pass pin_dir",
            )

    def _make_pin_dir(self) -> None:
        missing = []
        path = self.pin_dir
        while not path.exists():
            missing.append(path)
            path = path.parent
        for path in reversed(missing):
            self.writer.mkdir(path, "bpffs directory for the pinned classification map")

    def _attach_filter(self, *, replace: bool) -> str:
        """Load the object (reusing maps already pinned in pin_dir), set the HTB major for
        the net_cls fallback, and add (or atomically replace) the filter."""
        self._make_pin_dir()
        pins = {name: self.pin_dir / name for name in PINNED_MAPS}
        reused = [name for name, path in pins.items() if path.exists()]
        obj = self.writer.apply(
            HostChange(
                "bpf load",
                str(self.object_path),
                f"maps pinned in {self.pin_dir}",
                "the classifier that maps a socket's cgroup to its QoS class",
            ),
            lambda: BpfObject.load(self.object_path, pin_maps=pins),
        )
        verb = "replace" if replace else "add"
        if obj is None:  # dry run
            self._filter(verb, -1)
            return f"cls_bpf filter ({verb}), maps pinned in {self.pin_dir}"
        try:
            self._close_maps()
            self._maps = {name: obj.map(name) for name in PINNED_MAPS}
            config = self._maps[MAP_CONFIG]
            self.writer.apply(
                HostChange(
                    "bpf map update",
                    str(pins[MAP_CONFIG]),
                    f"0 -> {self.HANDLE:#x}",
                    "the net_cls fallback accepts only our HTB major",
                ),
                lambda: config.update(_VALUE.pack(0), _VALUE.pack(self.HANDLE)),
            )
            fd = obj.program_fd(PROGRAM)
            self.program_id = program_id(fd)
            self._filter(verb, fd)
        finally:
            obj.close()  # the filter holds the program; our BpfMaps hold their own fds
        kept = f" (reused pinned {', '.join(reused)})" if reused else ""
        done = "replaced" if replace else "added"
        return f"cls_bpf filter {done}, program id {self.program_id}{kept}"

    def _filter(self, verb: str, fd: int) -> None:
        self._tc(
            f"tc {verb} filter",
            f"bpf parent {self.HANDLE:x}: prio {FILTER_PRIO}",
            f"{FILTER_NAME} direct-action",
            "classify egress by the sending socket's cgroup",
            f"{verb}-filter",
            "bpf",
            self._ifindex(),
            FILTER_HANDLE,
            parent=self.root_handle,
            prio=FILTER_PRIO,
            protocol=ETH_P_ALL,
            fd=fd,
            name=FILTER_NAME,
            classid=self.root_handle,  # DA: the major HTB combines with skb->tc_classid
            direct_action=True,
        )

    def _reopen_or_reload(self) -> str:
        """The filter is live: reopen its pinned maps; without pins (bpffs was remounted),
        load a fresh program and swap the filter atomically (the classification is lost
        and must be redone by the caller)."""
        if self.writer.dry_run:
            return "kept filter"
        self._close_maps()
        try:
            for name in PINNED_MAPS:
                self._maps[name] = BpfMap.from_pinned(self.pin_dir / name)
        except OSError as exc:
            self._close_maps()
            if exc.errno != errno_codes.ENOENT:
                code = exc.errno or errno_codes.EIO
                raise HostError(
                    self.pin_dir, code, f"cannot reopen the pinned maps: {os.strerror(code)}"
                ) from exc
            lost = not (self.pin_dir / MAP_CLASSES).exists()
            line = self._attach_filter(replace=True)
            return line + ("; the classification map was gone: reclassify" if lost else "")
        info = self._maps[MAP_CLASSES].info
        if (info.key_size, info.value_size) != (_KEY.size, _VALUE.size):
            self._close_maps()
            raise HostError(
                self.pin_dir / MAP_CLASSES,
                errno_codes.EINVAL,
                f"pinned map {MAP_CLASSES} has {info.key_size}-byte keys and "
                f"{info.value_size}-byte values, not 8 and 4; remove the pin",
            )
        count = sum(1 for _ in self._maps[MAP_CLASSES])
        return f"kept filter and pinned map ({count} cgroups classified)"

    def _classes_map(self) -> BpfMap:
        if MAP_CLASSES not in self._maps:
            path = self.pin_dir / MAP_CLASSES
            try:
                self._maps[MAP_CLASSES] = BpfMap.from_pinned(path)
            except OSError as exc:
                code = exc.errno or errno_codes.EIO
                raise HostError(
                    path,
                    code,
                    f"no classification map at {path} ({os.strerror(code)}); call ensure() first",
                ) from exc
        return self._maps[MAP_CLASSES]

    def _map_items(self) -> Iterator[tuple[int, int]]:
        for key, value in self._classes_map().items():
            yield _KEY.unpack(key)[0], _VALUE.unpack(value)[0]

    def _map_op(self, change: HostChange, make: Callable[[], T]) -> T | None:
        def guarded() -> T:
            try:
                return make()
            except OSError as exc:
                code = exc.errno or errno_codes.EIO
                raise HostError(
                    change.target, code, f"{change.action} {change.value}: {os.strerror(code)}"
                ) from exc

        return self.writer.apply(change, guarded)

    # -- classification --

    def classify(self, cgroup_id: int, cls: str) -> None:
        """Send the traffic of sockets created in cgroup `cgroup_id` (see cgroup2_id) to
        class `cls`. Sockets keep the cgroup they were created in, so classify a container
        before it opens its connections."""
        spec = self._by_name.get(cls)
        if spec is None:
            raise ValueError(f"unknown net class {cls!r}; known: {sorted(self._by_name)}")
        classid = self.classid(spec.minor)
        change = HostChange(
            "bpf map update",
            str(self.pin_dir / MAP_CLASSES),
            f"{cgroup_id} -> {classid_text(classid)}",
            f"cgroup {cgroup_id} is {cls}",
        )
        self._map_op(
            change,
            lambda: self._classes_map().update(_KEY.pack(cgroup_id), _VALUE.pack(classid)),
        )

    def unclassify(self, cgroup_id: int) -> bool:
        """Forget a cgroup (its traffic goes to the default class); False if unknown."""
        change = HostChange(
            "bpf map delete",
            str(self.pin_dir / MAP_CLASSES),
            str(cgroup_id),
            "the cgroup is gone or reclassified",
        )
        result = self._map_op(change, lambda: self._classes_map().delete(_KEY.pack(cgroup_id)))
        return True if result is None else result  # dry run: as if it were there (HostWriter)

    def classified(self) -> dict[int, str]:
        """cgroup id -> class name, as the live map says (a classid of no current class
        shows as "7a51:40"). Empty in a dry run that has no map."""
        if self.writer.dry_run and MAP_CLASSES not in self._maps:
            return {}
        names = {self.classid(spec.minor): spec.name for spec in self.classes}
        return {cgroup: names.get(cid, classid_text(cid)) for cgroup, cid in self._map_items()}

    def decisions(self) -> dict[str, int]:
        """How many packets the classifier matched by cgroup2 id, by net_cls classid, or
        left to the default class (per-CPU counters summed; they restart with the program)."""
        if MAP_COUNTERS not in self._maps:
            return {}
        counters = self._maps[MAP_COUNTERS]
        totals = {}
        for index, name in enumerate(("cgroup2", "net_cls", "unclassified")):
            raw = counters.lookup(_VALUE.pack(index)) or b""
            totals[name] = sum(
                struct.unpack("=Q", slot)[0] for slot in counters.per_cpu_values(raw)
            )
        return totals

    # -- teardown and statistics --

    def remove(self) -> str:
        """Delete what we installed: our root qdisc (its classes and the filter go with
        it) and our pins. A root qdisc that is not ours is left alone. When the netns or
        the interface is already gone (the pod ended), so is the qdisc: only the pins are
        removed then."""
        notes = []
        try:
            live: _Live | None = self._read()
        except HostError as exc:
            if exc.errno not in (errno_codes.ENOENT, errno_codes.ENODEV):
                raise
            live = None
            notes.append(f"{self.where} is gone")
        if live is None:
            pass
        elif live.root_kind == "htb" and live.root_handle == self.root_handle:
            self._tc(
                "tc del qdisc",
                f"root htb {self.HANDLE:x}:",
                "",
                "net class shaping removed",
                "del",
                "htb",
                self._ifindex(),
                self.root_handle,
                parent=TC_H_ROOT,
            )
            notes.append(f"removed htb {self.HANDLE:x}: from {self.where}")
        else:
            notes.append(f"no nri-qos tree on {self.where}")
        self._close_maps()
        unpinned = 0
        for name in PINNED_MAPS:
            path = self.pin_dir / name
            if path.exists():
                self.writer.apply(
                    HostChange("bpf unpin", str(path), "", "net class shaping removed"),
                    functools.partial(path.unlink),
                )
                unpinned += 1
        if self.pin_dir.is_dir():
            self.writer.rmdir(self.pin_dir, "net class shaping removed")
        if unpinned:
            notes.append(f"unpinned {unpinned} maps from {self.pin_dir}")
        prefix = "planned: " if self.writer.dry_run else ""
        return prefix + "; ".join(notes)

    def stats(self) -> dict[str, ClassStats]:
        """Per class: the kernel's byte and packet counters and the configured rates.
        Empty when our tree is not installed."""
        live = self._read()
        result = {}
        for spec in self.classes:
            have = live.classes.get(spec.minor)
            if have is not None:
                result[spec.name] = ClassStats(
                    spec.name,
                    classid_text(self.classid(spec.minor)),
                    have.bytes,
                    have.packets,
                    have.rate_bps,
                    have.ceil_bps,
                )
        return result

    def _close_maps(self) -> None:
        for bpf_map in self._maps.values():
            bpf_map.close()
        self._maps = {}

    def close(self) -> None:
        """Release our fds and netlink socket; the tree and the pins stay in the kernel."""
        self._close_maps()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _live_class(msg: Any) -> _LiveClass:
    options = msg.get_attr("TCA_OPTIONS")
    parms = options.get_attr("TCA_HTB_PARMS") if options is not None else None
    rate = ceil = prio = 0
    if parms is not None:
        rate, ceil, prio = parms["rate"], parms["ceil"], parms["prio"]
        rate = options.get_attr("TCA_HTB_RATE64") or rate
        ceil = options.get_attr("TCA_HTB_CEIL64") or ceil
    stats = msg.get_attr("TCA_STATS2")
    basic = stats.get_attr("TCA_STATS_BASIC") if stats is not None else None
    return _LiveClass(
        parent=msg["parent"],
        rate_bps=rate * 8,
        ceil_bps=ceil * 8,
        prio=prio,
        bytes=basic["bytes"] if basic is not None else 0,
        packets=basic["packets"] if basic is not None else 0,
    )


def pin_dir_for(root: Path, ifname: str, netns: str | None) -> Path:
    """Where the tree of `ifname` (in `netns`) keeps its pinned maps under a bpffs `root`."""
    return root / f"{_netns_label(netns)}-{ifname}"


def _netns_label(netns: str | None) -> str:
    """A name for pins and messages: the netns name, "netns-<inode>" for a path (stable
    while the namespace lives), or "host"."""
    if netns is None:
        return "host"
    if "/" not in netns:
        return netns
    try:
        return f"netns-{os.stat(netns).st_ino}"
    except OSError:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", netns.strip("/"))


def _wire(bps: int) -> int:
    """A rate as the kernel keeps it (whole bytes per second), in bit/s."""
    return bps // 8 * 8


def _fmt_bps(bps: int) -> str:
    for unit, size in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bps >= size and bps % size == 0:
            return f"{bps // size}{unit}"
    return f"{bps}bit"
