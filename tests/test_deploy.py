"""The Kubernetes manifests and the Helm chart: they parse, the DaemonSet has exactly the
access the agent needs (and no more), RBAC grants exactly the listed verbs, the config
they ship is one the agent accepts, the liveness probe speaks the debug API's
protocol, and the chart renders to the same objects as the plain manifests.

No `helm` binary here: `render` below implements the handful of template constructs the
chart uses (values, include, if/end, and the pipes quote, nindent, toYaml, trunc,
trimSuffix, sha256sum) and fails on anything else, which keeps the templates simple.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from nri_plugin.cli import DEFAULT_CONFIG
from nri_plugin.config import parse_config
from nri_plugin.control.base import Controllers
from nri_plugin.control.executor import HostExecutor
from nri_plugin.debug.server import start_debug_server
from nri_plugin.plugin import NriPlugin, PluginSettings
from nri_plugin.policy.api import RecordingPolicy

ROOT = Path(__file__).resolve().parent.parent
PLAIN = ROOT / "deploy" / "kubernetes"
CHART = ROOT / "deploy" / "helm" / "nri-qos"

HOST_PATHS = {"/sys", "/proc", "/var/run/nri", "/run/nri-qos", "/var/run/netns"}
CAPABILITIES = {
    "SYS_ADMIN",
    "BPF",
    "PERFMON",
    "NET_ADMIN",
    "SYS_RESOURCE",
    "SYS_NICE",
    "KILL",
    "DAC_OVERRIDE",
}
RBAC = {
    ("", "pods/eviction", "create"),
    ("", "pods", "get"),
    ("", "pods", "list"),
    ("", "pods", "watch"),  # [roles] pod_spec: the roles of this node's containers
    ("", "nodes", "get"),
    ("", "nodes/status", "patch"),
    ("", "events", "create"),
    ("topology.node.k8s.io", "noderesourcetopologies", "get"),
    ("topology.node.k8s.io", "noderesourcetopologies", "create"),
    ("topology.node.k8s.io", "noderesourcetopologies", "update"),
    ("topology.node.k8s.io", "noderesourcetopologies", "patch"),
}


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def plain_objects() -> dict[str, dict[str, Any]]:
    """Every object of deploy/kubernetes, by kind (each kind occurs once)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(PLAIN.glob("*.yaml")):
        for doc in load(path):
            assert doc["kind"] not in objects, f"{path.name}: a second {doc['kind']}"
            objects[doc["kind"]] = doc
    return objects


def walk(value: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair anywhere in a document."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from walk(item)


def rules(role: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


# --------------------------------------------------------------------------- plain


def test_every_manifest_parses_and_names_its_object() -> None:
    paths = sorted(PLAIN.glob("*.yaml"))
    assert {p.name for p in paths} == {
        "namespace.yaml",
        "daemonset.yaml",
        "rbac.yaml",
        "configmap.yaml",
    }
    for path in paths:
        for doc in load(path):
            assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], path.name
    namespaced = [o for o in plain_objects().values() if o["kind"] not in _CLUSTER_SCOPED]
    assert {o["metadata"]["namespace"] for o in namespaced} == {"nri-qos"}


_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}


def pod_spec(objects: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = objects["DaemonSet"]["spec"]["template"]["spec"]
    return spec


def test_the_daemonset_has_what_a_node_agent_needs() -> None:
    objects = plain_objects()
    spec = pod_spec(objects)
    [container] = spec["containers"]
    assert spec["hostPID"] is True
    assert spec["hostNetwork"] is True and spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]  # every taint, every effect
    assert spec["serviceAccountName"] == objects["ServiceAccount"]["metadata"]["name"]
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    resources = container["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    assert "exec" in container["livenessProbe"]
    assert "exec" in container["readinessProbe"]


def test_the_daemonset_has_exactly_its_mounts() -> None:
    objects = plain_objects()
    spec = pod_spec(objects)
    [container] = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert set(volumes) == set(mounts)
    assert {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v} == HOST_PATHS
    where = {
        volumes[name]["hostPath"]["path"]: mount["mountPath"]
        for name, mount in mounts.items()
        if "hostPath" in volumes[name]
    }
    # /sys and /proc under the config's [host] root; the sockets where the agent looks
    config = parse_config(objects["ConfigMap"]["data"]["config.toml"], "configmap.yaml")
    assert where["/sys"] == str(config.host_root / "sys")
    assert where["/proc"] == str(config.host_root / "proc")
    assert where["/var/run/nri"] == str(config.plugin.socket_path.parent)
    assert where["/var/run/netns"] == "/var/run/netns"
    # mounts made on the host after the agent started (resctrl, bpffs, pod netns) show
    for name in ("host-sys", "netns"):
        assert mounts[name]["mountPropagation"] == "HostToContainer"
    assert mounts["netns"]["readOnly"] is True
    # nothing needs Bidirectional (which would require privileged)
    assert all(m.get("mountPropagation") != "Bidirectional" for m in mounts.values())
    # the config from the ConfigMap, where the command line reads it
    config_volume = next(v for v in volumes.values() if "configMap" in v)
    assert config_volume["configMap"]["name"] == objects["ConfigMap"]["metadata"]["name"]
    assert mounts[config_volume["name"]]["mountPath"] == str(DEFAULT_CONFIG.parent)
    args = container["args"]
    assert args[args.index("--config") + 1] == str(DEFAULT_CONFIG)
    debug = Path(args[args.index("--debug-socket") + 1])
    assert str(debug.parent) == where["/run/nri-qos"]
    # the only other volume is scratch for a read-only root filesystem
    others = {n for n, v in volumes.items() if "hostPath" not in v and "configMap" not in v}
    assert others == {"tmp"} and "emptyDir" in volumes["tmp"]


def test_the_daemonset_is_not_privileged_and_has_its_capabilities() -> None:
    objects = plain_objects()
    daemonset = objects["DaemonSet"]
    assert ("privileged", True) not in list(walk(daemonset))
    [container] = pod_spec(objects)["containers"]
    security = container["securityContext"]
    assert security["privileged"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == CAPABILITIES
    assert len(security["capabilities"]["add"]) == len(CAPABILITIES)
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    # The API server refuses allowPrivilegeEscalation: false with SYS_ADMIN.
    assert "allowPrivilegeEscalation" not in security
    # one comment per capability, right above it
    lines = (PLAIN / "daemonset.yaml").read_text().splitlines()
    for capability in CAPABILITIES:
        index = lines.index(f"                - {capability}")
        assert lines[index - 1].strip().startswith("#"), capability


def test_rbac_grants_exactly_the_listed_verbs() -> None:
    objects = plain_objects()
    assert rules(objects["ClusterRole"]) == RBAC
    binding = objects["ClusterRoleBinding"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": objects["ClusterRole"]["metadata"]["name"],
    }
    account = objects["ServiceAccount"]["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]


def test_the_shipped_config_is_accepted_by_the_agent() -> None:
    config = parse_config(plain_objects()["ConfigMap"]["data"]["config.toml"], "configmap.yaml")
    assert config.host_root == Path("/host")
    assert config.log.target == "stderr"  # kubectl logs
    # in the cluster the pod specs tell sidecars from init containers
    assert config.roles.wanted({"KUBERNETES_SERVICE_HOST": "10.96.0.1"})[0]


def test_the_namespace_admits_the_critical_pods() -> None:
    objects = plain_objects()
    quota = objects["ResourceQuota"]
    assert quota["metadata"]["namespace"] == objects["Namespace"]["metadata"]["name"]
    [expression] = quota["spec"]["scopeSelector"]["matchExpressions"]
    assert expression["scopeName"] == "PriorityClass"
    assert pod_spec(objects)["priorityClassName"] in expression["values"]
    labels = objects["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"


async def _probe(command: list[str]) -> int:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    process = await asyncio.create_subprocess_exec(*command, env=env)
    return await asyncio.wait_for(process.wait(), 30)


async def test_the_liveness_probe_asks_the_debug_api(tmp_path: Path) -> None:
    [container] = pod_spec(plain_objects())["containers"]
    args = container["args"]
    manifest_socket = args[args.index("--debug-socket") + 1]
    command = container["livenessProbe"]["exec"]["command"]
    assert command[:2] == ["nri-qos", "status"] and manifest_socket in command
    socket_path = tmp_path / "debug.sock"
    local = [sys.executable, "-m", "nri_plugin", *command[1:]]
    local[local.index(manifest_socket)] = str(socket_path)

    assert await _probe(local) != 0  # no agent: not alive

    policy = RecordingPolicy()
    plugin = NriPlugin(policy, PluginSettings(socket_path=tmp_path / "nri.sock"))
    executor = HostExecutor(Controllers([]))
    server = await start_debug_server(socket_path, plugin, policy, executor)
    try:
        assert await _probe(local) == 0
    finally:
        await server.stop()
        plugin.close()
        executor.close()


async def test_the_readiness_probe_is_ready_only_once_registered_and_synchronized(
    tmp_path: Path,
) -> None:
    """`nri-qos ready`: not ready without an agent, nor while the agent waits for its
    runtime; ready once the runtime registered and synchronized it; not ready again when
    the runtime goes away. The liveness probe stays as it was (a restart is not wanted
    for a missing runtime)."""
    [container] = pod_spec(plain_objects())["containers"]
    args = container["args"]
    manifest_socket = args[args.index("--debug-socket") + 1]
    probe = container["readinessProbe"]
    command = probe["exec"]["command"]
    assert command[:2] == ["nri-qos", "ready"] and manifest_socket in command
    assert container["livenessProbe"]["exec"]["command"][:2] == ["nri-qos", "status"]
    assert probe["timeoutSeconds"] >= 5  # the client waits up to 10 s for a busy agent
    socket_path = tmp_path / "debug.sock"
    local = [sys.executable, "-m", "nri_plugin", *command[1:]]
    local[local.index(manifest_socket)] = str(socket_path)

    assert await _probe(local) != 0  # no agent: not ready

    from embedded_runtime import CONTAINERD_2_3, EmbeddedRuntime, InMemoryBackend

    policy = RecordingPolicy()
    settings = PluginSettings(socket_path=tmp_path / "nri.sock", backoff_initial=0.05)
    plugin = NriPlugin(policy, settings)
    executor = HostExecutor(Controllers([]))
    server = await start_debug_server(socket_path, plugin, policy, executor)
    runner = asyncio.create_task(plugin.run())
    runtime = EmbeddedRuntime(
        tmp_path / "nri.sock", flavor=CONTAINERD_2_3, backend=InMemoryBackend()
    )
    try:
        assert await _probe(local) == 1  # alive, but no runtime: not ready
        await runtime.start()
        await runtime.wait_for_plugins(1)
        assert await _probe(local) == 0
        await runtime.stop()
        await asyncio.wait_for(plugin.disconnected.wait(), 10)
        assert await _probe(local) == 1
    finally:
        plugin.stop()
        await asyncio.gather(runner, return_exceptions=True)
        await runtime.stop()
        await server.stop()
        plugin.close()
        executor.close()


# --------------------------------------------------------------------------- helm

_TOKEN = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
_DEFINE = re.compile(r'\{\{-?\s*define\s+"([^"]+)"\s*-\}\}(.*?)\{\{-\s*end\s*-?\}\}', re.S)


class Renderer:
    """The subset of Helm's templates the chart uses (see the module docstring)."""

    def __init__(self, chart: Path, overrides: Mapping[str, Any] | None = None) -> None:
        values = yaml.safe_load((chart / "values.yaml").read_text())
        for dotted, value in (overrides or {}).items():
            *parents, last = dotted.split(".")
            node = values
            for key in parents:
                node = node[key]
            node[last] = value
        meta = yaml.safe_load((chart / "Chart.yaml").read_text())
        self.context: dict[str, Any] = {
            "Values": values,
            "Release": {"Name": "nri-qos", "Namespace": "nri-qos", "Service": "Helm"},
            "Chart": {
                "Name": meta["name"],
                "Version": meta["version"],
                "AppVersion": meta["appVersion"],
            },
        }
        self.defines: dict[str, str] = {}
        for helper in (chart / "templates").glob("_*.tpl"):
            text = helper.read_text()
            for match in _DEFINE.finditer(text):
                self.defines[match.group(1)] = match.group(2).strip()
            rest = _TOKEN.sub(
                lambda m: "" if m.group(2).startswith("/*") else m.group(0),
                _DEFINE.sub("", text),
            )
            assert not rest.strip(), f"{helper.name}: only defines and comments: {rest!r}"

    def objects(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for template in sorted((CHART / "templates").glob("*.yaml")):
            text = self.render(template.read_text())
            for doc in yaml.safe_load_all(text):
                if doc is not None:
                    assert doc["kind"] not in out
                    out[doc["kind"]] = doc
        return out

    def render(self, text: str) -> str:
        out: list[str] = []
        emit: list[bool] = []
        position = 0
        trim_next = False
        for match in _TOKEN.finditer(text):
            literal = text[position : match.start()]
            if trim_next:
                literal = literal.lstrip()
            if match.group(1):
                literal = literal.rstrip()
            if all(emit):
                out.append(literal)
            position, trim_next = match.end(), bool(match.group(3))
            action = match.group(2)
            if action.startswith("/*"):
                continue
            if action.startswith("if "):
                emit.append(bool(self.value(action[3:].strip())))
            elif action == "end":
                emit.pop()
            elif all(emit):
                out.append(self.evaluate(action))
        assert not emit, "an if without its end"
        tail = text[position:]
        out.append(tail.lstrip() if trim_next else tail)
        return "".join(out)

    def value(self, term: str) -> Any:
        if term.startswith('"'):
            return json.loads(term)
        assert term.startswith("."), f"the renderer knows no {term!r}: keep templates simple"
        node: Any = self.context
        for key in term[1:].split("."):
            node = node[key]
        return node

    def evaluate(self, action: str) -> str:
        first, *pipes = (part.strip() for part in action.split("|"))
        words = first.split()
        result: Any
        if words[0] == "include":
            assert words[2:] == ["."], action
            result = self.render(self.defines[json.loads(words[1])])
        elif words[0] == "toYaml":
            result = yaml.safe_dump(self.value(words[1]), sort_keys=True).rstrip("\n")
        else:
            assert len(words) == 1, f"the renderer knows no {first!r}"
            result = self.value(words[0])
        for pipe in pipes:
            name, *arguments = pipe.split()
            text = _string(result)
            if name == "quote":
                result = json.dumps(text)
            elif name in ("indent", "nindent"):
                pad = " " * int(arguments[0])
                result = ("\n" if name == "nindent" else "") + pad + text.replace("\n", "\n" + pad)
            elif name == "trunc":
                result = text[: int(arguments[0])]
            elif name == "trimSuffix":
                suffix = json.loads(arguments[0])
                result = text[: -len(suffix)] if text.endswith(suffix) else text
            elif name == "sha256sum":
                result = hashlib.sha256(text.encode()).hexdigest()
            else:
                raise AssertionError(f"the renderer knows no pipe {name!r}: keep templates simple")
        return _string(result)


def _string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _essentials(obj: Mapping[str, Any]) -> dict[str, Any]:
    """An object without what the chart adds on purpose: labels, selectors, annotations."""
    out = copy.deepcopy(dict(obj))
    out["metadata"].pop("labels", None)
    if obj["kind"] == "DaemonSet":
        out["spec"].pop("selector")
        out["spec"]["template"].pop("metadata")
    return out


def test_the_chart_parses() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["name"] == "nri-qos"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    parse_config(values["config"], "values.yaml config")


def test_the_chart_renders_the_plain_manifests() -> None:
    rendered = Renderer(CHART, {"namespace.create": True}).objects()
    plain = plain_objects()
    assert set(rendered) == set(plain)
    for kind, obj in plain.items():
        assert _essentials(rendered[kind]) == _essentials(obj), kind
    assert rules(rendered["ClusterRole"]) == RBAC
    namespace_labels = rendered["Namespace"]["metadata"]["labels"]
    assert namespace_labels["pod-security.kubernetes.io/enforce"] == "privileged"


def test_the_chart_selects_its_pods_and_rolls_them_on_a_config_change() -> None:
    renderer = Renderer(CHART)
    rendered = renderer.objects()
    assert "Namespace" not in rendered  # helm install --create-namespace makes it
    daemonset = rendered["DaemonSet"]
    selector = daemonset["spec"]["selector"]["matchLabels"]
    template = daemonset["spec"]["template"]["metadata"]
    assert selector.items() <= template["labels"].items()
    assert selector.items() <= daemonset["metadata"]["labels"].items()
    config = renderer.context["Values"]["config"]
    checksum = hashlib.sha256(config.encode()).hexdigest()
    assert template["annotations"]["checksum/config"] == checksum
    assert rendered["ConfigMap"]["data"]["config.toml"] == config


@pytest.mark.parametrize("hostnetwork", [True, False])
def test_the_chart_renders_its_values(hostnetwork: bool) -> None:
    rendered = Renderer(
        CHART, {"hostNetwork": hostnetwork, "image.tag": "9.9", "resources": {}}
    ).objects()
    spec = rendered["DaemonSet"]["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is hostnetwork
    assert spec["containers"][0]["image"].endswith(":9.9")
    assert spec["containers"][0]["resources"] == {}
