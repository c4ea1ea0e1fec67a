"""Pure tests of the per-runtime rules: registration, event masks, dispatch, metadata."""

from __future__ import annotations

import pytest

from embedded_runtime import CONTAINERD_1_7, CONTAINERD_2_3, CRIO_1_36, FLAVORS, RuntimeFlavor
from embedded_runtime.flavor import (
    InvalidEventMaskError,
    falls_back_to_state_change,
    method_for_event,
    registration_error,
    subscribed_events,
)
from nri_plugin.protocol.errors import Code
from nri_plugin.protocol.versions import Event


def test_flavors_match_the_captured_runtimes() -> None:
    table = {
        key: (f.runtime_name, f.runtime_version, str(f.nri_version)) for key, f in FLAVORS.items()
    }
    assert table == {
        "containerd-1.7.13": ("containerd", "v1.7.13", "v0.4.0"),
        "containerd-2.3.4": ("containerd", "v2.3.4", "v0.12.0"),
        "cri-o-1.36.3": ("cri-o", "1.36.3", "v0.11.0"),
    }


@pytest.mark.parametrize(
    ("flavor", "expected"),
    [
        (CONTAINERD_1_7, (0x7FF, False, False, False, False, False)),
        (CRIO_1_36, (0x3FFF, False, True, True, True, False)),
        (CONTAINERD_2_3, (0x3FFF, True, True, True, True, True)),
    ],
)
def test_what_the_nri_version_implies(flavor: RuntimeFlavor, expected: tuple[object, ...]) -> None:
    assert (
        flavor.valid_events,
        flavor.dedicated_notifications,
        flavor.has_pod_update_and_validation,
        flavor.configure_sends_timeouts,
        flavor.split_sync,
        flavor.configure_sends_nri_version,
    ) == expected


NAME = "invalid plugin name: invalid plugin name"
INDEX = "invalid plugin index: invalid plugin index"


@pytest.mark.parametrize(
    ("flavor", "name", "idx", "error"),
    [
        (CONTAINERD_2_3, "logger", "10", None),
        (CONTAINERD_2_3, "a-b_c.d+e", "00", None),
        (CONTAINERD_2_3, "", "10", f"{NAME}: name is empty"),
        (CONTAINERD_2_3, "x/y", "10", f"{NAME} \"x/y\": contains invalid character '/'"),
        (CONTAINERD_2_3, "logger", "1", f'{INDEX} "1", must be 2 digits'),
        (CONTAINERD_2_3, "logger", "a1", f'{INDEX} "a1" (not [0-9][0-9])'),
        (CRIO_1_36, "x/y", "10", None),
        (CRIO_1_36, "", "10", "invalid (empty) plugin name"),
        (CONTAINERD_1_7, "x y", "99", None),
        (CONTAINERD_1_7, "logger", "", f'{INDEX} "", must be 2 digits'),
    ],
)
def test_registration_rules(flavor: RuntimeFlavor, name: str, idx: str, error: str | None) -> None:
    assert registration_error(flavor, name, idx) == error


@pytest.mark.parametrize(
    ("flavor", "mask", "result"),
    [
        (CONTAINERD_1_7, 0, 0x7FF),
        (CONTAINERD_1_7, 0x288, 0x288),
        (CONTAINERD_1_7, 0x800, "invalid plugin events: 0x800"),
        (CONTAINERD_1_7, 0x2FFF, "invalid plugin events: 0x2800"),
        (CRIO_1_36, 0, 0x3FFF),
        (CRIO_1_36, 0x3FFF, 0x3FFF),
        (CONTAINERD_2_3, 0x4001, "invalid plugin events: 0x4000"),
        (CONTAINERD_2_3, -1, "invalid plugin events: 0x-4000"),
    ],
)
def test_event_masks(flavor: RuntimeFlavor, mask: int, result: int | str) -> None:
    if isinstance(result, int):
        assert subscribed_events(flavor, mask) == result
    else:
        with pytest.raises(InvalidEventMaskError) as exc:
            subscribed_events(flavor, mask)
        assert str(exc.value) == result


@pytest.mark.parametrize(
    ("flavor", "event", "fallback", "method"),
    [
        (CONTAINERD_1_7, Event.RUN_POD_SANDBOX, False, "StateChange"),
        (CONTAINERD_1_7, Event.CREATE_CONTAINER, False, "CreateContainer"),
        (CONTAINERD_1_7, Event.STOP_CONTAINER, False, "StopContainer"),
        (CRIO_1_36, Event.POST_START_CONTAINER, False, "StateChange"),
        (CRIO_1_36, Event.UPDATE_POD_SANDBOX, False, "UpdatePodSandbox"),
        (CRIO_1_36, Event.POST_UPDATE_POD_SANDBOX, False, "StateChange"),
        (CRIO_1_36, Event.VALIDATE_CONTAINER_ADJUSTMENT, False, "ValidateContainerAdjustment"),
        (CONTAINERD_2_3, Event.RUN_POD_SANDBOX, False, "RunPodSandbox"),
        (CONTAINERD_2_3, Event.RUN_POD_SANDBOX, True, "StateChange"),
        (CONTAINERD_2_3, Event.POST_UPDATE_POD_SANDBOX, False, "PostUpdatePodSandbox"),
        (CONTAINERD_2_3, Event.UPDATE_CONTAINER, True, "UpdateContainer"),
        (CONTAINERD_2_3, Event.UPDATE_POD_SANDBOX, True, "UpdatePodSandbox"),
    ],
)
def test_which_method_carries_an_event(
    flavor: RuntimeFlavor, event: Event, fallback: bool, method: str
) -> None:
    assert method_for_event(flavor, event, fallback) == method


@pytest.mark.parametrize(
    "event",
    [Event.UPDATE_POD_SANDBOX, Event.POST_UPDATE_POD_SANDBOX, Event.VALIDATE_CONTAINER_ADJUSTMENT],
)
def test_v0_4_has_no_v0_10_events(event: Event) -> None:
    with pytest.raises(ValueError, match="has no"):
        method_for_event(CONTAINERD_1_7, event, False)


@pytest.mark.parametrize(
    ("flavor", "method", "code", "expected"),
    [
        (CONTAINERD_2_3, "RunPodSandbox", Code.UNIMPLEMENTED, True),
        (CONTAINERD_2_3, "RemoveContainer", Code.UNIMPLEMENTED, True),
        (CONTAINERD_2_3, "RunPodSandbox", Code.UNKNOWN, False),
        (CONTAINERD_2_3, "CreateContainer", Code.UNIMPLEMENTED, False),
        (CONTAINERD_2_3, "UpdatePodSandbox", Code.UNIMPLEMENTED, False),
        (CRIO_1_36, "StateChange", Code.UNIMPLEMENTED, False),
    ],
)
def test_state_change_fallback(
    flavor: RuntimeFlavor, method: str, code: int, expected: bool
) -> None:
    assert falls_back_to_state_change(flavor, method, code) is expected


K8S = (("containerd-namespace-ttrpc", "k8s.io"),)


@pytest.mark.parametrize(
    ("flavor", "method", "metadata"),
    [
        (CONTAINERD_1_7, "StateChange", K8S),
        (CONTAINERD_2_3, "ValidateContainerAdjustment", K8S),
        (CONTAINERD_2_3, "StopContainer", ()),
        (CONTAINERD_2_3, "Configure", ()),
        (CONTAINERD_1_7, "Synchronize", ()),
        (CRIO_1_36, "CreateContainer", ()),
    ],
)
def test_request_metadata(
    flavor: RuntimeFlavor, method: str, metadata: tuple[tuple[str, str], ...]
) -> None:
    assert flavor.metadata_for(method) == metadata
