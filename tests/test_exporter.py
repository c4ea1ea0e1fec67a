"""The metrics exporter, scraped over real HTTP: a planned node with interference, its
decisions counted from the engine's own output, parsed the way Prometheus parses it."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import FrozenInstanceError, dataclass
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from nri_plugin.control.base import Controller, Controllers, ControllerUnavailable, Mode
from nri_plugin.control.executor import HostExecutor
from nri_plugin.events import EventLog
from nri_plugin.exporter import (
    MetricsServer,
    MetricsSetupError,
    NodeExporter,
    parse_address,
    serve_metrics,
    snapshot_of,
)
from nri_plugin.metrics import ConnectionState, Metrics
from nri_plugin.policy.class_isolation import Backend, HostSupport, IsolationConfig
from nri_plugin.policy.engine import Engine, EngineConfig
from nri_plugin.policy.eviction import EvictionConfig
from nri_plugin.policy.intents import Evict, HostIntent, Intents, Note, Severity
from nri_plugin.policy.protection import ProtectionConfig
from nri_plugin.policy.workload import SHARED, PlannerConfig
from nri_plugin.protect import ProtectState
from nri_plugin.protocol.versions import infer_runtime
from qos_model.signals import (
    RUNQ_BUCKETS,
    Availability,
    ContainerSignals,
    CpuThrottling,
    MemoryUse,
    NodeMemory,
    Pressure,
    RunqLatency,
    SignalSnapshot,
)
from tests.builders import container, pod
from tests.policy.sysfs_builder import MachineShape

WEB, ETL, COPY = "default/web/web", "default/etl/etl", "default/copy/copy"


def runq(wait_us: int, count: int = 100) -> RunqLatency:
    """`count` waits, all in the log2 bucket that holds `wait_us`."""
    buckets = [0] * RUNQ_BUCKETS
    buckets[max(0, wait_us.bit_length() - 1)] = count
    return RunqLatency(count=count, total_ns=count * wait_us * 1000, buckets=tuple(buckets))


class EvictRecorder(Controller):
    """The evict domain's controller, minus the API server: records what it was asked."""

    name = "evict"
    domain = "evict"
    mode = Mode.OPTIONAL

    def __init__(self) -> None:
        self.asked: list[HostIntent] = []

    def post_update(self, intent: HostIntent) -> str:
        self.asked.append(intent)
        return "eviction asked"


class Unavailable(Controller):
    name = "rdt"
    domain = "rdt"

    def start(self) -> None:
        raise ControllerUnavailable("no resctrl mount")


def engine(**protection: Any) -> Engine:
    """Two NUMA nodes of two CPUs; the reclaimed pool may overlap the shared one, so a
    NUMA-bound online container shares CPUs with batch (what the ladder is for)."""
    config = EngineConfig(
        planner=PlannerConfig(
            reclaimed_overlap_shared=True,
            reclaimed_min_cpus=4,
            isolation=IsolationConfig(host=HostSupport(evict=Backend(True, "started"))),
        ),
        protection=ProtectionConfig(**protection),
    )
    e = Engine(MachineShape(packages=2, cores_per_l3=2).expected_topology(), config)
    e.connect(infer_runtime("containerd", "v2.3.4", "v0.12.0", True))
    e.synchronize([], [])
    return e


@dataclass
class Node:
    """A node after a run of interference: everything the exporter is built from."""

    engine: Engine
    executor: HostExecutor
    protect: ProtectState
    metrics: Metrics
    exporter: NodeExporter
    intents: list[Intents]
    recorder: EvictRecorder


async def interfered_node() -> Node:
    """web (online, NUMA-bound) suffers from etl (batch) for five windows: detection, the
    reclaimed pool moves off web's CPUs, etl is capped, then evicted. Every window's
    intents go where the daemon sends them: the decision counters and the executor."""
    e = engine(eviction=EvictionConfig(cooldown_s=0))
    e.container_created(
        pod("web", "shared_cores", memory={"numa_binding": "true"}), container("web", 1000)
    )
    e.container_created(pod("etl", "reclaimed_cores"), container("etl", 0))
    e.container_created(pod("copy", "reclaimed_cores"), container("copy", 0))
    recorder = EvictRecorder()
    executor = HostExecutor(Controllers([recorder, Unavailable()]), EventLog())
    executor.start()
    metrics = Metrics()
    exporter = NodeExporter(metrics.registry)
    protect = ProtectState(runq_source="schedstat", runq_reason="no BTF")
    blame = {("ctr-web", "ctr-etl"): 700_000_000, ("ctr-web", "ctr-copy"): 1_000_000}
    seen = []
    for t in (0.5, 1.0, 1.5, 2.5, 3.5):
        snapshot = SignalSnapshot(
            end_s=t,
            window_s=0.5,
            containers={
                "ctr-web": ContainerSignals(
                    cpu_usage_ns=250_000_000,
                    runq=runq(8000),
                    cpu_pressure=Pressure(some=0.4, full=0.1),
                    throttling=CpuThrottling(periods=5, throttled_periods=1, throttled_ns=10),
                    memory=MemoryUse(usage_bytes=300 << 20),
                    mbm_total_bytes=1 << 30,
                ),
                "ctr-etl": ContainerSignals(cpu_usage_ns=900_000_000),
            },
            blame=blame,
            sources={"runq": Availability("schedstat", "no BTF"), "psi": Availability("psi")},
        )
        intents = e.signals_sampled(snapshot).intents
        protect.windows += 1
        protect.last, protect.sources = snapshot, dict(snapshot.sources)
        exporter.observe_intents(intents)
        executor.submit(intents)
        seen.append(intents)
    await executor.drain()
    exporter.publish(snapshot_of(e, executor, protect))
    return Node(e, executor, protect, metrics, exporter, seen, recorder)


@dataclass
class Scrape:
    """One scrape, parsed by prometheus_client's own parser."""

    types: dict[str, str]  # family name -> type
    samples: list[Sample]
    families: dict[str, list[Sample]]  # family name -> its samples

    def value(self, name: str, **labels: str) -> float:
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) == 1, (name, labels, [s for s in self.samples if s.name == name])
        return found[0]

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(s.labels.items())): s.value for s in self.samples if s.name == name}

    def by(self, name: str, label: str) -> dict[str, float]:
        return {s.labels[label]: s.value for s in self.samples if s.name == name}


def scrape(server: MetricsServer) -> Scrape:
    host, port = server.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    families = list(text_string_to_metric_families(text))
    return Scrape(
        {f.name: f.type for f in families},
        [s for f in families for s in f.samples],
        {f.name: list(f.samples) for f in families},
    )


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    n = await interfered_node()
    yield n
    n.executor.close()


@pytest.fixture
def served(node: Node) -> Iterator[MetricsServer]:
    server = serve_metrics("127.0.0.1:0", node.metrics.registry)
    assert server is not None
    yield server
    server.close()


# --- the node's state ---------------------------------------------------------------------


def test_pool_sizes_and_members_are_the_plans(node: Node, served: MetricsServer) -> None:
    got = scrape(served)
    pools = node.engine.plan.pools
    assert got.types["nri_qos_pool_cpus"] == "gauge"
    assert got.by("nri_qos_pool_cpus", "pool") == {
        "system": len(pools.system),
        SHARED: len(pools.shared),
        "reclaimed": len(pools.reclaimed),
        "dedicated": 0,
    }
    assert len(pools.reclaimed) == 2  # moved off web's NUMA node by the first rung
    members = got.by("nri_qos_pool_containers", "pool")
    assert members == {"system": 0, SHARED: 1, "reclaimed": 2, "dedicated": 0}


def test_each_container_shows_its_plan_under_its_name_and_class(
    node: Node, served: MetricsServer
) -> None:
    got = scrape(served)
    plans = {p.name: p for p in node.engine.plan.containers.values()}
    assert set(plans) == {WEB, ETL, COPY}
    for name, p in plans.items():
        key = {"container": name, "qos_class": p.qos_class.value}
        assert got.value("nri_qos_container_cpus", **key) == len(p.cpus.value)
        assert got.value("nri_qos_container_oom_score_adj", **key) == p.oom_score_adj.value
        shares = got.series("nri_qos_container_cpu_shares").get(tuple(sorted(key.items())))
        assert shares == p.cpu_shares.value  # None (the kubelet's kept): no series
        info = {**key, "pool": p.pool, "rdt_class": "", "net_class": ""}
        assert got.value("nri_qos_container_info", **info) == 1
    assert plans[WEB].qos_class.value == "shared_cores"
    assert plans[ETL].qos_class.value == "reclaimed_cores"
    assert plans[ETL].cpu_shares.value == 2  # so one series is there to compare


def test_reclaimable_cpu_and_memory_per_numa_node(node: Node, served: MetricsServer) -> None:
    got = scrape(served)
    expected = node.engine.reclaimable()
    assert set(expected) == {0, 1}
    assert got.by("nri_qos_reclaimable_cpu_millicores", "numa_node") == {
        str(n): r.millicores for n, r in expected.items()
    }
    assert got.by("nri_qos_reclaimable_memory_bytes", "numa_node") == {
        str(n): r.memory_bytes for n, r in expected.items()
    }
    assert sum(r.millicores for r in expected.values()) == 2000  # the two reclaimed CPUs


def test_the_latest_window_signals_per_container(node: Node, served: MetricsServer) -> None:
    got = scrape(served)
    web = {"container": WEB, "qos_class": "shared_cores"}
    p90 = runq(8000).quantile_ns(0.9) / 1e9
    assert got.value("nri_qos_container_runq_wait_p90_seconds", **web) == pytest.approx(p90)
    assert 0.004096 <= p90 < 0.008192  # inside the 4.096-8.192 ms bucket: seconds, not ns
    cpu_some = got.value("nri_qos_container_pressure_ratio", **web, resource="cpu", kind="some")
    assert cpu_some == 0.4
    assert got.value("nri_qos_container_pressure_ratio", **web, resource="cpu", kind="full") == 0.1
    assert got.value("nri_qos_container_cpu_usage_cores", **web) == pytest.approx(0.5)
    assert got.value("nri_qos_container_cpu_throttled_ratio", **web) == pytest.approx(0.2)
    assert got.value("nri_qos_container_memory_usage_bytes", **web) == 300 << 20
    bandwidth = got.value("nri_qos_container_memory_bandwidth_bytes_per_second", **web)
    assert bandwidth == 2 << 30
    etl = {"container": ETL, "qos_class": "reclaimed_cores"}
    assert got.value("nri_qos_container_cpu_usage_cores", **etl) == pytest.approx(1.8)
    # not measured is not zero: no series at all
    assert not [k for k in got.series("nri_qos_container_runq_wait_p90_seconds") if ETL in str(k)]
    assert got.series("nri_qos_container_pressure_ratio").keys() == {
        tuple(sorted({**web, "resource": "cpu", "kind": k}.items())) for k in ("some", "full")
    }
    assert got.value("nri_qos_runq_backend_info", backend="schedstat") == 1
    assert got.by("nri_qos_signal_source_info", "signal") == {"runq": 1, "psi": 1}
    assert got.types["nri_qos_signal_windows"] == "counter"
    assert got.value("nri_qos_signal_windows_total") == 5
    assert got.value("nri_qos_signal_window_seconds") == 0.5


def test_detections_steps_and_evictions_are_counted_from_the_engines_output(
    node: Node, served: MetricsServer
) -> None:
    notes = [n for i in node.intents for n in i.notes]
    steps_up = [n.message for n in notes if n.kind == "mitigation" and "step up" in n.message]
    evicts = [h for i in node.intents for h in i.host if isinstance(h, Evict)]
    # the scenario did what the counters must count (else this test proves nothing)
    assert [n.kind for n in notes if n.kind == "interference"] == ["interference"]
    assert [m.split(" on ")[0].split(":")[0] for m in steps_up] == [
        "step up shrink-reclaimed",
        "step up cap-cpu",
    ]
    assert [(e.namespace, e.pod) for e in evicts] == [("default", "etl")]

    got = scrape(served)
    for family in (
        "nri_qos_interference_detections",
        "nri_qos_mitigation_steps",
        "nri_qos_evictions",
        "nri_qos_engine_notes",
    ):
        assert got.types[family] == "counter"
    assert got.by("nri_qos_interference_detections_total", "verdict") == {
        "neighbours": 1,
        "self-throttled": 0,
        "unknown": 0,
    }
    steps = got.series("nri_qos_mitigation_steps_total")
    assert len(steps) == 8  # every rung x direction exists from the start
    assert {dict(k)["rung"]: v for k, v in steps.items() if v} == {
        "shrink-reclaimed": 1,
        "cap-cpu": 1,
        "evict": 1,  # the top rung's step is the eviction (no mitigation note of its own)
    }
    assert got.by("nri_qos_evictions_total", "trigger") == {
        "interference": 1,
        "memory_pressure": 0,
    }
    assert got.by("nri_qos_dry_run_evictions_total", "trigger") == {
        "interference": 0,
        "memory_pressure": 0,
    }
    warnings = got.value("nri_qos_engine_notes_total", kind="eviction", severity="warning")
    assert warnings == 1
    # the state now: web suffers, three rungs in force for it, etl's eviction under way
    verdict = {"container": WEB, "qos_class": "shared_cores", "verdict": "neighbours"}
    assert got.value("nri_qos_container_interference", **verdict) == 1
    assert got.by("nri_qos_interference_victims", "verdict")["neighbours"] == 1
    rungs = got.by("nri_qos_mitigation_rungs_in_force", "rung")
    assert rungs == {"shrink-reclaimed": 1, "cap-cpu": 1, "tighten-mba": 0, "evict": 1}
    assert got.value("nri_qos_evictions_in_flight") == 1
    delay = got.value("nri_qos_container_interference_delay_seconds", container=WEB,
                      qos_class="shared_cores")  # fmt: skip
    assert delay == pytest.approx(node.engine.protection.last_detections["ctr-web"].delay_ms / 1e3)


def test_controllers_and_host_work(node: Node, served: MetricsServer) -> None:
    got = scrape(served)
    assert [i.pod for i in node.recorder.asked if isinstance(i, Evict)] == ["etl"]
    enabled = got.series("nri_qos_controller_enabled")
    assert enabled == {
        (("controller", "evict"), ("domain", "evict"), ("mode", "optional")): 1,
        (("controller", "rdt"), ("domain", "rdt"), ("mode", "optional")): 0,
    }
    assert got.value("nri_qos_controller_intents_total", controller="evict", outcome="applied") == 1
    assert got.value("nri_qos_controller_intents_total", controller="evict", outcome="failed") == 0
    assert got.value("nri_qos_host_jobs_total", outcome="done") == 1
    assert got.value("nri_qos_host_stalled") == 0
    assert got.value("nri_qos_host_jobs_queued") == 0


def test_memory_pressure_evictions_in_dry_run_are_counted_apart() -> None:
    e = engine(eviction=EvictionConfig(dry_run=True))
    e.container_created(pod("etl", "reclaimed_cores"), container("etl", 0, oom=1000))
    metrics = Metrics()
    exporter = NodeExporter(metrics.registry)
    s = SignalSnapshot(
        end_s=1.0,
        window_s=0.5,
        containers={"ctr-etl": ContainerSignals(memory=MemoryUse(usage_bytes=1 << 30))},
        node_memory=NodeMemory(available_bytes=1 << 20, total_bytes=16 << 30),
    )
    exporter.observe_intents(e.signals_sampled(s).intents)
    r = metrics.registry
    assert r.get_sample_value("nri_qos_dry_run_evictions_total", {"trigger": "memory_pressure"})
    assert r.get_sample_value("nri_qos_evictions_total", {"trigger": "memory_pressure"}) == 0


def test_engine_notes_are_counted_by_kind_and_severity_apart() -> None:
    """The exporter keeps each (kind, severity) counter child after its first note: two
    severities of one kind, and two kinds of one severity, stay separate series."""
    metrics = Metrics()
    exporter = NodeExporter(metrics.registry)
    notes = (
        Note("plan", "a", "one"),
        Note("plan", "b", "two", Severity.WARNING),
        Note("pool", "node", "three"),
        Note("plan", "c", "four"),
    )
    for _ in range(2):
        exporter.observe_intents(Intents(notes=notes))
    r = metrics.registry

    def count(kind: str, severity: Severity) -> float | None:
        labels = {"kind": kind, "severity": str(severity)}
        return r.get_sample_value("nri_qos_engine_notes_total", labels)

    assert count("plan", Severity.INFO) == 4
    assert count("plan", Severity.WARNING) == 2
    assert count("pool", Severity.INFO) == 2


# --- the threading rule -------------------------------------------------------------------


async def test_a_scrape_shows_the_published_snapshot_never_the_live_engine(
    node: Node, served: MetricsServer
) -> None:
    """The engine belongs to the policy thread: a change there is invisible to scrapes
    until the next snapshot is published."""
    node.engine.container_created(pod("api", "shared_cores"), container("api", 500))
    before = scrape(served)
    assert "default/api/api" not in str(before.series("nri_qos_container_info"))
    snapshot = node.exporter.latest
    assert snapshot is not None
    with pytest.raises(FrozenInstanceError):
        snapshot.containers[0].cpus = 99  # type: ignore[misc]
    node.exporter.publish(snapshot_of(node.engine, node.executor, node.protect))
    after = scrape(served)
    assert after.value("nri_qos_container_cpus", container="default/api/api",
                       qos_class="shared_cores") >= 1  # fmt: skip
    assert after.by("nri_qos_pool_containers", "pool")[SHARED] == 2


def test_before_the_first_snapshot_only_the_runtime_metrics_are_served() -> None:
    metrics = Metrics()
    NodeExporter(metrics.registry)
    server = serve_metrics("127.0.0.1:0", metrics.registry)
    assert server is not None
    try:
        got = scrape(server)
    finally:
        server.close()
    assert "nri_qos_request_duration_seconds" in got.types
    assert "nri_qos_pool_cpus" not in got.types
    assert got.value("nri_qos_mitigation_steps_total", rung="evict", direction="up") == 0


# --- the runtime connection ---------------------------------------------------------------


def test_the_connection_state_and_reconnects() -> None:
    metrics = Metrics()
    server = serve_metrics("127.0.0.1:0", metrics.registry)
    assert server is not None
    try:
        first = scrape(server)
        assert first.by("nri_qos_runtime_connection_state", "state") == {
            "disconnected": 1,
            "connected": 0,
            "configured": 0,
        }
        assert first.value("nri_qos_runtime_reconnects_total") == 0
        for state in ("connected", "configured", "disconnected", "connected", "configured"):
            metrics.connection_changed(ConnectionState(state))
        metrics.connection_changed(ConnectionState.CONFIGURED)  # repeated: no change
        got = scrape(server)
    finally:
        server.close()
    assert got.by("nri_qos_runtime_connection_state", "state") == {
        "disconnected": 0,
        "connected": 0,
        "configured": 1,
    }
    assert got.types["nri_qos_runtime_reconnects"] == "counter"
    assert got.value("nri_qos_runtime_reconnects_total") == 1  # the first one is not


def test_request_path_metrics_keep_their_names_and_base_units() -> None:
    metrics = Metrics()
    metrics.request_seconds.labels("CreateContainer").observe(0.003)
    metrics.fail_open.labels("CreateContainer", "deadline").inc()
    server = serve_metrics("127.0.0.1:0", metrics.registry)
    assert server is not None
    try:
        got = scrape(server)
    finally:
        server.close()
    assert got.types["nri_qos_request_duration_seconds"] == "histogram"
    count = got.value("nri_qos_request_duration_seconds_count", method="CreateContainer")
    assert count == 1
    assert got.types["nri_qos_fail_open"] == "counter"
    fail_open = got.value("nri_qos_fail_open_total", method="CreateContainer", reason="deadline")
    assert fail_open == 1


async def test_every_name_follows_the_conventions(node: Node, served: MetricsServer) -> None:
    node.metrics.connection_changed(ConnectionState.CONNECTED)
    got = scrape(served)
    assert all(name.startswith("nri_qos_") for name in got.types)
    for name, kind in got.types.items():
        assert not name.endswith("_total"), name  # counters get it in the exposition only
        if kind == "counter":
            own = {s.name for s in got.families[name]}
            assert own <= {f"{name}_total", f"{name}_created"}, name
    for s in got.samples:
        if s.name.startswith("nri_qos_container_"):
            assert {"container", "qos_class"} <= s.labels.keys(), s
        else:
            assert "container" not in s.labels, s  # per-container series are named so


# --- the server ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, expected",
    [
        ("", None),
        ("  ", None),
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_addresses(address: str, expected: tuple[str, int] | None) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["9464", "127.0.0.1", "127.0.0.1:x", ":9464", "h:70000"])
def test_malformed_addresses_say_what_to_write(address: str) -> None:
    with pytest.raises(MetricsSetupError, match="expected HOST:PORT"):
        parse_address(address)


@pytest.mark.parametrize("address", ["0.0.0.0:9464", "10.1.2.3:9464", "[::]:9464"])
def test_a_non_loopback_address_is_refused_unless_allowed(address: str) -> None:
    with pytest.raises(MetricsSetupError, match="not a loopback address"):
        serve_metrics(address, Metrics().registry)
    assert parse_address(address, allow_remote=True) is not None


def test_disabled_serves_nothing() -> None:
    assert serve_metrics("", Metrics().registry) is None


def test_a_busy_port_is_a_setup_error_and_close_frees_the_port() -> None:
    metrics = Metrics()
    server = serve_metrics("127.0.0.1:0", metrics.registry)
    assert server is not None
    host, port = server.address
    with pytest.raises(MetricsSetupError, match="cannot listen"):
        serve_metrics(f"{host}:{port}", metrics.registry)
    server.close()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))  # free again


def test_ipv6_loopback_is_served() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = serve_metrics("[::1]:0", Metrics().registry)
    except MetricsSetupError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    assert server is not None
    try:
        _, port = server.address
        with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5) as reply:
            assert b"nri_qos_runtime_connection_state" in reply.read()
    finally:
        server.close()
