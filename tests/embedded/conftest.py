"""Fixtures for the embedded-runtime tests: runtimes on tmp sockets, torn down always."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from embedded_runtime import CONTAINERD_2_3, EmbeddedRuntime, InMemoryBackend, RuntimeFlavor
from qos_model import containers as model
from tests.builders import MiB, kubelet_cpu
from tests.embedded.fakeplugin import FakePlugin

MakeRuntime = Callable[..., Awaitable[EmbeddedRuntime]]


@pytest.fixture
async def make_runtime(tmp_path: Path) -> AsyncIterator[MakeRuntime]:
    runtimes: list[EmbeddedRuntime] = []

    async def make(
        flavor: RuntimeFlavor = CONTAINERD_2_3,
        request_timeout: float = 1.0,
        registration_timeout: float = 1.0,
        **kwargs: Any,
    ) -> EmbeddedRuntime:
        path = tmp_path / f"rt{len(runtimes)}" / "nri.sock"
        runtime = EmbeddedRuntime(
            path,
            flavor=flavor,
            request_timeout=request_timeout,
            registration_timeout=registration_timeout,
            backend=kwargs.pop("backend", InMemoryBackend()),
        )
        await runtime.start()
        runtimes.append(runtime)
        return runtime

    yield make
    for runtime in runtimes:
        await runtime.stop()


@pytest.fixture
async def plugins() -> AsyncIterator[list[FakePlugin]]:
    """Register fake plugins here to have them closed after the test."""
    created: list[FakePlugin] = []
    yield created
    for plugin in created:
        await plugin.close()


def pod(pod_id: str = "pod0", **kwargs: Any) -> model.Pod:
    """A pod as the runtime tests name it: the id is what they pass around."""
    return model.Pod(
        id=pod_id, name=f"{pod_id}-name", namespace="ns", uid=f"uid-{pod_id}", **kwargs
    )


def container(ctr_id: str, pod_id: str = "pod0", **kwargs: Any) -> model.Container:
    """A container of `pod_id`; unless given, the kubelet's resources for 500m / 128 MiB."""
    kwargs.setdefault(
        "resources",
        model.Resources(cpu=kubelet_cpu(500), memory=model.MemoryResources(limit=128 * MiB)),
    )
    return model.Container(id=ctr_id, pod_id=pod_id, name=f"{ctr_id}-name", **kwargs)
