"""`CgroupFs`: the one object callers use to read and write cgroups on any layout.

Its operations live in `isolation.cgroups.access` (locations, raw I/O, error mapping),
`isolation.cgroups.knobs` (cpuset, cpu, memory) and `isolation.cgroups.groups`
(processes, creating and removing groups).
"""

from __future__ import annotations

from isolation.cgroups.groups import _CgroupGroups
from isolation.cgroups.knobs import _CgroupKnobs


class CgroupFs(_CgroupGroups, _CgroupKnobs):
    """Reads and writes cgroups under ``root`` for whichever layout the host has.

    ``group`` arguments are paths relative to a hierarchy root ("/kubepods/pod1/abc"),
    e.g. from `resolve_cgroups_path`; the same group path names the directory in every
    v1 controller's hierarchy and in the v2 hierarchy.
    """
