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
    ids=[
        "containerd 1.7.13, NRI v0.4.0",
        "CRI-O 1.36.3, NRI v0.11.0",
        "containerd 2.3.4, NRI v0.12.0",
    ],
)
def test_each_runtime_has_the_features_of_its_nri_version(
    flavor: RuntimeFlavor, expected: tuple[object, ...]
) -> None:
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
        pytest.param(CONTAINERD_2_3, "logger", "10", None,
                     id="containerd 2.3.4: plain name accepted"),
        pytest.param(CONTAINERD_2_3, "a-b_c.d+e", "00", None,
                     id="containerd 2.3.4: -_.+ in the name and index 00 accepted"),
        pytest.param(CONTAINERD_2_3, "", "10", f"{NAME}: name is empty",
                     id="containerd 2.3.4: empty name refused"),
        pytest.param(CONTAINERD_2_3, "x/y", "10",
                     f"{NAME} \"x/y\": contains invalid character '/'",
                     id="containerd 2.3.4: slash in the name refused"),
        pytest.param(CONTAINERD_2_3, "logger", "1", f'{INDEX} "1", must be 2 digits',
                     id="containerd 2.3.4: one-digit index refused"),
        pytest.param(CONTAINERD_2_3, "logger", "a1", f'{INDEX} "a1" (not [0-9][0-9])',
                     id="containerd 2.3.4: non-digit index refused"),
        pytest.param(CRIO_1_36, "x/y", "10", None, id="CRI-O 1.36.3: slash in the name accepted"),
        pytest.param(CRIO_1_36, "", "10", "invalid (empty) plugin name",
                     id="CRI-O 1.36.3: empty name refused"),
        pytest.param(CONTAINERD_1_7, "x y", "99", None,
                     id="containerd 1.7.13: any name accepted"),
        pytest.param(CONTAINERD_1_7, "logger", "", f'{INDEX} "", must be 2 digits',
                     id="containerd 1.7.13: empty index refused"),
    ],
)  # fmt: skip
def test_each_runtime_checks_the_plugin_name_and_index_its_own_way(
    flavor: RuntimeFlavor, name: str, idx: str, error: str | None
) -> None:
    assert registration_error(flavor, name, idx) == error


@pytest.mark.parametrize(
    ("flavor", "mask", "result"),
    [
        pytest.param(CONTAINERD_1_7, 0, 0x7FF, id="containerd 1.7.13: 0 means every v0.4 event"),
        pytest.param(CONTAINERD_1_7, 0x288, 0x288, id="containerd 1.7.13: a valid mask is kept"),
        pytest.param(CONTAINERD_1_7, 0x800, "invalid plugin events: 0x800",
                     id="containerd 1.7.13: a v0.10 event is refused"),
        pytest.param(CONTAINERD_1_7, 0x2FFF, "invalid plugin events: 0x2800",
                     id="containerd 1.7.13: the refusal names only the unknown bits"),
        pytest.param(CRIO_1_36, 0, 0x3FFF, id="CRI-O 1.36.3: 0 means every v0.10 event"),
        pytest.param(CRIO_1_36, 0x3FFF, 0x3FFF, id="CRI-O 1.36.3: every v0.10 event is kept"),
        pytest.param(CONTAINERD_2_3, 0x4001, "invalid plugin events: 0x4000",
                     id="containerd 2.3.4: a bit above the v0.10 events is refused"),
        pytest.param(CONTAINERD_2_3, -1, "invalid plugin events: 0x-4000",
                     id="containerd 2.3.4: a negative mask is refused, printed as Go does"),
    ],
)  # fmt: skip
def test_subscribed_events_are_filled_in_or_refused_as_each_runtime_does(
    flavor: RuntimeFlavor, mask: int, result: int | str
) -> None:
    if isinstance(result, int):
        assert subscribed_events(flavor, mask) == result
    else:
        with pytest.raises(InvalidEventMaskError) as exc:
            subscribed_events(flavor, mask)
        assert str(exc.value) == result


EVENT_METHODS = [
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
]


@pytest.mark.parametrize(
    ("flavor", "event", "fallback", "method"),
    EVENT_METHODS,
    ids=[
        f"{flavor.label}: {event.name}{' after a fallback' if fallback else ''} -> {method}"
        for flavor, event, fallback, method in EVENT_METHODS
    ],
)
def test_each_event_goes_out_as_the_method_its_runtime_uses(
    flavor: RuntimeFlavor, event: Event, fallback: bool, method: str
) -> None:
    assert method_for_event(flavor, event, fallback) == method


@pytest.mark.parametrize(
    "event",
    [Event.UPDATE_POD_SANDBOX, Event.POST_UPDATE_POD_SANDBOX, Event.VALIDATE_CONTAINER_ADJUSTMENT],
    ids=lambda event: event.name,
)
def test_v0_4_has_no_v0_10_events(event: Event) -> None:
    with pytest.raises(ValueError, match="has no"):
        method_for_event(CONTAINERD_1_7, event, False)


FALLBACKS = [
    (CONTAINERD_2_3, "RunPodSandbox", Code.UNIMPLEMENTED, True),
    (CONTAINERD_2_3, "RemoveContainer", Code.UNIMPLEMENTED, True),
    (CONTAINERD_2_3, "RunPodSandbox", Code.UNKNOWN, False),
    (CONTAINERD_2_3, "CreateContainer", Code.UNIMPLEMENTED, False),
    (CONTAINERD_2_3, "UpdatePodSandbox", Code.UNIMPLEMENTED, False),
    (CRIO_1_36, "StateChange", Code.UNIMPLEMENTED, False),
]


@pytest.mark.parametrize(
    ("flavor", "method", "code", "expected"),
    FALLBACKS,
    ids=[
        f"{flavor.label}: {method} {Code(code).name} -> {'StateChange' if falls else 'no fallback'}"
        for flavor, method, code, falls in FALLBACKS
    ],
)
def test_only_an_unimplemented_pod_or_remove_event_falls_back_to_state_change(
    flavor: RuntimeFlavor, method: str, code: int, expected: bool
) -> None:
    assert falls_back_to_state_change(flavor, method, code) is expected


K8S = (("containerd-namespace-ttrpc", "k8s.io"),)


METADATA = [
    (CONTAINERD_1_7, "StateChange", K8S),
    (CONTAINERD_2_3, "ValidateContainerAdjustment", K8S),
    (CONTAINERD_2_3, "StopContainer", ()),
    (CONTAINERD_2_3, "Configure", ()),
    (CONTAINERD_1_7, "Synchronize", ()),
    (CRIO_1_36, "CreateContainer", ()),
]


@pytest.mark.parametrize(
    ("flavor", "method", "metadata"),
    METADATA,
    ids=[
        f"{flavor.label}: {method} {'in namespace k8s.io' if metadata else 'without metadata'}"
        for flavor, method, metadata in METADATA
    ],
)
def test_containerd_sends_its_k8s_namespace_except_with_the_exempt_methods(
    flavor: RuntimeFlavor, method: str, metadata: tuple[tuple[str, str], ...]
) -> None:
    assert flavor.metadata_for(method) == metadata
