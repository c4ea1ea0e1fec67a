"""The [roles] section: whether container roles are also read from the pod spec.

```toml
[roles]
pod_spec = "auto"   # watch this node's pods on the API server: "auto", "on" or "off"
kubeconfig = ""     # "" = the pod's service account (a DaemonSet's)
node_name = ""      # "" = $NODE_NAME
```

"auto" watches when there is a cluster to ask: `KUBERNETES_SERVICE_HOST` is set (a pod)
or `kubeconfig` names a file. "on" insists, and says in the status why it cannot;
"off" never asks. Annotations and the kubelet's container type work either way
(docs/kubernetes.md, "Container roles"; the watch is `nri_plugin.podspec`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

POD_SPEC_MODES = ("auto", "on", "off")
_KEYS = {"pod_spec", "kubeconfig", "node_name"}


class RolesSectionError(ValueError):
    """A bad key or value; the message names it."""


@dataclass(frozen=True, slots=True)
class RolesSettings:
    pod_spec: str = "auto"
    kubeconfig: str = ""
    node_name: str = ""

    def wanted(self, environ: Mapping[str, str]) -> tuple[bool, str]:
        """Whether to watch the pod specs, and why (the status shows the reason)."""
        if self.pod_spec == "off":
            return False, "off ([roles] pod_spec = off)"
        if self.pod_spec == "on":
            return True, "on ([roles] pod_spec = on)"
        if self.kubeconfig:
            return True, f"auto: [roles] kubeconfig = {self.kubeconfig}"
        if environ.get("KUBERNETES_SERVICE_HOST"):
            return True, "auto: in a cluster (KUBERNETES_SERVICE_HOST is set)"
        return False, "auto: not in a cluster (no KUBERNETES_SERVICE_HOST, no [roles] kubeconfig)"


def parse_roles(raw: Mapping[str, Any]) -> RolesSettings:
    table = raw.get("roles", {})
    if not isinstance(table, dict):
        raise RolesSectionError("[roles] must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise RolesSectionError(
            f"[roles] has no key(s) {sorted(unknown)}; allowed: {sorted(_KEYS)}"
        )
    for key in _KEYS:
        if not isinstance(table.get(key, ""), str):
            raise RolesSectionError(f"[roles] {key} = {table[key]!r} must be a string")
    mode = table.get("pod_spec", "auto")
    if mode not in POD_SPEC_MODES:
        raise RolesSectionError(
            f"[roles] pod_spec = {mode!r}; use one of {', '.join(POD_SPEC_MODES)}"
        )
    return RolesSettings(mode, table.get("kubeconfig", ""), table.get("node_name", ""))
