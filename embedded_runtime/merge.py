"""Merging plugin replies the way NRI's adaptation does, and applying the result the way
containerd and CRI-O do. Pure: protobuf messages in, protobuf messages out.

Two different steps, because real runtimes have two:

1. *Collecting* (NRI, docs/nri-protocol.md §7.1-§7.3): every plugin's
   CreateContainer reply is merged into one adjustment, in idx order, while the
   CreateContainer request is mutated so the next plugin sees the earlier plugins'
   changes. Every field is owned by the first plugin that sets it within the event; a
   second claim fails the event with "plugins "B" and "A" both tried to set ...". Updates
   of other containers (CreateContainer/UpdateContainer/StopContainer replies) are merged
   per container the same way; for UpdateContainer the entry of the updated container is
   folded into the CRI-requested resources.
2. *Applying* (the runtime, §6.7/§6.8): only part of what NRI merged reaches the
   container. The adjustment goes through NRI's OCI spec generator (memory limit sets
   swap too, other memory fields are ignored, hugepages replace-or-append, env is
   de-duplicated, ...); updates go through the runtime's update path (containerd: the CRI
   subset, zero means unchanged; CRI-O: every present field).

Fields this emulation does not model (mounts, hooks, devices, args, rlimits, CDI devices,
namespaces, sysctls, seccomp, scheduler, I/O priority, memory policy, RDT schemata and
monitoring) are merged by nobody and listed in `ignored`, so a caller can tell a plugin
that relies on them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from embedded_runtime.errors import AdjustmentError, OwnershipConflictError
from embedded_runtime.flavor import RuntimeFlavor, UpdateScope
from nri_plugin.protocol import nri_pb2 as pb
from nri_plugin.protocol.fields import CPU_FIELDS, MEMORY_FIELDS, RESOURCE_FIELDS

F = pb.Field

# The LinuxCPU / LinuxMemory fields, from NRI's field table, grouped the way the merge
# and apply rules below treat them.
_MEMORY_WRAPPED = tuple(f for f in MEMORY_FIELDS if f.wrapped)  # all of them today
_CPU_WRAPPED = tuple(f for f in CPU_FIELDS if f.wrapped)
_CPU_STRINGS = tuple(f for f in CPU_FIELDS if not f.wrapped)
_CPU_CRI_WRAPPED = tuple(f for f in _CPU_WRAPPED if f.cri)  # containerd: shares/quota/period

# How NRI v0.4.0 words a conflict (it predates the Field enum).
_LEGACY_SUBJECTS: dict[int, str] = {
    F.Annotations: "annotation",
    F.Env: "env",
    **{f.field_id: f.legacy_subject for f in RESOURCE_FIELDS},
    F.HugepageLimits: "hugepage limit of size",
    F.BlockioClass: "block I/O class",
    F.RdtClass: "RDT class",
    F.CgroupsUnified: "unified resource",
    F.CgroupsPath: "cgroups path",
}

REMOVAL_PREFIX = "-"


def field_subject(field_id: int, key: str | None, legacy: bool) -> str:
    """The words naming a field (and its key) in a conflict message."""
    name = _LEGACY_SUBJECTS.get(field_id) if legacy else None
    if name is None:
        name = pb.Field.Name(field_id)  # type: ignore[arg-type]
    return f"{name} {key}" if key is not None else name


class Owners:
    """Which plugin set which field of which container within one event (§7.2).

    A removal marks the field as cleared by the remover ("-plugin"): the remover may set
    it again, anyone else conflicts with the remover.
    """

    def __init__(self, *, legacy_messages: bool = False) -> None:
        self._legacy = legacy_messages
        self._simple: dict[str, dict[int, str]] = {}
        self._compound: dict[str, dict[int, dict[str, str]]] = {}

    def claim(self, ctr_id: str, field_id: int, plugin: str, key: str | None = None) -> None:
        other = self.owner(ctr_id, field_id, key)
        if other is not None and other.startswith(REMOVAL_PREFIX):
            other = other[len(REMOVAL_PREFIX) :]
            if other == plugin:  # the remover may set the field again
                other = None
        if other is not None:
            subject = field_subject(field_id, key, self._legacy)
            raise OwnershipConflictError(
                f'plugins "{plugin}" and "{other}" both tried to set {subject}',
                plugin=plugin,
                other=other,
                field=subject,
            )
        self._set(ctr_id, field_id, key, plugin)

    def clear(self, ctr_id: str, field_id: int, plugin: str, key: str | None = None) -> None:
        self._set(ctr_id, field_id, key, REMOVAL_PREFIX + plugin)

    def owner(self, ctr_id: str, field_id: int, key: str | None = None) -> str | None:
        if key is None:
            return self._simple.get(ctr_id, {}).get(field_id)
        return self._compound.get(ctr_id, {}).get(field_id, {}).get(key)

    def _set(self, ctr_id: str, field_id: int, key: str | None, value: str) -> None:
        if key is None:
            self._simple.setdefault(ctr_id, {})[field_id] = value
        else:
            self._compound.setdefault(ctr_id, {}).setdefault(field_id, {})[key] = value

    def to_pb(self) -> pb.OwningPlugins:
        """The OwningPlugins message a validator receives."""
        msg = pb.OwningPlugins()
        for ctr_id in dict.fromkeys([*self._simple, *self._compound]):
            entry = msg.owners[ctr_id]
            for field_id, plugin in self._simple.get(ctr_id, {}).items():
                entry.simple[field_id] = plugin
            for field_id, keys in self._compound.get(ctr_id, {}).items():
                compound = entry.compound[field_id]
                compound.SetInParent()
                for key, plugin in keys.items():
                    compound.owners[key] = plugin
        return msg


# --- collecting --------------------------------------------------------------------------


def _copy_wrapped(src: object, dst: object, name: str) -> None:
    getattr(dst, name).CopyFrom(getattr(src, name))


def _copy_strings(src: pb.LinuxCPU, dst: pb.LinuxCPU) -> None:
    """cpus and mems: empty means unchanged (NRI cannot express an empty cpuset)."""
    for f in _CPU_STRINGS:
        value = getattr(src, f.name)
        if value:
            setattr(dst, f.name, value)


def _merge_resources(
    src: pb.LinuxResources,
    targets: Sequence[pb.LinuxResources],
    owners: Owners,
    ctr_id: str,
    plugin: str,
    *,
    take_pids: bool,
    take_devices: bool,
) -> None:
    """Claim and copy every resource field `src` sets into each of `targets`."""
    if src.HasField("memory"):
        for f in _MEMORY_WRAPPED:
            if src.memory.HasField(f.name):
                owners.claim(ctr_id, f.field_id, plugin)
                for t in targets:
                    _copy_wrapped(src.memory, t.memory, f.name)
    if src.HasField("cpu"):
        for f in _CPU_WRAPPED:
            if src.cpu.HasField(f.name):
                owners.claim(ctr_id, f.field_id, plugin)
                for t in targets:
                    _copy_wrapped(src.cpu, t.cpu, f.name)
        for f in _CPU_STRINGS:
            value = getattr(src.cpu, f.name)
            if value:
                owners.claim(ctr_id, f.field_id, plugin)
                for t in targets:
                    setattr(t.cpu, f.name, value)
    for limit in src.hugepage_limits:
        owners.claim(ctr_id, F.HugepageLimits, plugin, limit.page_size)
        for t in targets:
            t.hugepage_limits.add().CopyFrom(limit)
    if take_devices:
        for rule in src.devices:
            for t in targets:
                t.devices.add().CopyFrom(rule)
    for key, value in src.unified.items():
        owners.claim(ctr_id, F.CgroupsUnified, plugin, key)
        for t in targets:
            t.unified[key] = value
    for name, field_id in (("blockio_class", F.BlockioClass), ("rdt_class", F.RdtClass)):
        if src.HasField(name):
            owners.claim(ctr_id, field_id, plugin)
            for t in targets:
                _copy_wrapped(src, t, name)
    if take_pids and src.HasField("pids"):
        owners.claim(ctr_id, F.PidsLimit, plugin)
        for t in targets:
            t.pids.limit = src.pids.limit


def _init_resources(res: pb.LinuxResources) -> None:
    """NRI's result initialisation: memory and cpu are always present (empty)."""
    res.memory.SetInParent()
    res.cpu.SetInParent()


def prepare_create_request(container: pb.Container) -> None:
    """What NRI does to a CreateContainer request before any plugin sees it: hooks, linux,
    linux.resources and its memory and cpu become present (empty when missing). This is
    why every captured CreateContainer request carries `hooks: {}`."""
    container.hooks.SetInParent()
    container.linux.SetInParent()
    container.linux.resources.SetInParent()
    _init_resources(container.linux.resources)


def empty_adjustment() -> pb.ContainerAdjustment:
    """The merged adjustment before any plugin answered, as NRI builds it."""
    adjust = pb.ContainerAdjustment()
    adjust.hooks.SetInParent()
    adjust.linux.resources.SetInParent()
    _init_resources(adjust.linux.resources)
    return adjust


def _env_key(entry: str) -> str:
    return entry.split("=", 1)[0]


class UpdateCollector:
    """Per-container resource updates from one event's replies, merged in plugin order.

    `target_id`/`requested`: the container of an UpdateContainer event and the resources
    the CRI call asked for; its entries are folded into `requested` (§7.3).
    `creating_id`: the container of a CreateContainer event, which nobody may update.
    """

    def __init__(
        self,
        owners: Owners,
        *,
        creating_id: str | None = None,
        target_id: str | None = None,
        requested: pb.LinuxResources | None = None,
    ) -> None:
        self._owners = owners
        self._creating_id = creating_id
        self._target_id = target_id
        self.requested = requested
        self._by_id: dict[str, pb.ContainerUpdate] = {}
        self.updates: list[pb.ContainerUpdate] = []  # other containers, first-seen order

    def add(self, plugin: str, updates: Iterable[pb.ContainerUpdate]) -> None:
        for upd in updates:
            entry = self._entry(plugin, upd)
            try:
                self._merge(plugin, entry, upd)
            except OwnershipConflictError:
                if not upd.ignore_failure:
                    raise

    def _entry(self, plugin: str, upd: pb.ContainerUpdate) -> pb.ContainerUpdate:
        ctr_id = upd.container_id
        if ctr_id == self._creating_id:
            raise AdjustmentError(f'plugin "{plugin}" asked update of "{ctr_id}" during creation')
        entry = self._by_id.get(ctr_id)
        if entry is not None:
            entry.ignore_failure = entry.ignore_failure and upd.ignore_failure
            return entry
        entry = pb.ContainerUpdate(container_id=ctr_id, ignore_failure=upd.ignore_failure)
        _init_resources(entry.linux.resources)
        self._by_id[ctr_id] = entry
        if ctr_id != self._target_id:
            self.updates.append(entry)
        return entry

    def _merge(self, plugin: str, entry: pb.ContainerUpdate, upd: pb.ContainerUpdate) -> None:
        if not upd.HasField("linux") or not upd.linux.HasField("resources"):
            return
        target = self.requested if upd.container_id == self._target_id else None
        work = pb.LinuxResources()
        work.CopyFrom(target if target is not None else entry.linux.resources)
        # pids of an update are dropped by the adaptation itself (§6.8): it keeps the
        # value it already had. Devices are not part of an update either.
        _merge_resources(
            upd.linux.resources,
            [work],
            self._owners,
            upd.container_id,
            plugin,
            take_pids=False,
            take_devices=False,
        )
        entry.linux.resources.CopyFrom(work)
        if target is not None:
            target.CopyFrom(work)


@dataclass(slots=True)
class CreateResult:
    adjust: pb.ContainerAdjustment
    updates: list[pb.ContainerUpdate]
    owners: pb.OwningPlugins
    ignored: list[str] = field(default_factory=list)  # "plugin: field" not emulated
    evictions: int = 0


class CreateMerge:
    """Collects the CreateContainer replies of one event (NRI's `result` for it).

    `request` is the CreateContainer request's container; it is mutated in place so each
    plugin sees the earlier plugins' changes, exactly like the real adaptation.
    """

    def __init__(self, request: pb.Container, flavor: RuntimeFlavor) -> None:
        self.request = request
        self.flavor = flavor
        self.owners = Owners(legacy_messages=not flavor.field_names_in_conflicts)
        self.adjust = empty_adjustment()
        self.updates = UpdateCollector(self.owners, creating_id=request.id)
        self.ignored: list[str] = []
        self.evictions = 0

    def apply(self, plugin: str, reply: pb.CreateContainerResponse) -> None:
        """Merge one plugin's reply; raises AdjustmentError (incl. ownership conflicts)."""
        if reply.HasField("adjust"):
            self._adjust(plugin, reply.adjust)
        self.updates.add(plugin, reply.update)
        self.evictions += len(reply.evict)

    def result(self) -> CreateResult:
        return CreateResult(
            adjust=self.adjust,
            updates=list(self.updates.updates),
            owners=self.owners.to_pb(),
            ignored=list(self.ignored),
            evictions=self.evictions,
        )

    # --- per field ---------------------------------------------------------------------

    def _adjust(self, plugin: str, adj: pb.ContainerAdjustment) -> None:
        self._annotations(plugin, adj)
        self._note_unmodelled(plugin, adj)
        self._env(plugin, adj)
        if adj.HasField("linux"):
            self._linux(plugin, adj.linux)

    def _annotations(self, plugin: str, adj: pb.ContainerAdjustment) -> None:
        if not adj.annotations:
            return
        ctr_id = self.request.id
        removed = {k[len(REMOVAL_PREFIX) :] for k in adj.annotations if k.startswith("-")}
        for key, value in adj.annotations.items():
            if key.startswith(REMOVAL_PREFIX):
                continue
            if key in removed:  # removed and set again by the same plugin
                self.owners.clear(ctr_id, F.Annotations, plugin, key)
                self.request.annotations.pop(key, None)
                self.adjust.annotations[REMOVAL_PREFIX + key] = ""
                removed.discard(key)
            self.owners.claim(ctr_id, F.Annotations, plugin, key)
            self.request.annotations[key] = value
            self.adjust.annotations[key] = value
        # A pure removal only travels in the merged adjustment (the runtime removes the
        # annotation from the spec); NRI neither touches the request nor the ownership.
        for key in removed:
            self.adjust.annotations[REMOVAL_PREFIX + key] = ""

    def _env(self, plugin: str, adj: pb.ContainerAdjustment) -> None:
        if not adj.env:
            return
        ctr_id = self.request.id
        removed = {kv.key[len(REMOVAL_PREFIX) :] for kv in adj.env if kv.key.startswith("-")}
        added = [kv for kv in adj.env if not kv.key.startswith(REMOVAL_PREFIX)]
        modified = {kv.key for kv in added}
        kept = []
        for kv in self.adjust.env:
            if kv.key in removed:
                self.owners.clear(ctr_id, F.Env, plugin, kv.key)
            else:
                kept.append(kv)
        del self.adjust.env[:]
        self.adjust.env.extend(kept)
        # The request loses removed and modified variables; additions go to the end.
        # Removal markers never reach the merged adjustment: a removal only undoes what
        # earlier plugins added in this event, not what the container spec already has.
        env = [e for e in self.request.env if _env_key(e) not in removed | modified]
        for kv in added:
            self.owners.claim(ctr_id, F.Env, plugin, kv.key)
            self.adjust.env.add(key=kv.key, value=kv.value)
        env.extend(f"{kv.key}={kv.value}" for kv in added)
        del self.request.env[:]
        self.request.env.extend(env)

    def _linux(self, plugin: str, linux: pb.LinuxContainerAdjustment) -> None:
        ctr_id = self.request.id
        target = self.request.linux
        merged = self.adjust.linux
        if linux.HasField("resources"):
            _merge_resources(
                linux.resources,
                [target.resources, merged.resources],
                self.owners,
                ctr_id,
                plugin,
                take_pids=self.flavor.applies_pids,
                take_devices=True,
            )
            if linux.resources.HasField("pids") and not self.flavor.applies_pids:
                self.ignored.append(f"{plugin}: linux.resources.pids (unknown to NRI {self._v})")
        if linux.cgroups_path:
            self.owners.claim(ctr_id, F.CgroupsPath, plugin)
            target.cgroups_path = linux.cgroups_path
            merged.cgroups_path = linux.cgroups_path
        if linux.HasField("oom_score_adj"):
            if self.flavor.applies_oom_score_adj:
                self.owners.claim(ctr_id, F.OomScoreAdj, plugin)
                target.oom_score_adj.CopyFrom(linux.oom_score_adj)
                merged.oom_score_adj.CopyFrom(linux.oom_score_adj)
            else:
                self.ignored.append(f"{plugin}: linux.oom_score_adj (unknown to NRI {self._v})")
        if linux.HasField("rdt"):
            if self.flavor.applies_rdt:
                self._rdt(plugin, linux.rdt)
            else:
                self.ignored.append(f"{plugin}: linux.rdt (unknown to NRI {self._v})")

    def _rdt(self, plugin: str, rdt: pb.LinuxRdt) -> None:
        ctr_id = self.request.id
        merged = self.adjust.linux.rdt
        if rdt.remove:
            for field_id in (F.RdtClosID, F.RdtSchemata, F.RdtEnableMonitoring):
                self.owners.clear(ctr_id, field_id, plugin)
            merged.Clear()
            merged.remove = True
        for name, field_id in (
            ("clos_id", F.RdtClosID),
            ("schemata", F.RdtSchemata),
            ("enable_monitoring", F.RdtEnableMonitoring),
        ):
            if rdt.HasField(name):
                self.owners.claim(ctr_id, field_id, plugin)
                _copy_wrapped(rdt, merged, name)
                merged.remove = False
        merged.SetInParent()

    def _note_unmodelled(self, plugin: str, adj: pb.ContainerAdjustment) -> None:
        names = [
            n
            for n, present in (
                ("mounts", bool(adj.mounts)),
                ("hooks", adj.HasField("hooks") and adj.hooks.ByteSize() > 0),
                ("rlimits", bool(adj.rlimits)),
                ("CDI_devices", bool(adj.CDI_devices)),
                ("args", bool(adj.args)),
            )
            if present
        ]
        if adj.HasField("linux"):
            linux = adj.linux
            names += [
                f"linux.{n}"
                for n, present in (
                    ("devices", bool(linux.devices)),
                    ("io_priority", linux.HasField("io_priority")),
                    ("seccomp_policy", linux.HasField("seccomp_policy")),
                    ("namespaces", bool(linux.namespaces)),
                    ("sysctl", bool(linux.sysctl)),
                    ("net_devices", bool(linux.net_devices)),
                    ("scheduler", linux.HasField("scheduler")),
                    ("memory_policy", linux.HasField("memory_policy")),
                )
                if present
            ]
        self.ignored.extend(f"{plugin}: {n} (not emulated)" for n in names)

    @property
    def _v(self) -> str:
        return str(self.flavor.nri_version)


# --- applying ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClassChanges:
    """Class-based resources an adjustment changed. They live outside the NRI container
    view: runtimes resolve them into OCI blockIO / intelRdt settings, which NRI does not
    report back. None = unchanged, "" = cleared."""

    blockio_class: str | None = None
    rdt_class: str | None = None


def apply_adjustment(
    spec: pb.Container, adjust: pb.ContainerAdjustment, flavor: RuntimeFlavor
) -> ClassChanges:
    """Apply a merged adjustment to a container spec the way NRI's OCI generator (used
    by containerd and CRI-O) does, limited to what `flavor`'s NRI version knows (§6.7)."""
    removals = [k for k in adjust.annotations if k.startswith(REMOVAL_PREFIX)]
    for key in removals:  # removals first: Go's map order makes the mix undefined
        spec.annotations.pop(key[len(REMOVAL_PREFIX) :], None)
    for key, value in adjust.annotations.items():
        if not key.startswith(REMOVAL_PREFIX):
            spec.annotations[key] = value
    new_env = adjust_env(list(spec.env), [(kv.key, kv.value) for kv in adjust.env])
    del spec.env[:]
    spec.env.extend(new_env)
    if not adjust.HasField("linux"):
        return ClassChanges()
    linux = adjust.linux
    blockio: str | None = None
    rdt: str | None = None
    if linux.HasField("resources"):
        res = linux.resources
        _apply_spec_resources(spec.linux.resources, res, flavor)
        if res.HasField("blockio_class"):
            blockio = res.blockio_class.value
        if res.HasField("rdt_class"):
            rdt = res.rdt_class.value
    if linux.cgroups_path:
        spec.linux.cgroups_path = linux.cgroups_path
    if flavor.applies_oom_score_adj and linux.HasField("oom_score_adj"):
        spec.linux.oom_score_adj.CopyFrom(linux.oom_score_adj)
    if flavor.applies_rdt and linux.HasField("rdt"):
        if linux.rdt.remove:
            rdt = ""
        if linux.rdt.HasField("clos_id"):
            rdt = linux.rdt.clos_id.value
    return ClassChanges(blockio_class=blockio, rdt_class=rdt)


def adjust_env(env: list[str], changes: Sequence[tuple[str, str]]) -> list[str]:
    """The generator's env rule: when anything is adjusted, the environment is rebuilt
    keyed by name (first position wins, last value wins, entries without "=" dropped),
    adjusted names are replaced in place or removed, new ones appended."""
    if not changes:
        return env
    wanted: dict[str, tuple[str, str]] = {}
    for key, value in changes:
        wanted[key.removeprefix(REMOVAL_PREFIX)] = (key, value)
    out: list[str] = []
    index: dict[str, int] = {}

    def put(key: str, value: str) -> None:
        if key in index:
            out[index[key]] = f"{key}={value}"
        else:
            index[key] = len(out)
            out.append(f"{key}={value}")

    for entry in env:
        if "=" not in entry:
            continue
        key, value = entry.split("=", 1)
        if key in wanted:
            marked_key, new_value = wanted.pop(key)
            if not marked_key.startswith(REMOVAL_PREFIX):
                put(key, new_value)
            continue
        put(key, value)
    for key, value in changes:
        if not key.startswith(REMOVAL_PREFIX) and key in wanted:
            put(key, value)
    return out


def _set_hugepage(target: pb.LinuxResources, limit: pb.HugepageLimit) -> None:
    for existing in target.hugepage_limits:
        if existing.page_size == limit.page_size:
            existing.limit = limit.limit
            return
    target.hugepage_limits.add().CopyFrom(limit)


def _apply_spec_resources(
    target: pb.LinuxResources, res: pb.LinuxResources, flavor: RuntimeFlavor
) -> None:
    if res.HasField("cpu"):
        for f in _CPU_WRAPPED:
            if res.cpu.HasField(f.name):
                _copy_wrapped(res.cpu, target.cpu, f.name)
        _copy_strings(res.cpu, target.cpu)
    if res.HasField("memory") and res.memory.limit.value != 0:
        target.memory.limit.value = res.memory.limit.value
        target.memory.swap.value = res.memory.limit.value
    for limit in res.hugepage_limits:
        _set_hugepage(target, limit)
    for key, value in res.unified.items():
        target.unified[key] = value
    if flavor.applies_pids and res.HasField("pids"):
        target.pids.limit = res.pids.limit
    if flavor.applies_device_rules:
        for rule in res.devices:
            target.devices.add().CopyFrom(rule)


def apply_update(target: pb.LinuxResources, update: pb.LinuxResources, scope: UpdateScope) -> None:
    """Apply one container update through the runtime's update path (§6.8)."""
    if scope is UpdateScope.CRI:
        if update.memory.limit.value != 0:
            target.memory.limit.value = update.memory.limit.value
            target.memory.swap.value = update.memory.limit.value
        for f in _CPU_CRI_WRAPPED:
            value = getattr(update.cpu, f.name).value
            if value != 0:
                getattr(target.cpu, f.name).value = value
    else:
        if update.HasField("memory"):
            for f in _MEMORY_WRAPPED:
                if update.memory.HasField(f.name):
                    _copy_wrapped(update.memory, target.memory, f.name)
            if update.memory.HasField("limit") and not update.memory.HasField("swap"):
                target.memory.swap.value = update.memory.limit.value
        if update.HasField("cpu"):
            for f in _CPU_WRAPPED:
                if update.cpu.HasField(f.name):
                    _copy_wrapped(update.cpu, target.cpu, f.name)
        if update.HasField("pids"):
            target.pids.limit = update.pids.limit
    _copy_strings(update.cpu, target.cpu)
    for limit in update.hugepage_limits:
        _set_hugepage(target, limit)
    for key, value in update.unified.items():
        target.unified[key] = value
