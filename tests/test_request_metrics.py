"""The per-request series (nri_plugin.metrics.RequestSeries) are exposed exactly as the
prometheus_client Counter and Histogram they replace: same names, labels, buckets, counts
and sums, and `_created`, so dashboards and alerts cannot tell the difference."""

from __future__ import annotations

import re
import threading

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from nri_plugin.metrics import _LATENCY_BUCKETS, Metrics

_CREATED = re.compile(rb"^(\S+_created\{[^}]*\}) \S+$", re.MULTILINE)


def _reference(observations: list[tuple[str, float]]) -> bytes:
    registry = CollectorRegistry()
    requests = Counter(
        "nri_qos_requests", "Runtime requests served, by NRI method", ["method"], registry=registry
    )
    seconds = Histogram(
        "nri_qos_request_duration_seconds",
        "Time from request received to reply written",
        ["method"],
        buckets=_LATENCY_BUCKETS,
        registry=registry,
    )
    for method, value in observations:
        requests.labels(method).inc()
        seconds.labels(method).observe(value)
    return generate_latest(registry)


def _ours(observations: list[tuple[str, float]]) -> bytes:
    metrics = Metrics()
    for method, value in observations:
        series = metrics.of_method(method)
        series.inc()
        series.observe(value)
    text = generate_latest(metrics.registry)
    # only the request series: the registry holds the connection's metrics too
    return b"".join(
        line
        for line in text.splitlines(keepends=True)
        if line.removeprefix(b"# HELP ").removeprefix(b"# TYPE ").startswith(_OURS)
    )


_OURS = (b"nri_qos_requests_total", b"nri_qos_requests_created", b"nri_qos_requests ",
         b"nri_qos_request_duration_seconds")  # fmt: skip


def _without_created_values(text: bytes) -> bytes:
    return _CREATED.sub(rb"\1 T", text)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["CreateContainer", "UpdateContainer", "StateChange"]),
            st.one_of(
                st.sampled_from([*_LATENCY_BUCKETS, 0.0]),  # on a bound: le is inclusive
                st.floats(0, 5, allow_nan=False),
            ),
        ),
        max_size=40,
    )
)
def test_exposed_exactly_as_prometheus_client_would(observations: list[tuple[str, float]]) -> None:
    ours = _without_created_values(_ours(observations))
    reference = _without_created_values(_reference(observations))
    assert ours == reference


def test_counts_from_two_threads_add_up() -> None:
    metrics = Metrics()
    series = metrics.of_method("CreateContainer")

    def serve() -> None:
        for _ in range(20_000):
            series.inc()
            series.observe(0.0003)

    threads = [threading.Thread(target=serve) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    get = metrics.registry.get_sample_value
    labels = {"method": "CreateContainer"}
    assert get("nri_qos_requests_total", labels) == 40_000
    assert get("nri_qos_request_duration_seconds_count", labels) == 40_000
    assert get("nri_qos_request_duration_seconds_bucket", {**labels, "le": "0.0002"}) == 0
    assert get("nri_qos_request_duration_seconds_bucket", {**labels, "le": "0.0005"}) == 40_000
