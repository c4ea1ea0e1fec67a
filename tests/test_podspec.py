"""Container roles from the pod spec: the spec -> roles mapping, the [roles] switch, and
the list + watch against a local server that speaks the API server's HTTP (the real
`kubernetes` client talks to it; tests/fake_apiserver.py)."""

from __future__ import annotations

import asyncio
import queue
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from nri_plugin.config import ConfigError, parse_config
from nri_plugin.config_roles import RolesSettings
from nri_plugin.plugin import NriPlugin
from nri_plugin.podspec import (
    PodSpecStatus,
    PodWatch,
    pod_roles_loop,
    roles_of,
    watch_from_settings,
)
from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.qos_policy import QosPolicy
from nri_plugin.policy.workload import DEDICATED, SHARED, PlannerConfig
from nri_plugin.protocol.versions import infer_runtime
from tests.builders import container, pod
from tests.fake_apiserver import PodApi, pod_object, running_pod_api
from tests.policy.sysfs_builder import MachineShape

NODE = "node-1"
TWO_NODES = MachineShape(nodes_per_die=2, cores_per_l3=4, threads_per_core=2)


# --------------------------------------------------------------------------- the mapping


@pytest.mark.parametrize(
    ("spec", "roles"),
    [
        (
            {
                "initContainers": [
                    {"name": "migrate"},
                    {"name": "envoy", "restartPolicy": "Always"},
                    {"name": "wait", "restartPolicy": "OnFailure"},  # not a sidecar
                ],
                "containers": [{"name": "app"}],
                "ephemeralContainers": [{"name": "debugger"}],
            },
            {
                "migrate": "init",
                "envoy": "sidecar",
                "wait": "init",
                "app": "app",
                "debugger": "ephemeral",
            },
        ),
        ({"containers": [{"name": "app"}, {"image": "nameless"}, "junk"]}, {"app": "app"}),
        ({"initContainers": None, "containers": "junk"}, {}),
    ],
)
def test_roles_of_a_pod_spec(spec: dict[str, Any], roles: dict[str, str]) -> None:
    assert roles_of({"spec": spec}) == roles


def test_a_pod_without_a_spec_has_no_roles() -> None:
    assert roles_of({}) == {}
    assert roles_of({"spec": []}) == {}


# --------------------------------------------------------------------------- [roles]


def test_the_switch_is_on_in_a_cluster_or_with_a_kubeconfig_only_when_auto() -> None:
    in_cluster = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    assert RolesSettings().wanted(in_cluster)[0]
    assert not RolesSettings().wanted({})[0]
    assert RolesSettings(kubeconfig="/etc/kubeconfig").wanted({})[0]
    assert RolesSettings(pod_spec="on").wanted({})[0]
    assert not RolesSettings(pod_spec="off").wanted(in_cluster)[0]


def test_the_roles_section_is_checked() -> None:
    config = parse_config('[roles]\npod_spec = "off"\nnode_name = "n1"\n')
    assert (config.roles.pod_spec, config.roles.node_name) == ("off", "n1")
    assert parse_config("").roles == RolesSettings()
    with pytest.raises(ConfigError, match=r"pod_spec = 'yes'"):
        parse_config('[roles]\npod_spec = "yes"\n')
    with pytest.raises(ConfigError, match="no key"):
        parse_config("[roles]\nwatch = true\n")


def test_off_builds_no_watch_and_says_why() -> None:
    watch, status = watch_from_settings(RolesSettings(), {})
    assert watch is None
    assert status.line() == (
        "pod-spec roles off: auto: not in a cluster (no KUBERNETES_SERVICE_HOST, "
        "no [roles] kubeconfig)"
    )
    watch, status = watch_from_settings(RolesSettings(pod_spec="on"), {})
    assert watch is None and "NODE_NAME" in status.line()


def test_on_outside_a_cluster_ends_the_thread_with_the_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    watch, status = watch_from_settings(RolesSettings(pod_spec="on", node_name=NODE), {})
    assert watch is not None
    watch.start()
    watch.stop()
    assert not status.enabled
    assert "not running in a cluster: KUBERNETES_SERVICE_HOST/PORT are not set" in status.line()
    assert "[roles] kubeconfig" in status.line()


# --------------------------------------------------------------------------- the watch


def _connect(api: PodApi) -> Callable[[], Any]:
    def connect() -> Any:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = api.url
        configuration.retries = 0
        return client.ApiClient(configuration)

    return connect


Sent = queue.Queue[tuple[str, dict[str, str]]]


@pytest.fixture
def api() -> Iterator[PodApi]:
    with running_pod_api() as server:
        yield server


def watching(api: PodApi, sent: Sent, **kwargs: Any) -> PodWatch:
    watch = PodWatch(
        _connect(api),
        NODE,
        lambda uid, roles: sent.put((uid, roles)),
        status=PodSpecStatus(enabled=True, reason="test"),
        backoff_s=(0.02, 0.1),
        **kwargs,
    )
    watch.start()
    return watch


def wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


SIDECAR_POD = pod_object("db", "db", containers=["db"], init=["migrate"], sidecars=["envoy"])
SIDECAR_ROLES = {"migrate": "init", "envoy": "sidecar", "db": "app"}


def test_a_list_then_a_watch_from_its_resource_version_of_this_node_only(api: PodApi) -> None:
    api.pods, api.version = [SIDECAR_POD], "10"
    sent: Sent = queue.Queue()
    watch = watching(api, sent)
    try:
        assert sent.get(timeout=3) == ("db", SIDECAR_ROLES)
        wait_for(api.watching.is_set)
        listed, watched = api.lists()[0], api.watches()[0]
        assert listed.query["fieldSelector"] == f"spec.nodeName={NODE}"
        assert watched.query["fieldSelector"] == f"spec.nodeName={NODE}"
        assert watched.query["resourceVersion"] == "10"
        assert watched.query["allowWatchBookmarks"] == "true"
        wait_for(lambda: watch.status.watching)
        assert "watching, 1 pods, 1 changes sent, 1 lists" in watch.status.line()
    finally:
        watch.stop()
    assert watch._thread is not None and not watch._thread.is_alive()  # the cut worked


def test_a_modified_pod_whose_roles_did_not_change_sends_nothing(api: PodApi) -> None:
    api.pods = [SIDECAR_POD]
    sent: Sent = queue.Queue()
    watch = watching(api, sent)
    try:
        assert sent.get(timeout=3)[0] == "db"
        running = pod_object("db", "db", containers=["db"], init=["migrate"],
                             sidecars=["envoy"], version="11", phase="Running")  # fmt: skip
        api.send("MODIFIED", running)
        debugged = pod_object("db", "db", containers=["db"], init=["migrate"],
                              sidecars=["envoy"], ephemeral=["dbg"], version="12")  # fmt: skip
        api.send("MODIFIED", debugged)
        # the first thing sent after the status change is the ephemeral container
        assert sent.get(timeout=3) == ("db", {**SIDECAR_ROLES, "dbg": "ephemeral"})
        assert sent.empty()
        assert watch.status.sent == 2
    finally:
        watch.stop()


def test_410_gone_lists_again_and_watches_from_the_new_list(api: PodApi) -> None:
    other = pod_object("web", "web", containers=["web"])
    api.pods, api.version = [SIDECAR_POD, other], "10"
    sent: Sent = queue.Queue()
    watch = watching(api, sent)
    try:
        assert {sent.get(timeout=3)[0], sent.get(timeout=3)[0]} == {"db", "web"}
        wait_for(api.watching.is_set)
        # while the watch was too old: web got a sidecar, db is unchanged
        api.pods = [SIDECAR_POD, pod_object("web", "web", containers=["web"], sidecars=["log"])]
        api.version = "30"
        api.gone()
        assert sent.get(timeout=3) == ("web", {"log": "sidecar", "web": "app"})
        wait_for(lambda: len(api.watches()) == 2)
        assert len(api.lists()) == 2
        assert api.watches()[1].query["resourceVersion"] == "30"
        assert sent.empty()  # db's roles did not change: not sent again
        assert watch.status.lists == 2 and not watch.status.last_error
    finally:
        watch.stop()


def test_a_deleted_pod_is_forgotten(api: PodApi) -> None:
    api.pods = [SIDECAR_POD]
    sent: Sent = queue.Queue()
    watch = watching(api, sent)
    try:
        assert sent.get(timeout=3)[0] == "db"
        api.send("DELETED", SIDECAR_POD)
        api.send("ADDED", SIDECAR_POD)  # the same uid again: sent again, so it was forgotten
        assert sent.get(timeout=3) == ("db", SIDECAR_ROLES)
        api.send("DELETED", SIDECAR_POD)
        wait_for(lambda: watch.status.pods == 0)
    finally:
        watch.stop()


def test_a_failing_server_is_retried_with_back_off_and_the_error_shown(api: PodApi) -> None:
    api.pods = [SIDECAR_POD]
    api.fail_next(500)
    api.fail_next(503)
    sent: Sent = queue.Queue()
    watch = watching(api, sent)
    try:
        assert sent.get(timeout=3)[0] == "db"
        assert len(api.lists()) == 3
        assert "last error: HTTP 503" in watch.status.line()
        api.end_watch()  # the server ends the watch: watched again, no list, no error
        wait_for(lambda: len(api.watches()) == 2)
        assert len(api.lists()) == 3
    finally:
        watch.stop()


# --------------------------------------------------------------------------- into the engine


class FakePlugin:
    """What pod_roles_loop uses of NriPlugin: the policy thread, UpdateContainers (and
    NriPlugin's own send_updates on top of them)."""

    send_updates = NriPlugin.send_updates

    def __init__(self) -> None:
        self.policy_thread = ThreadPoolExecutor(1)
        self.configured = asyncio.Event()
        self.configured.set()
        self.updates: list[Any] = []

    async def in_policy_thread(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.policy_thread, fn)

    async def update_containers(self, updates: Any) -> None:
        self.updates.extend(updates)


class FakeExecutor:
    def __init__(self) -> None:
        self.submitted: list[Any] = []

    def submit(self, intents: Any) -> None:
        self.submitted.append(intents)


async def test_a_dedicated_pods_sidecar_lands_in_the_shared_pool(api: PodApi) -> None:
    engine = Engine(TWO_NODES.expected_topology(), EngineConfig(planner=PlannerConfig()))
    engine.connect(infer_runtime("containerd", "v2.3.4", "v0.12.0", has_timeouts=True))
    engine.synchronize([], [])
    db = pod("db", "dedicated_cores")  # uid "db"
    envoy, app = container("envoy", 2000, pod_name="db"), container("db", 2000, pod_name="db")
    engine.container_created(db, envoy)
    engine.container_created(db, app)
    assert engine.plan.containers[envoy.id].pool == DEDICATED  # nothing says "sidecar" yet
    api.pods = [SIDECAR_POD]
    plugin, executor = FakePlugin(), FakeExecutor()
    watch, _ = PodWatch(_connect(api), NODE, print, backoff_s=(0.02, 0.1)), None
    task = asyncio.create_task(
        pod_roles_loop(plugin, QosPolicy(engine), executor, watch)  # type: ignore[arg-type]
    )
    try:
        end = time.monotonic() + 3
        while not plugin.updates:
            assert time.monotonic() < end, "no update"
            await asyncio.sleep(0.01)
        plan = await plugin.in_policy_thread(lambda: engine.plan.containers[envoy.id])
        assert (plan.pool, plan.role) == (SHARED, "sidecar")
        assert engine.plan.containers[app.id].pool == DEDICATED
        assert envoy.id in {u.container_id for u in plugin.updates}
        assert any(n.kind == "role" for i in executor.submitted for n in i.notes)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        plugin.policy_thread.shutdown()
    assert watch._thread is not None and not watch._thread.is_alive()


def test_the_status_view_has_one_line_about_it() -> None:
    from nri_plugin.control.base import Controllers
    from nri_plugin.control.executor import HostExecutor
    from nri_plugin.events import EventLog
    from nri_plugin.views import host_view

    executor = HostExecutor(Controllers([]), EventLog())
    status = PodSpecStatus(enabled=True, reason="auto: in a cluster", node=NODE)
    status.last_error = "HTTP 403 Forbidden"
    line = host_view(executor, None, status)["pod_spec_roles"]
    assert line == (
        f"pod-spec roles on (auto: in a cluster): node {NODE} at ?, not watching now, "
        "0 pods, 0 changes sent, 0 lists; last error: HTTP 403 Forbidden"
    )
    assert host_view(executor)["pod_spec_roles"] == ""
