"""Intel RDT through resctrl (/sys/fs/resctrl): one control group per QoS class.

Each class gets a CTRL_MON group named `Resctrl.PREFIX + class` whose schemata limits
its L3 ways and memory bandwidth; containers get monitoring groups under it. The runtime
is handed the group name as the container's clos_id. Kernel reference:
Documentation/arch/x86/resctrl.rst; tested against tests/isolation/fake_resctrl.py.
"""

from isolation.rdt.model import (
    DEFAULT_CLASSES,
    CacheInfo,
    MbInfo,
    MonInfo,
    RdtClassConfig,
    RdtInfo,
    RdtUnavailable,
)
from isolation.rdt.resctrl import MonSample, Resctrl
from isolation.rdt.schemata import format_schemata, parse_schemata, schemata_for

__all__ = [
    "DEFAULT_CLASSES",
    "CacheInfo",
    "MbInfo",
    "MonInfo",
    "MonSample",
    "RdtClassConfig",
    "RdtInfo",
    "RdtUnavailable",
    "Resctrl",
    "format_schemata",
    "parse_schemata",
    "schemata_for",
]
