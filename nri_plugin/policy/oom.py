"""oom_score_adj bands per QoS class, and where a container sits inside its class's band.

Rules:

* Pure. `decide_oom_score_adj` maps a class, a Kubernetes QoS and a Katalyst oom_priority
  to the value we want, with a reason that quotes its numbers. Applying the value is the
  host adapter's job. A writer without CAP_SYS_RESOURCE cannot set a value below the floor
  that a privileged writer last set; it can only raise the value. The adapter has to deal
  with that, so we return the value we want, not the value the host will accept.
* Lower oom_score_adj survives longer. The kernel adds `adj * (RAM + swap) / 1000` to each
  process's footprint, so two processes more than 1000 apart die in strict order whatever
  their sizes. Closer than that, their size counts too.
* The bands are disjoint and ordered. system_cores is lowest, then dedicated_cores and
  shared_cores, and reclaimed_cores is highest: reclaimed dies first and system last.
  `OomBands` refuses any other layout. It also refuses -1000 (OOM_SCORE_ADJ_MIN), which
  exempts a process from the OOM killer entirely.

Default bands:

    system_cores     -998 .. -900
    dedicated_cores  -899 .. -500
    shared_cores     -499 ..  499
    reclaimed_cores   500 .. 1000

Why these numbers. Nothing goes below -998, because the kubelet and kube-proxy run at
-999 (pkg/kubelet/qos/policy.go) and the node agents must outlive every pod. reclaimed
ends at 1000, the kubelet's BestEffort value, so batch work on idle capacity dies first, as
it does in plain Kubernetes. shared straddles 0, the value of host daemons such as sshd.
Unannotated Burstable containers sit above 0, as the kubelet places them (3..999), and
Guaranteed ones sit below it, as the kubelet's -997 does. system and reclaimed are at least
1400 apart, so their order is strict.

Where a container sits in its band. Katalyst gives each class the oom_priority range
[base, base + 99]: reclaimed -100, shared 0, dedicated 100, system 200. A higher value
survives longer (katalyst-api pkg/consts/qos.go; katalyst-core pkg/util/qos/
oom_priority.go; kubewharf/katalyst-core#216). The offset `p - base` maps linearly onto
the band: offset 0 gives the band's highest value and offset 99 its lowest, so a higher
priority never gives a higher value.

* 300 means never kill. It gets the lowest value of the whole configuration, which is the
  system band's lowest.
* Any other out-of-range priority, 301 included, is clamped into the class range as Katalyst
  does. The scale is therefore monotonic only up to 300.
* With no priority, or -300 (opted out), Katalyst uses the class's lowest priority, whatever
  the Kubernetes QoS. We still want the kubelet's order inside one class, so unannotated
  containers get a fixed offset by Kubernetes QoS. BestEffort or unknown is 0 (Katalyst's
  default), Burstable is 33 and Guaranteed is 66. An annotation can still place a
  container anywhere in the band. With the defaults, BestEffort in reclaimed gets 1000, the
  kubelet's own value. Burstable and Guaranteed in shared get 166 and -166. Guaranteed in
  dedicated gets -766, and Guaranteed in system gets -965.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from itertools import pairwise
from types import MappingProxyType
from typing import Final

from nri_plugin.policy.kube_qos import KubeQos
from nri_plugin.policy.qos import (
    OOM_PRIORITY_IGNORE,
    OOM_PRIORITY_SPAN,
    OOM_PRIORITY_TOP,
    QosClass,
    oom_priority_range,
)

OOM_SCORE_ADJ_MIN: Final = -1000  # the kernel's "never kill"; refused in bands
OOM_SCORE_ADJ_MAX: Final = 1000

# offsets inside the class's priority range for containers without an oom_priority
UNANNOTATED_OFFSET: Final[Mapping[KubeQos | None, int]] = MappingProxyType(
    {None: 0, KubeQos.BEST_EFFORT: 0, KubeQos.BURSTABLE: 33, KubeQos.GUARANTEED: 66}
)

# most protected first: each band must lie entirely below the next
_ORDER: Final = (
    QosClass.SYSTEM_CORES,
    QosClass.DEDICATED_CORES,
    QosClass.SHARED_CORES,
    QosClass.RECLAIMED_CORES,
)


class OomBandsError(ValueError):
    """OOM band config that cannot work; the message names the band and its numbers."""


@dataclass(frozen=True, slots=True)
class OomBand:
    """An inclusive oom_score_adj range; `lowest` is the most protected end."""

    lowest: int
    highest: int

    def __post_init__(self) -> None:
        for name in ("lowest", "highest"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise OomBandsError(f"oom band: {name} must be an integer, got {value!r}")
        if not OOM_SCORE_ADJ_MIN < self.lowest <= self.highest <= OOM_SCORE_ADJ_MAX:
            raise OomBandsError(
                f"oom band [{self.lowest}, {self.highest}]: need "
                f"{OOM_SCORE_ADJ_MIN} < lowest <= highest <= {OOM_SCORE_ADJ_MAX} "
                f"({OOM_SCORE_ADJ_MIN} would exempt the containers from the OOM killer)"
            )

    def __str__(self) -> str:
        return f"[{self.lowest}, {self.highest}]"


@dataclass(frozen=True, slots=True)
class OomBands:
    """One band per class, disjoint and ordered so that reclaimed dies first, system last."""

    system_cores: OomBand = OomBand(-998, -900)
    dedicated_cores: OomBand = OomBand(-899, -500)
    shared_cores: OomBand = OomBand(-499, 499)
    reclaimed_cores: OomBand = OomBand(500, 1000)

    def __post_init__(self) -> None:
        for f in fields(self):
            if not isinstance(getattr(self, f.name), OomBand):
                raise OomBandsError(f"oom bands: {f.name} must be an OomBand")
        for lower, upper in pairwise(_ORDER):
            low_band, up_band = self.band(lower), self.band(upper)
            if low_band.highest >= up_band.lowest:
                raise OomBandsError(
                    f"oom bands: {upper} {up_band} must lie entirely above {lower} {low_band} "
                    "(reclaimed_cores dies first, system_cores last, and bands must not overlap)"
                )

    def band(self, qos_class: QosClass) -> OomBand:
        band: OomBand = getattr(self, qos_class.value)
        return band

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> OomBands:
        """Bands from config, e.g. {"shared_cores": [-400, 400]}; absent classes keep defaults."""
        known = {c.value for c in QosClass}
        bands: dict[str, OomBand] = {}
        for name, value in data.items():
            if name not in known:
                raise OomBandsError(f"oom bands: unknown class {name!r}; known: {sorted(known)}")
            if not isinstance(value, list | tuple) or len(value) != 2:
                raise OomBandsError(f"oom bands: {name} must be [lowest, highest], got {value!r}")
            try:
                bands[name] = OomBand(value[0], value[1])
            except OomBandsError as exc:
                raise OomBandsError(f"{name}: {exc}") from None
        return cls(**bands)


DEFAULT_OOM_BANDS: Final = OomBands()


@dataclass(frozen=True, slots=True)
class OomDecision:
    oom_score_adj: int
    reason: str


def decide_oom_score_adj(
    qos_class: QosClass,
    kube_qos: KubeQos | None,
    oom_priority: int | None,
    bands: OomBands = DEFAULT_OOM_BANDS,
) -> OomDecision:
    """The oom_score_adj we want for a container (see the module docstring for the rules)."""
    band = bands.band(qos_class)
    low, high = oom_priority_range(qos_class)
    if oom_priority == OOM_PRIORITY_TOP:
        value = bands.band(_ORDER[0]).lowest
        why = f"oom_priority {OOM_PRIORITY_TOP} (never kill): the lowest value of any band"
        return OomDecision(value, f"{why}, {value}")
    if oom_priority is None or oom_priority == OOM_PRIORITY_IGNORE:
        offset = UNANNOTATED_OFFSET[kube_qos]
        what = "no oom_priority" if oom_priority is None else f"oom_priority {oom_priority}"
        why = f"{what}, Kubernetes QoS {kube_qos or 'unknown'}: offset {offset} of {low}..{high}"
    else:
        clamped = min(max(oom_priority, low), high)
        offset = clamped - low
        why = f"oom_priority {oom_priority}"
        if clamped != oom_priority:
            why += f" clamped to {clamped}"
        why += f" in {low}..{high}"
    width = band.highest - band.lowest
    top = OOM_PRIORITY_SPAN - 1
    value = band.highest - (2 * offset * width + top) // (2 * top)  # rounded to nearest
    return OomDecision(value, f"{qos_class} band {band}, {why}: {value}")
