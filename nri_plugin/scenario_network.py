"""`nri-qos lab --scenario network`: per-QoS-class egress shaping with real traffic.

Two network namespaces joined by a veth pair (10.200.0.1 -> 10.200.0.2, only inside
them), a `NetClassTree` on the sender's veth, one cgroup2 group per "container", and a
real TCP sender per container, each placed in its cgroup before it opens its socket (the
socket keeps that cgroup, which is what the classifier reads). All senders run at once,
so the classes contend, and the report holds what the kernel counted per class and what
each container got through.

`NetworkLab` is the reusable part (the real tests use it too): it owns everything it
creates (namespaces, veth, cgroups, a private bpffs mount for the pins, processes, trees)
and removes it on exit, also after an error. Needs root, cgroup2 and BPF.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import selectors
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from ebpf.libbpf import BpfUnavailable
from isolation.errors import HostError
from isolation.netclass import (
    DEFAULT_CLASS,
    NetClassSpec,
    NetClassTree,
    cgroup2_id,
    classid_text,
    default_classes,
)
from nri_plugin.policy.class_isolation import DEFAULT_NET_CLASSES
from nri_plugin.policy.qos import QosClass

log = logging.getLogger("nri_qos.lab.network")

SENDER_IP = "10.200.0.1"
RECEIVER_IP = "10.200.0.2"
PREFIX_LEN = 24
PORT = 5201
SENDER_IF = "nqveth-s"
RECEIVER_IF = "nqveth-r"
CGROUP2_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))

# The scenario's containers: (name, QoS class).
# The scenario's containers: (name, Katalyst QoS class); the network class each gets is
# the engine's default for its QoS class (nri_plugin.policy.class_isolation).
CONTAINERS = (
    ("online-web", "shared_cores"),
    ("batch-copy", "reclaimed_cores"),
    ("batch-etl", "reclaimed_cores"),
    ("system-agent", "system_cores"),
)


class ScenarioUnavailable(Exception):
    """The host cannot run the scenario; one line says what is missing."""


# Both helper processes enter the namespace themselves (setns on the netns file), so no
# iproute2 is needed and nothing else about them changes.
_ENTER_NETNS = """
import ctypes, os, sys
_fd = os.open(sys.argv[1], os.O_RDONLY)
if ctypes.CDLL(None, use_errno=True).setns(_fd, 0x40000000) != 0:
    raise SystemExit("setns failed: " + os.strerror(ctypes.get_errno()))
os.close(_fd)
"""

# argv: netns ip port expected; stdin: "go <warmup_s> <window_s>"; stdout: "ready", then
# one JSON line with the bytes each sender delivered in the window and in total.
_RECEIVER = (
    _ENTER_NETNS
    + """
import json, socket, threading, time
ip, port, expected = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((ip, port))
srv.listen(64)
counts, finished = {}, set()

def serve(conn):
    name = b""
    while not name.endswith(b"\\n"):
        byte = conn.recv(1)
        if not byte:
            return
        name += byte
    key = name.decode().strip()
    counts[key] = 0
    while True:
        data = conn.recv(1 << 18)
        if not data:
            break
        counts[key] += len(data)
    finished.add(key)

def accept():
    for _ in range(expected):
        conn, _ = srv.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()

threading.Thread(target=accept, daemon=True).start()
print("ready", flush=True)
_, warmup, window = sys.stdin.readline().split()
time.sleep(float(warmup))
start, before = time.monotonic(), dict(counts)
time.sleep(float(window))
end, after = time.monotonic(), dict(counts)
deadline = time.monotonic() + 10
while len(finished) < expected and time.monotonic() < deadline:
    time.sleep(0.02)
window_bytes = {k: v - before.get(k, 0) for k, v in after.items()}
print(json.dumps({"window": window_bytes, "total": dict(counts), "seconds": end - start}))
sys.stdout.flush()
os._exit(0)
"""
)

# argv: netns ip port name seconds; waits for "go" on stdin (the lab moves it into its
# cgroup first), then sends as fast as TCP lets it and closes cleanly.
_SENDER = (
    _ENTER_NETNS
    + """
import socket, time
ip, port, name, seconds = sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
print("ready", flush=True)
sys.stdin.readline()
sock = socket.socket()
# a small send buffer keeps the drain after the last send short and the counts honest
sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 18)
sock.connect((ip, port))
sock.sendall(name.encode() + b"\\n")
chunk, end = b"x" * (1 << 16), time.monotonic() + seconds
while time.monotonic() < end:
    sock.send(chunk)
sock.shutdown(socket.SHUT_WR)
sock.close()
"""
)


@dataclass(frozen=True)
class Flow:
    """One sender: its name and the cgroup2 directory it runs in."""

    name: str
    cgroup: Path


@dataclass(frozen=True)
class FlowResult:
    """What the receiver got from one sender: in the measured window (all senders
    running) and over the whole connection."""

    name: str
    window_bytes: int
    total_bytes: int
    window_s: float

    @property
    def mbit(self) -> float:
        return self.window_bytes * 8 / self.window_s / 1e6 if self.window_s > 0 else 0.0


def _cgroup2_root() -> Path:
    for root in CGROUP2_ROOTS:
        if (root / "cgroup.controllers").exists():
            return root
    raise ScenarioUnavailable("no cgroup2 hierarchy at /sys/fs/cgroup/unified or /sys/fs/cgroup")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


class NetworkLab:
    """Two namespaces, a veth pair, a private bpffs and a cgroup2 parent; all of it, and
    every process, tree and cgroup made through it, is removed by `close()`."""

    def __init__(self, tag: str | None = None) -> None:
        tag = tag or f"{os.getpid()}"
        self.sender_ns = f"nriqos-net-{tag}-a"
        self.receiver_ns = f"nriqos-net-{tag}-b"
        self.sender_if = SENDER_IF
        self.cgroup_parent = _cgroup2_root() / f"nri-qos-scenario-{tag}"
        self.bpffs: Path | None = None
        self._cgroups: list[Path] = []
        self._processes: list[subprocess.Popen[str]] = []
        self._trees: list[NetClassTree] = []
        self._namespaces: list[str] = []

    # -- setup --

    def open(self) -> Self:
        if os.geteuid() != 0:
            raise ScenarioUnavailable("the network scenario needs root (namespaces, tc, BPF)")
        from pyroute2 import IPRoute, netns

        try:
            for name in (self.sender_ns, self.receiver_ns):
                netns.create(name)
                self._namespaces.append(name)
            with IPRoute(netns=self.sender_ns, flags=0) as ipr:
                ipr.link(
                    "add",
                    ifname=SENDER_IF,
                    kind="veth",
                    peer={"ifname": RECEIVER_IF, "net_ns_fd": self.receiver_ns},
                )
                self._up(ipr, SENDER_IF, SENDER_IP)
            with IPRoute(netns=self.receiver_ns, flags=0) as ipr:
                self._up(ipr, RECEIVER_IF, RECEIVER_IP)
            self.bpffs = Path(tempfile.mkdtemp(prefix="nriqos-bpffs-"))
            if _libc().mount(b"bpf", os.fsencode(self.bpffs), b"bpf", 0, None) != 0:
                code = ctypes.get_errno()
                self.bpffs.rmdir()
                self.bpffs = None
                raise ScenarioUnavailable(f"cannot mount a bpf filesystem: {os.strerror(code)}")
            os.mkdir(self.cgroup_parent)
            self._cgroups.append(self.cgroup_parent)
        except BaseException:
            self.close()
            raise
        return self

    @staticmethod
    def _up(ipr: Any, ifname: str, address: str) -> None:
        index = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=index, address=address, prefixlen=PREFIX_LEN)
        ipr.link("set", index=index, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    def netns_path(self, name: str) -> str:
        return f"/var/run/netns/{name}"

    def cgroup(self, name: str) -> Path:
        """A new cgroup2 group under the lab's parent."""
        path = self.cgroup_parent / name
        os.mkdir(path)
        self._cgroups.append(path)
        return path

    def tree(self, classes: Sequence[NetClassSpec], *, default: str) -> NetClassTree:
        """A NetClassTree on the sender's veth, pinned in the lab's bpffs (not installed:
        call `ensure()`); the lab removes it at the end."""
        if self.bpffs is None:
            raise RuntimeError("open() the network lab before making trees in it")
        tree = NetClassTree(
            self.sender_if,
            classes,
            default=default,
            netns=self.sender_ns,
            pin_dir=self.bpffs / f"{self.sender_ns}-{self.sender_if}",
        )
        self._trees.append(tree)
        return tree

    # -- traffic --

    def _spawn(self, script: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._processes.append(proc)
        return proc

    def run_flows(
        self, flows: Sequence[Flow], *, window_s: float, warmup_s: float = 0.5
    ) -> dict[str, FlowResult]:
        """Run every flow at once for warmup + window (+ a short tail, so the window is
        fully contended) and return what the receiver counted per flow."""
        receiver = self._spawn(
            _RECEIVER, self.netns_path(self.receiver_ns), RECEIVER_IP, str(PORT), str(len(flows))
        )
        _expect_ready(receiver, "receiver")
        seconds = warmup_s + window_s + 0.3
        senders = []
        for flow in flows:
            proc = self._spawn(
                _SENDER,
                self.netns_path(self.sender_ns),
                RECEIVER_IP,
                str(PORT),
                flow.name,
                str(seconds),
            )
            _expect_ready(proc, f"sender {flow.name}")
            (flow.cgroup / "cgroup.procs").write_text(str(proc.pid))
            senders.append(proc)
        _send_line(receiver, f"go {warmup_s} {window_s}")
        for proc in senders:
            _send_line(proc, "go")
        line = _read_line(receiver, timeout=seconds + 15, what="receiver report")
        report = json.loads(line)
        for proc in [receiver, *senders]:
            _reap(proc, timeout=5)
        missing = [flow.name for flow in flows if flow.name not in report["total"]]
        if missing:
            raise RuntimeError(f"the receiver saw no connection from {', '.join(missing)}")
        return {
            flow.name: FlowResult(
                flow.name,
                int(report["window"].get(flow.name, 0)),
                int(report["total"][flow.name]),
                float(report["seconds"]),
            )
            for flow in flows
        }

    # -- teardown --

    def close(self) -> None:
        """Remove everything, each step on its own so one failure does not leave the rest
        behind; failures are logged."""
        for proc in self._processes:
            _reap(proc, timeout=0)
        self._processes.clear()
        for tree in self._trees:
            with _logged("remove net class tree"):
                tree.remove()
            with _logged("close net class tree"):
                tree.close()
        self._trees.clear()
        for path in reversed(self._cgroups):
            with _logged(f"remove cgroup {path}"):
                _rmdir_cgroup(path)
        self._cgroups.clear()
        from pyroute2 import netns

        for name in self._namespaces:
            with _logged(f"remove netns {name}"):
                netns.remove(name)
        self._namespaces.clear()
        if self.bpffs is not None:
            with _logged(f"unmount {self.bpffs}"):
                if _libc().umount2(os.fsencode(self.bpffs), 0) != 0:
                    raise OSError(ctypes.get_errno(), "umount failed", str(self.bpffs))
                self.bpffs.rmdir()
            self.bpffs = None

    def __enter__(self) -> Self:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _send_line(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()


def _read_line(proc: subprocess.Popen[str], *, timeout: float, what: str) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{what}: the process exited with {proc.wait()}")
    return line.strip()


def _expect_ready(proc: subprocess.Popen[str], what: str) -> None:
    line = _read_line(proc, timeout=10, what=f"{what} start")
    if line != "ready":
        raise RuntimeError(f"{what} said {line!r} instead of ready")


def _reap(proc: subprocess.Popen[str], *, timeout: float) -> None:
    if proc.poll() is None and timeout > 0:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _rmdir_cgroup(path: Path) -> None:
    """rmdir, retrying briefly: a killed task leaves its cgroup a moment after exiting."""
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
    os.rmdir(path)


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        log.warning("network lab cleanup: %s failed: %s", what, exc)


def _net_class(tree: NetClassTree, mapped: str | None) -> str:
    """The HTB classid the live map sends a cgroup to ("default" when it has none)."""
    minors = {spec.name: spec.minor for spec in tree.classes}
    if mapped is None:
        return "default"
    return classid_text(tree.classid(minors[mapped])) if mapped in minors else mapped


def _mbit(bps: int) -> float:
    return round(bps / 1e6, 2)


def run_network_scenario(duration_s: float = 3.0, link_mbit: int = 100) -> dict[str, Any]:
    """Four containers of three QoS classes send at once through a link of `link_mbit`
    shaped with the default classes (system 40 %, online 30 %, batch 30 %, each may borrow
    up to the link). Returns the kernel's per-class counters and each container's measured
    throughput (`mbit`: over the window when all send; `sent_bytes`: delivered in total)."""
    link_bps = link_mbit * 1_000_000
    classes = default_classes(link_bps)
    try:
        with NetworkLab() as lab:
            tree = lab.tree(classes, default=DEFAULT_CLASS)
            tree.ensure()
            flows, qos_of = [], {}
            for name, qos in CONTAINERS:
                group = lab.cgroup(name)
                net_class = DEFAULT_NET_CLASSES[QosClass(qos)]
                assert net_class is not None
                tree.classify(cgroup2_id(group), net_class)
                flows.append(Flow(name, group))
                qos_of[name] = (qos, cgroup2_id(group))
            results = lab.run_flows(flows, window_s=duration_s)
            stats = tree.stats()
            mapped = tree.classified()
            return {
                "link_mbit": link_mbit,
                "classes": {
                    name: {
                        "bytes": stat.bytes,
                        "rate_mbit": _mbit(stat.rate_bps),
                        "ceil_mbit": _mbit(stat.ceil_bps),
                    }
                    for name, stat in stats.items()
                },
                "containers": [
                    {
                        "name": name,
                        "class": qos,
                        "net_class": mapped.get(cgroup_id, "default"),
                        "classid": _net_class(tree, mapped.get(cgroup_id)),
                        "sent_bytes": results[name].total_bytes,
                        "mbit": round(results[name].mbit, 2),
                    }
                    for name, (qos, cgroup_id) in qos_of.items()
                ],
            }
    except (BpfUnavailable, HostError) as exc:
        raise ScenarioUnavailable(f"network scenario: {exc}") from exc


def run_network_lab(duration_s: float, link_mbit: int, *, as_json: bool) -> int:
    """`nri-qos lab --scenario network`: run it and print the result (exit 2 with one line
    when the host cannot run it)."""
    try:
        result = run_network_scenario(duration_s, link_mbit)
    except ScenarioUnavailable as exc:
        print(f"nri-qos lab: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"egress of {len(result['containers'])} containers through a {link_mbit} Mbit/s link")
    print(f"{'network class':<14} {'rate':>9} {'ceil':>9} {'bytes (kernel)':>15}")
    for name, c in result["classes"].items():
        print(f"{name:<14} {c['rate_mbit']:>5g} Mb/s {c['ceil_mbit']:>5g} Mb/s {c['bytes']:>15,}")
    print()
    print(f"{'container':<14} {'QoS class':<16} {'net class':<10} {'sent':>13} {'Mbit/s':>8}")
    for c in result["containers"]:
        print(
            f"{c['name']:<14} {c['class']:<16} {c['net_class']:<10} "
            f"{c['sent_bytes']:>13,} {c['mbit']:>8.1f}"
        )
    return 0
