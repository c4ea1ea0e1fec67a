"""Group paths: NRI's ``cgroups_path`` (cgroupfs or systemd form) to a path in a hierarchy."""

from __future__ import annotations

from pathlib import PurePosixPath

from isolation.cgroups.errors import CgroupPathError


def expand_slice(slice_name: str) -> PurePosixPath:
    """Expand a systemd slice unit name into its cgroup path.

    systemd encodes the slice hierarchy in the name: each "-" separates a parent, so
    ``a-b-c.slice`` lives at ``/a.slice/a-b.slice/a-b-c.slice``; ``-.slice`` is the root.
    Same rule and the same rejections as runc's (opencontainers/cgroups) ExpandSlice:
    the name must end in ".slice", contain no "/", and have no empty component
    ("a--b.slice", "-a.slice", "a-.slice").
    """
    suffix = ".slice"
    if len(slice_name) <= len(suffix) or not slice_name.endswith(suffix) or "/" in slice_name:
        raise CgroupPathError(slice_name, f"invalid systemd slice name {slice_name!r}")
    stem = slice_name[: -len(suffix)]
    if stem == "-":
        return PurePosixPath("/")
    path = PurePosixPath("/")
    prefix = ""
    for component in stem.split("-"):
        if not component:
            raise CgroupPathError(
                slice_name, f"invalid systemd slice name {slice_name!r}: empty component"
            )
        path /= f"{prefix}{component}{suffix}"
        prefix += component + "-"
    return path


# runc's default parent slice when the systemd cgroups_path leaves it empty.
SYSTEMD_DEFAULT_SLICE = "system.slice"


def resolve_cgroups_path(cgroups_path: str) -> PurePosixPath:
    """Turn NRI's ``linux.cgroups_path`` into a group path relative to a hierarchy root.

    Two forms exist:

    * cgroupfs driver: a path, ``/kubepods/burstable/pod<uid>/<id>``, used as is;
    * systemd driver: ``slice:prefix:name``, e.g.
      ``kubepods-burstable-pod<uid>.slice:cri-containerd:<id>``. The slice is expanded
      (see `expand_slice`; empty means ``system.slice``) and the unit is
      ``<prefix>-<name>.scope``, or ``<name>`` itself when it ends in ".slice" (runc's
      getUnitName). CRI-O uses the prefix ``crio``, containerd ``cri-containerd``.

    Returns an absolute PurePosixPath ("/" is the hierarchy root).
    """
    text = cgroups_path.strip()
    if not text:
        raise CgroupPathError(cgroups_path, "empty cgroups_path")
    if ":" in text and not text.startswith("/"):
        parts = text.split(":")
        if len(parts) != 3:
            raise CgroupPathError(
                cgroups_path,
                f'systemd cgroups_path must look like "slice:prefix:name", got {cgroups_path!r}',
            )
        slice_name, prefix, name = parts
        if not name:
            raise CgroupPathError(
                cgroups_path, f"systemd cgroups_path {cgroups_path!r} has no name"
            )
        parent = expand_slice(slice_name or SYSTEMD_DEFAULT_SLICE)
        unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope"
        return parent / unit
    return normalize_group(text)


def normalize_group(group: str | PurePosixPath) -> PurePosixPath:
    """An absolute group path without ".." (which could escape the root); "." is dropped."""
    path = PurePosixPath("/") / str(group)
    if ".." in path.parts:
        raise CgroupPathError(str(group), f"cgroup path {str(group)!r} may not contain '..'")
    return path


def _relative(group: PurePosixPath) -> PurePosixPath:
    return group.relative_to("/")
