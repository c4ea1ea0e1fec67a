"""The Grafana dashboard asks only for what the exporter serves.

Every PromQL expression in `deploy/grafana/nri-qos-dashboard.json` (panel targets and
template variable queries) is reduced to the series names it selects, the label names it
matches and groups by, and the labels its legends print; each is checked against a real
scrape of a node after an interference run. A renamed metric, a counter asked for
without `_total`, a histogram without `_bucket`, or a label typo fails here instead of
showing an empty panel on a node at 3 a.m.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from nri_plugin.exporter import serve_metrics
from nri_plugin.metrics import ConnectionState
from tests.conftest import REPO
from tests.test_exporter import Scrape, interfered_node, scrape

DASHBOARD = REPO / "deploy" / "grafana" / "nri-qos-dashboard.json"
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape, not by the exporter
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}
GROUPING = r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)"
STRING = r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`'
AGGREGATION = r"\b(sum|min|max|avg|count|stddev|stdvar|quantile|group)\s*(\(|by\b)"
IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
NUMBER = re.compile(r"(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)")
# sample-name suffix -> the family types that produce it
SUFFIXES = {
    "_total": {"counter"},
    "_created": {"counter", "histogram", "summary"},
    "_bucket": {"histogram"},
    "_sum": {"histogram", "summary"},
    "_count": {"histogram", "summary"},
}
PLAIN = {"gauge", "untyped", "unknown", "info", "stateset"}


@dataclass
class Query:
    """What one PromQL expression asks of the exporter."""

    names: set[str] = field(default_factory=set)
    matchers: dict[str, set[str]] = field(default_factory=dict)  # series -> label names
    grouping: set[str] = field(default_factory=set)  # by / without / on / ignoring labels
    by: set[str] = field(default_factory=set)  # what an aggregation keeps
    aggregates: bool = False  # an aggregation drops every label it does not keep


def parse_promql(expr: str) -> Query:
    """The series names an expression selects, with the labels it uses. Label values
    (strings), ranges and Grafana variables inside them, grouping clauses and function
    names are not series names; an identifier followed by "(" is a function or an
    aggregation."""
    q = Query()
    text = re.sub(STRING, '""', expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries: [5m], [$__rate_interval]
    text = re.sub(r"\boffset\s+\S+", " ", text)

    q.aggregates = re.search(AGGREGATION, text) is not None

    def grouping(m: re.Match[str]) -> str:
        labels = {x.strip() for x in m.group(2).split(",") if x.strip()}
        q.grouping |= labels
        if m.group(1) == "by":
            q.by |= labels
        return " "

    text = re.sub(GROUPING, grouping, text)

    def matchers(m: re.Match[str]) -> str:
        labels = set(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)))
        name = m.group(1) or "__anonymous__"
        q.matchers.setdefault(name, set()).update(labels)
        return f" {m.group(1) or ''} "

    text = re.sub(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}", matchers, text)
    assert "$" not in text, f"a Grafana variable outside a string or range: {expr}"
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        number = NUMBER.match(text, i)
        ident = IDENT.match(text, i)
        if number is not None and (ident is None or number.end() >= ident.end()):
            i = number.end()
            continue
        if ident is None:
            i += 1
            continue
        word, i = ident.group(), ident.end()
        rest = text[i:].lstrip()
        if word.lower() in KEYWORDS or rest.startswith("("):
            continue
        q.names.add(word)
    q.names.update(n for n in q.matchers if n != "__anonymous__")
    return q


def family_of(name: str, types: dict[str, str]) -> str | None:
    """The family a series name belongs to, applying each type's own suffix rules: a
    counter is only ever `<family>_total`, a histogram `<family>_bucket|_sum|_count`."""
    if types.get(name) in PLAIN:
        return name
    for suffix, kinds in SUFFIXES.items():
        if name.endswith(suffix) and types.get(name.removesuffix(suffix)) in kinds:
            return name.removesuffix(suffix)
    return None


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in board["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows keep theirs inside


def expressions(board: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, expr, legend) of every query: panel targets and template variables
    (`label_values(selector, label)` is reduced to its selector)."""
    for p in panels(board):
        for t in p.get("targets", []):
            yield f"panel {p['title']!r} {t['refId']}", t["expr"], t.get("legendFormat", "")
    for v in board["templating"]["list"]:
        if v["type"] != "query":
            continue
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\)", query.strip())
        assert m is not None, f"variable {v['name']}: unsupported query {query}"
        yield f"variable {v['name']!r}", m.group(1), "{{" + m.group(2) + "}}"


def problems(expr: str, legend: str, got: Scrape) -> list[str]:
    """Everything `expr` asks for that the scrape does not serve."""
    q = parse_promql(expr)
    found: list[str] = []
    if not q.names:
        found.append("selects no series")
    labels: set[str] = set(TARGET_LABELS)
    for name in sorted(q.names):
        family = family_of(name, got.types)
        if family is None:
            base = {name.removesuffix(s) for s in SUFFIXES} & got.types.keys()
            hint = f" (served: {', '.join(f'{b} as {got.types[b]}' for b in base)})"
            found.append(f"{name} is not served{hint if base else ''}")
            continue
        samples = [s for s in got.families[family] if s.name == name]
        if not samples:
            found.append(f"{name}: the scrape has no sample to check its labels against")
            continue
        own = set(TARGET_LABELS).union(*(s.labels.keys() for s in samples))
        labels |= own
        for label in sorted(q.matchers.get(name, set()) - own):
            found.append(f"{name} has no label {label!r}")
    for label in sorted(q.grouping - labels):
        found.append(f"groups by {label!r}, which none of its series has")
    kept = q.by if q.aggregates else labels
    for label in sorted(set(re.findall(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", legend))):
        if label not in kept:
            found.append(f"legend prints {label!r}, which the result has not")
    return found


# --- a scrape with every family populated -------------------------------------------------


@pytest.fixture(scope="module")
def served_scrape() -> Iterator[Scrape]:
    node = asyncio.run(interfered_node())
    m = node.metrics
    # what the plugin runtime counts on its request path, through the same calls
    m.connection_changed(ConnectionState.CONNECTED)
    m.connection_changed(ConnectionState.CONFIGURED)
    m.requests.labels("CreateContainer").inc()
    m.request_seconds.labels("CreateContainer").observe(0.0021)
    m.fail_open.labels("CreateContainer", "deadline").inc()
    m.protocol_errors.labels("corrupt").inc()
    m.overload.labels("unread_replies").inc()
    m.connections.labels("connected").inc()
    m.update_containers.labels("ok").inc()
    server = serve_metrics("127.0.0.1:0", m.registry)
    assert server is not None
    try:
        yield scrape(server)
    finally:
        server.close()
        node.executor.close()


# --- the checks -----------------------------------------------------------------------------


def test_every_query_asks_only_for_served_series_and_labels(served_scrape: Scrape) -> None:
    failures = [
        f"{where}: {problem}\n    {expr}"
        for where, expr, legend in expressions(dashboard())
        for problem in problems(expr, legend, served_scrape)
    ]
    assert failures == [], "\n".join(failures)


def test_the_dashboard_covers_what_matters(served_scrape: Scrape) -> None:
    """The panels the brief asks for exist, each on the right series."""
    used = {
        family_of(n, served_scrape.types)
        for _where, expr, _legend in expressions(dashboard())
        for n in parse_promql(expr).names
    }
    assert {
        "nri_qos_request_duration_seconds",
        "nri_qos_fail_open",
        "nri_qos_runtime_connection_state",
        "nri_qos_runtime_reconnects",
        "nri_qos_pool_cpus",
        "nri_qos_reclaimable_cpu_millicores",
        "nri_qos_reclaimable_memory_bytes",
        "nri_qos_container_runq_wait_p90_seconds",
        "nri_qos_container_pressure_ratio",
        "nri_qos_interference_detections",
        "nri_qos_mitigation_steps",
        "nri_qos_evictions",
        "nri_qos_controller_enabled",
        "nri_qos_controller_intents",
    } <= used
    quantiles = [expr for _w, expr, _l in expressions(dashboard()) if "histogram_quantile" in expr]
    assert any("0.5," in e for e in quantiles) and any("0.99," in e for e in quantiles)
    assert all("by (le, method)" in e for e in quantiles)


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "instance", "container"} <= variables
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    for p in panels(board):
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p.get("description"), f"panel {p['title']!r} does not say what it shows"
        for t in p["targets"]:
            for var in re.findall(r"\$(\w+)", t["expr"]):
                assert var in variables or var.startswith("__"), (p["title"], var)


# --- the checker itself can fail ----------------------------------------------------------


def test_metric_names_are_extracted_without_functions_labels_or_variables() -> None:
    q = parse_promql(
        "histogram_quantile(0.99, sum by (le, method) (rate(nri_qos_request_duration_seconds"
        '_bucket{instance=~"$instance", method!="x"}[$__rate_interval]))) > 1e-3 '
        "and on (instance) nri_qos_pool_cpus offset 5m"
    )
    assert q.names == {"nri_qos_request_duration_seconds_bucket", "nri_qos_pool_cpus"}
    assert q.matchers == {"nri_qos_request_duration_seconds_bucket": {"instance", "method"}}
    assert q.grouping == {"le", "method", "instance"}


@pytest.mark.parametrize(
    "expr, problem",
    [
        ("rate(nri_qos_no_such_metric_total[5m])", "is not served"),
        ("rate(nri_qos_requests[5m])", "served: nri_qos_requests as counter"),  # no _total
        ("nri_qos_pool_cpus_total", "is not served"),  # a gauge has no _total
        ("nri_qos_request_duration_seconds_total", "is not served"),  # histogram
        ("nri_qos_fail_open_bucket", "is not served"),  # a counter has no buckets
        ('nri_qos_pool_cpus{pol="reclaimed"}', "has no label 'pol'"),
        ("sum by (poool) (nri_qos_pool_cpus)", "groups by 'poool'"),
        ("sum(rate(nri_qos_fail_open_total[5m]))", "legend prints 'reason'"),  # summed away
        ("nri_qos_pool_cpus", "legend prints 'reason'"),  # never had it
    ],
)
def test_the_check_catches_what_a_panel_would_show_empty(
    served_scrape: Scrape, expr: str, problem: str
) -> None:
    found = problems(expr, "{{reason}}", served_scrape)
    assert any(problem in f for f in found), found
