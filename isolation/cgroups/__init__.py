"""One interface over cgroup v1 and v2 for the writes the policy makes outside NRI.

NRI adjusts a container's cgroup when it is created or updated, but pool resizes, the
interference ladder and the lab need to read and write cgroups directly. Hosts come in
three layouts (systemd's names): *unified* (pure v2 at the root), *hybrid* (v1
controllers plus a controller-less cgroup2 mount, e.g. ``unified/``) and *legacy* (pure
v1). Each operation here knows the file it maps to in either version, so callers never
branch on the version.

Every path is built from two configurable roots: the cgroupfs root (default
``/sys/fs/cgroup``) and the procfs root (``/proc``, for ``self/mountinfo``). Tests point
both at a fake tree; production uses the real ones; the code path is the same.

Errors from the kernel become `CgroupError` subclasses that carry the errno and the
path, with a message that says what to do. Callers branch on ``errno``, never on text.

In dry-run mode nothing is written: mutating calls return (and `CgroupFs.planned`
accumulates) the writes they would make, computed from the same reads of the live tree.
"""

from __future__ import annotations

from isolation.cgroups.access import CgroupWrite, WriteAction
from isolation.cgroups.errors import (
    CgroupBusy,
    CgroupError,
    CgroupNotFound,
    CgroupPathError,
    CgroupPermissionError,
    CgroupProcessGone,
    CgroupUnsupported,
    CgroupValueRejected,
)
from isolation.cgroups.fs import CgroupFs
from isolation.cgroups.layout import (
    DEFAULT_CGROUP_ROOT,
    DEFAULT_PROCFS_ROOT,
    RESOURCE_CONTROLLERS,
    V1_CONTROLLER_NAMES,
    V2_RESOURCE_CONTROLLERS,
    CgroupMounts,
    CgroupVersion,
    HostLayout,
    MountEntry,
    detect_cgroup_mounts,
    parse_mountinfo,
)
from isolation.cgroups.paths import (
    SYSTEMD_DEFAULT_SLICE,
    expand_slice,
    normalize_group,
    resolve_cgroups_path,
)
from isolation.cgroups.values import (
    CFS_PERIOD_DEFAULT_US,
    CFS_PERIOD_MAX_US,
    CFS_PERIOD_MIN_US,
    CFS_QUOTA_MIN_US,
    CPU_SHARES_DEFAULT,
    CPU_SHARES_MAX,
    CPU_SHARES_MIN,
    CPU_WEIGHT_DEFAULT,
    CPU_WEIGHT_MAX,
    CPU_WEIGHT_MIN,
    CpuQuota,
    format_cpu_max,
    parse_cpu_max,
    parse_flat_keyed,
    parse_v1_memory_limit,
    parse_v2_memory_max,
    shares_to_weight,
    weight_to_shares,
)

__all__ = [
    "CFS_PERIOD_DEFAULT_US",
    "CFS_PERIOD_MAX_US",
    "CFS_PERIOD_MIN_US",
    "CFS_QUOTA_MIN_US",
    "CPU_SHARES_DEFAULT",
    "CPU_SHARES_MAX",
    "CPU_SHARES_MIN",
    "CPU_WEIGHT_DEFAULT",
    "CPU_WEIGHT_MAX",
    "CPU_WEIGHT_MIN",
    "DEFAULT_CGROUP_ROOT",
    "DEFAULT_PROCFS_ROOT",
    "RESOURCE_CONTROLLERS",
    "SYSTEMD_DEFAULT_SLICE",
    "V1_CONTROLLER_NAMES",
    "V2_RESOURCE_CONTROLLERS",
    "CgroupBusy",
    "CgroupError",
    "CgroupFs",
    "CgroupMounts",
    "CgroupNotFound",
    "CgroupPathError",
    "CgroupPermissionError",
    "CgroupProcessGone",
    "CgroupUnsupported",
    "CgroupValueRejected",
    "CgroupVersion",
    "CgroupWrite",
    "CpuQuota",
    "HostLayout",
    "MountEntry",
    "WriteAction",
    "detect_cgroup_mounts",
    "expand_slice",
    "format_cpu_max",
    "normalize_group",
    "parse_cpu_max",
    "parse_flat_keyed",
    "parse_mountinfo",
    "parse_v1_memory_limit",
    "parse_v2_memory_max",
    "resolve_cgroups_path",
    "shares_to_weight",
    "weight_to_shares",
]
