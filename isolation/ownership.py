"""Whose cgroup is it? The check made before acting on a container's processes or files.

The runtime tells us a container's ``cgroups_path`` and its id, and both are input: a
runtime bug, a hostile plugin ahead of us or a crafted pod could hand us ``/``,
``/system.slice`` or the pod's own parent, and writing oom_score_adj 1000 "for the
container" would then hit pid 1 and every other process in that group. So a group is
accepted as a container's own only when every real runtime would have named it that
way, and anything else is refused with the reason:

* the path is text without NUL bytes or control characters, and resolves (cgroupfs or
  systemd form, see `isolation.cgroups.paths`) to an absolute group without ``..``;
* it is at least two levels below the hierarchy root (no container lives directly
  under ``/``);
* its last component names this container: the container id itself (containerd with the
  cgroupfs driver), ``<prefix>-<id>`` (CRI-O: ``crio-<id>``) or ``<prefix>-<id>.scope``
  (the systemd driver: ``cri-containerd-<id>.scope``, ``crio-<id>.scope``), with
  ``conmon`` scopes excluded (CRI-O's monitor process is not the container);
* that component is not a slice, and not a level the kubelet owns (``kubepods``,
  ``burstable``, ``besteffort``, ``pod<uid>``), whatever the id claims to be;
* the id itself is a plain token (letters, digits, ``_ . -``), so it cannot smuggle a
  path.

The per-process half of the check (is this pid still in that group at the moment of
the write?) is `isolation.oom.ProcessControls.set_oom_score_adj`'s ``group`` argument.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from isolation.cgroups.errors import CgroupError
from isolation.cgroups.paths import resolve_cgroups_path
from isolation.errors import RefusedAction

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Levels of the kubelet's own hierarchy (cgroupfs and systemd names, after stripping
# ".slice"); a "container" named like one of them is a parent, not a container.
_KUBELET_LEVELS = frozenset({"kubepods", "burstable", "besteffort", "guaranteed"})
_POD_LEVEL = re.compile(r"(?:^|-)pod[0-9a-fA-F_-]{8,}$")
MAX_ID_LENGTH = 256


class ForeignCgroup(RefusedAction):
    """The cgroup is not (provably) the container's own; the message says why."""


def own_group(cgroups_path: str, container_id: str) -> PurePosixPath:
    """The container's group (relative to a hierarchy root), or ForeignCgroup."""
    _check_id(container_id)
    if not cgroups_path:
        raise ForeignCgroup(f"container {container_id} has no cgroups_path")
    if _CONTROL.search(cgroups_path):
        raise ForeignCgroup(f"cgroups_path {cgroups_path!r} contains control characters")
    try:
        group = resolve_cgroups_path(cgroups_path)
    except CgroupError as exc:
        raise ForeignCgroup(f"cgroups_path {cgroups_path!r}: {exc.message}") from None
    if len(group.parts) < 3:  # "/", then at least a parent and the container's own level
        raise ForeignCgroup(
            f"cgroups_path {cgroups_path!r} is {group}, too close to the hierarchy root "
            "to be one container's group"
        )
    leaf = group.name
    if leaf.endswith(".slice"):
        raise ForeignCgroup(f"cgroups_path {cgroups_path!r} is the slice {group}, not a container")
    stem = leaf.removesuffix(".scope")
    if stem in _KUBELET_LEVELS or _POD_LEVEL.search(stem):
        raise ForeignCgroup(
            f"cgroups_path {cgroups_path!r} is {group}, a level the kubelet owns, not a container"
        )
    if not _names_container(stem, leaf, container_id):
        raise ForeignCgroup(
            f"cgroups_path {cgroups_path!r} resolves to {group}, whose last component does "
            f"not name container {container_id}"
        )
    return group


def _names_container(stem: str, leaf: str, container_id: str) -> bool:
    if stem == container_id and leaf == container_id:  # cgroupfs: the id itself
        return True
    prefix, dash, rest = stem.rpartition("-" + container_id)
    if not dash or rest or not prefix:
        return False
    return "conmon" not in prefix


def _check_id(container_id: str) -> None:
    if len(container_id) > MAX_ID_LENGTH or not _ID.fullmatch(container_id):
        shown = container_id if len(container_id) <= 80 else container_id[:80] + "…"
        raise ForeignCgroup(f"container id {shown!r} is not a plain id")


def in_group(proc_cgroup: str, group: PurePosixPath) -> bool:
    """Whether a ``/proc/<pid>/cgroup`` text puts the process in ``group``.

    Each line is ``hierarchy-id:controllers:path`` (v1) or ``0::path`` (v2); a process of
    the container is in its group in at least one hierarchy (all of them, normally). A
    path that only ends with the group is accepted too: inside a cgroup namespace the
    kernel shows paths relative to the namespace's root."""
    target = str(group)
    for line in proc_cgroup.splitlines():
        path = line.split(":", 2)[-1]
        if path == target or path.endswith(target):
            return True
    return False
