"""The recorded sysfs snapshots (tests/data/sysfs-topologies), extracted on demand.

Importable without pytest: the policy tests use it through the `snapshots` fixture
(tests/policy/conftest.py), and `bench/nri_latency.py --sysfs NAME` extracts a snapshot to
point a plugin's `[host] root` at a real machine's topology.
"""

from __future__ import annotations

import bz2
import io
import lzma
import re
import tarfile
from pathlib import Path

from isolation.sysfs import discover_topology
from qos_model.topology import Topology
from tests.conftest import SYSFS_TOPOLOGIES

# snapshot name -> (archive, directory inside it that holds sys/)
SNAPSHOTS: dict[str, tuple[str, str]] = {
    "desktop": ("desktop-server-4socket.tar.bz2", "sysfs/desktop"),
    "server": ("desktop-server-4socket.tar.bz2", "sysfs/server"),
    "4-socket-server-nosnc": ("desktop-server-4socket.tar.bz2", "sysfs/4-socket-server-nosnc"),
    "2-socket-4-node-40-core": ("2socket-4node-snc.tar.bz2", "sysfs/2-socket-4-node-40-core"),
    "sample1": ("sample1-16cpu.tar.xz", "sample1"),
    "sample2": ("sample2-112cpu-8node.tar.xz", "sample2"),
}

# The archives hold 100k files, mostly cpuidle/power/memoryN entries that topology discovery
# never opens; extracting all of them costs ~20 s. Only the subtrees discovery reads are
# extracted. If discovery starts reading another file, add it here, or the tests will see it
# as missing and exercise the fallback instead.
_READ_BY_DISCOVERY = re.compile(
    r"""(?x) (?:^|/) sys/devices/system/ (?:
        cpu (?: /(?:online|offline|possible|present|isolated)
              | /cpu\d+ (?: /online | /node\d+ | /topology(?:/[^/]+)?
                          | /cache(?:/index\d+(?:/(?:level|type|id|shared_cpu_list))?)? )? )?
      | node (?: /(?:online|possible|has_cpu|has_memory)
               | /node\d+ (?: /(?:cpulist|distance|meminfo) )? )?
    )$"""
)


class SnapshotLibrary:
    """Extracts each archive into `target` the first time a snapshot of it is asked for."""

    def __init__(self, target: Path) -> None:
        self._target = target
        self._extracted: set[str] = set()
        self._topologies: dict[str, Topology] = {}

    def root(self, name: str) -> Path:
        """The host root of snapshot `name`: the directory that holds sys/."""
        archive, inner = SNAPSHOTS[name]
        if archive not in self._extracted:
            self._extract(SYSFS_TOPOLOGIES / archive)
            self._extracted.add(archive)
        root = self._target / inner
        assert (root / "sys" / "devices" / "system" / "cpu").is_dir(), root
        return root

    def topology(self, name: str) -> Topology:
        if name not in self._topologies:
            self._topologies[name] = discover_topology(self.root(name))
        return self._topologies[name]

    def _extract(self, archive: Path) -> None:
        # Decompress up front: tarfile seeks back to each member, and a seek backwards in a
        # compressed stream restarts decompression from the beginning.
        opener = bz2.open if archive.name.endswith(".bz2") else lzma.open
        with opener(archive) as compressed:
            data = compressed.read()
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = [member for member in tar if _READ_BY_DISCOVERY.search(member.name)]
            # "data" refuses absolute paths and links leaving the target; the trees only
            # hold relative links such as cpu0/node0 -> ../../node/node0
            tar.extractall(self._target, members=members, filter="data")


def plugin_host_root(snapshot: str, target: Path) -> Path:
    """A host root a plugin process can start on and cannot harm: the snapshot's sysfs
    topology, an empty cgroup2 tree and a procfs holding only the mountinfo that mounts it
    (so no host write can reach a real process, whatever pid or cgroups path it is told).
    For the benchmarks and the fuzzer's live runs."""
    root = SnapshotLibrary(target).root(snapshot)
    cgroup = root / "sys" / "fs" / "cgroup"
    cgroup.mkdir(parents=True, exist_ok=True)
    (cgroup / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    (root / "proc" / "self").mkdir(parents=True, exist_ok=True)
    mount_point = "".join(f"\\{ord(ch):03o}" if ch in " \t\n\\" else ch for ch in str(cgroup))
    (root / "proc" / "self" / "mountinfo").write_text(
        f"35 24 0:30 / {mount_point} rw,nosuid,nodev,noexec,relatime shared:9 - "
        "cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"
    )
    return root
