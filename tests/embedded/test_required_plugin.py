"""Fail-closed: a pod that requires nri-qos (`required-plugins.noderesource.dev`) gets no
container while nri-qos is not connected, and gets one when it is.

The runtime side is the embedded runtime's model of the built-in default validator
(`embedded_runtime.validator`, after containerd/nri's default validator); the plugin side
is the real `NriPlugin` with its default settings, so the name and index it registers
are the ones docs/kubernetes.md tells operators to put in the annotation.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from embedded_runtime import (
    CONTAINERD_1_7,
    CONTAINERD_2_3,
    CRIO_1_36,
    REQUIRED_PLUGINS_ANNOTATION,
    DefaultValidatorConfig,
    EmbeddedRuntime,
    InMemoryBackend,
    PluginState,
    RuntimeFlavor,
    ValidationRejectedError,
)
from embedded_runtime.validator import (
    effective_annotation,
    plugin_names,
    required_plugins_rejection,
)
from nri_plugin.plugin import NriPlugin, PluginSettings
from nri_plugin.policy.api import RecordingPolicy
from tests.embedded.conftest import container, pod

VALIDATOR = DefaultValidatorConfig(enable=True)
# What docs/kubernetes.md gives operators to copy (the pod-scoped form).
REQUIRES_NRI_QOS = {REQUIRED_PLUGINS_ANNOTATION: '["nri-qos"]'}


def test_our_registered_name_and_index_are_what_the_annotation_names() -> None:
    settings = PluginSettings()
    assert (settings.name, settings.idx) == ("nri-qos", "50")
    assert (
        required_plugins_rejection(VALIDATOR, REQUIRES_NRI_QOS, "app", [("nri-qos", "50")]) is None
    )
    # the index form matches too; a look-alike name does not
    assert plugin_names([("nri-qos", "50")]) == {"nri-qos", "50-nri-qos"}
    for wrong in ('["nri_qos"]', '["qos"]', '["10-nri-qos"]'):
        why = required_plugins_rejection(
            VALIDATOR, {REQUIRED_PLUGINS_ANNOTATION: wrong}, "app", [("nri-qos", "50")]
        )
        assert why is not None and "not present" in why


def test_container_scoped_keys_override_pod_scoped_ones() -> None:
    key = REQUIRED_PLUGINS_ANNOTATION
    annotations = {
        f"{key}/container.app": '["nri-qos"]',
        f"{key}/pod": "[]",
        key: '["never-looked-at"]',
    }
    assert effective_annotation(annotations, key, "app") == '["nri-qos"]'
    assert effective_annotation(annotations, key, "sidecar") == "[]"  # /pod before the bare key
    assert effective_annotation({key: "[a]"}, key, "x") == "[a]"
    assert effective_annotation({}, key, "x") is None


def test_the_annotation_is_yaml_and_a_bad_one_rejects() -> None:
    none: list[tuple[str, str]] = []
    yaml_list = {REQUIRED_PLUGINS_ANNOTATION: "[ nri-qos ]"}  # upstream's own test form
    assert required_plugins_rejection(VALIDATOR, yaml_list, "app", [("nri-qos", "50")]) is None
    bad = {REQUIRED_PLUGINS_ANNOTATION: "nri-qos"}  # a string, not a list
    assert "invalid" in (required_plugins_rejection(VALIDATOR, bad, "app", none) or "")
    off = DefaultValidatorConfig(enable=False)
    assert required_plugins_rejection(off, REQUIRES_NRI_QOS, "app", none) is None


def test_global_requirements_and_the_toleration() -> None:
    config = DefaultValidatorConfig(
        enable=True,
        required_plugins=("nri-qos",),
        tolerate_missing_plugins_annotation="tolerate-missing-plugins.noderesource.dev",
    )
    none: list[tuple[str, str]] = []
    assert "not present" in (required_plugins_rejection(config, {}, "app", none) or "")
    tolerated = {"tolerate-missing-plugins.noderesource.dev": "true"}
    assert required_plugins_rejection(config, tolerated, "app", none) is None
    not_tolerated = {"tolerate-missing-plugins.noderesource.dev": "false"}
    assert required_plugins_rejection(config, not_tolerated, "app", none) is not None
    garbage = {"tolerate-missing-plugins.noderesource.dev": "yes please"}
    assert "invalid" in (required_plugins_rejection(config, garbage, "app", none) or "")


# --- against the runtime ---------------------------------------------------------------------


@pytest.fixture
async def runtime(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[EmbeddedRuntime]:
    flavor: RuntimeFlavor = getattr(request, "param", CONTAINERD_2_3)
    rt = EmbeddedRuntime(
        tmp_path / "nri.sock",
        flavor=flavor,
        request_timeout=2.0,
        backend=InMemoryBackend(),
        default_validator=VALIDATOR,
    )
    await rt.start()
    yield rt
    await rt.stop()


async def connect(runtime: EmbeddedRuntime) -> tuple[NriPlugin, asyncio.Task[None]]:
    """The real plugin, with only the socket path changed from its defaults."""
    plugin = NriPlugin(RecordingPolicy(), PluginSettings(socket_path=runtime.socket_path))
    task = asyncio.create_task(plugin.run())
    await runtime.wait_for_plugins(1)
    return plugin, task


async def disconnect(runtime: EmbeddedRuntime, plugin: NriPlugin, task: asyncio.Task[None]) -> None:
    plugin.stop()
    await asyncio.gather(task, return_exceptions=True)
    plugin.close()
    async with asyncio.timeout(5):
        while any(p.state is PluginState.READY for p in runtime.plugins):
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("runtime", [CONTAINERD_2_3, CRIO_1_36], indirect=True)
async def test_a_pod_requiring_nri_qos_gets_no_container_while_it_is_down(
    runtime: EmbeddedRuntime,
) -> None:
    await runtime.run_pod_sandbox(pod("pod0", annotations=REQUIRES_NRI_QOS))
    with pytest.raises(ValidationRejectedError) as refused:
        await runtime.create_container("pod0", container("c0"))
    assert 'required plugin "nri-qos" not present' in str(refused.value)
    assert "c0" not in runtime.containers

    plugin, task = await connect(runtime)
    try:
        created = await runtime.create_container("pod0", container("c1"))
        assert created.id == "c1" and "c1" in runtime.containers
    finally:
        await disconnect(runtime, plugin, task)

    # it went away (a crash, a restart, a request timeout that got it dropped): closed again
    with pytest.raises(ValidationRejectedError, match="nri-qos"):
        await runtime.create_container("pod0", container("c2"))
    # a pod that does not ask for it is never held up
    await runtime.run_pod_sandbox(pod("pod1"))
    assert (await runtime.create_container("pod1", container("c3"))).id == "c3"


async def test_the_requirement_can_be_scoped_to_one_container(runtime: EmbeddedRuntime) -> None:
    scoped = {f"{REQUIRED_PLUGINS_ANNOTATION}/container.c0-name": '["nri-qos"]'}
    await runtime.run_pod_sandbox(pod("pod0", annotations=scoped))
    with pytest.raises(ValidationRejectedError):
        await runtime.create_container("pod0", container("c0"))
    assert (await runtime.create_container("pod0", container("sidecar"))).id == "sidecar"


@pytest.mark.parametrize("runtime", [CONTAINERD_1_7], indirect=True)
async def test_containerd_1_7_has_no_validator_so_nothing_is_enforced(
    runtime: EmbeddedRuntime,
) -> None:
    await runtime.run_pod_sandbox(pod("pod0", annotations=REQUIRES_NRI_QOS))
    assert (await runtime.create_container("pod0", container("c0"))).id == "c0"
