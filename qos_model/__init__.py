"""Values every layer of nri-qos shares, and nothing else.

Pods, containers and the changes asked of them (`containers`), the kernel's CPU-list format
(`cpulist`), the host's CPU topology (`topology`) and the runtime's identity and NRI
capabilities (`runtime`). Plain frozen values with no I/O: the engine (`nri_plugin.policy`),
the host adapters (`isolation`), the probes (`ebpf`), the protocol layer and the embedded
runtime all import this package, and it imports none of them — that is what lets
`isolation` and `ebpf` stay free of `nri_plugin` (tests/test_layering.py checks it).
"""
