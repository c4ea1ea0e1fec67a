"""The kubelet's pod cgroup tree, read: which container groups exist under it.

The kubelet lays pods out the same way under every driver, in one hierarchy per
controller (and once in the cgroup2 tree):

* cgroupfs: ``/kubepods[/burstable|/besteffort]/pod<uid>/<container>``, where a
  container's directory is its id (containerd) or ``crio-<id>`` (CRI-O);
* systemd: ``/kubepods.slice[/kubepods-<qos>.slice]/kubepods-<qos>-pod<uid>.slice/
  <prefix>-<id>.scope`` (``cri-containerd-``, ``crio-``, ``docker-``).

A pod's directory also holds its sandbox (pause) container, named after the sandbox id,
which NRI reports as the pod's id. CRI-O's monitor scopes (``crio-conmon-<id>``) are not
containers and are skipped. Read-only; a directory that vanishes while it is listed is
simply not there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

KUBEPODS = ("kubepods", "kubepods.slice")
_QOS_LEVELS = frozenset(
    {"burstable", "besteffort", "kubepods-burstable.slice", "kubepods-besteffort.slice"}
)
SCOPE_PREFIXES = ("cri-containerd-", "crio-", "docker-", "containerd-")


@dataclass(frozen=True, slots=True)
class ContainerDir:
    """One container's directory under a pod: the ids its name may stand for (the id it
    carries first), its group path and its directory in the hierarchy read."""

    names: tuple[str, ...]
    group: PurePosixPath
    directory: Path


def container_names(name: str) -> tuple[str, ...]:
    """The ids a container directory's name stands for, the carried id first; () for
    names that are no container (slices, CRI-O's conmon)."""
    if "conmon" in name or name.endswith(".slice"):
        return ()
    if name.endswith(".scope"):
        stem = name.removesuffix(".scope")
        for prefix in SCOPE_PREFIXES:
            if stem.startswith(prefix):
                return (stem.removeprefix(prefix), stem, name)
        return (stem.rpartition("-")[2], stem, name)
    if name.startswith("crio-"):
        return (name.removeprefix("crio-"), name)
    return (name,)


def container_dirs(hierarchy: Path) -> list[ContainerDir]:
    """Every container directory under the kubepods tree of one hierarchy root."""
    out: list[ContainerDir] = []
    for top in KUBEPODS:
        for name, path in _subdirs(os.path.join(hierarchy, top)):
            if name in _QOS_LEVELS:
                for _, pod in _subdirs(path):
                    _containers(hierarchy, pod, out)
            else:
                _containers(hierarchy, path, out)
    return out


def populated(directory: Path) -> bool:
    """Whether the group has a process (its cgroup.procs is not empty)."""
    try:
        return bool((directory / "cgroup.procs").read_text().strip())
    except OSError:
        return False


def _containers(hierarchy: Path, pod: str, out: list[ContainerDir]) -> None:
    base = len(os.fspath(hierarchy))
    for name, path in _subdirs(pod):
        names = container_names(name)
        if names:
            out.append(ContainerDir(names, PurePosixPath(path[base:] or "/"), Path(path)))


def _subdirs(directory: str) -> list[tuple[str, str]]:
    try:
        with os.scandir(directory) as entries:
            return [(e.name, e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
