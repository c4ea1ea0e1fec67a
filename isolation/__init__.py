"""Host adapters: one module per host resource (cgroups, cpuset, rdt, iocost, netclass, oom).

Every path goes through a configurable root so tests and dry-run see exactly what
production would write.
"""
