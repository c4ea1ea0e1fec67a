"""Layers import downward only; the engine does no I/O. Read from the source with `ast`.

* `qos_model` is the leaf: the standard library and nothing of ours.
* `nri_plugin.protocol` is sans-IO: stdlib, protobuf and `qos_model`; no socket, asyncio,
  threads, clock or logging.
* `nri_plugin.policy` (the engine) imports no protocol module, no asyncio, socket, thread,
  subprocess or file API, no host adapter (`isolation`) and no probe (`ebpf`), and calls
  no `open`.
* `isolation` and `ebpf` never import `nri_plugin` or the embedded runtime.
* nothing but the lab imports the embedded runtime (tests and bench aside).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO

STDLIB = set(sys.stdlib_module_names)


def modules(package: str) -> list[Path]:
    return sorted((REPO / package.replace(".", "/")).rglob("*.py"))


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = path.relative_to(REPO).parent.parts
                base = base[: len(base) - node.level + 1]
                yield node.lineno, ".".join([*base, node.module or ""]).strip(".")
            elif node.module:
                yield node.lineno, node.module


def violations(package: str, allowed: set[str], denied: frozenset[str] = frozenset()) -> list[str]:
    """Imports in `package` outside the allowed roots, or inside the denied prefixes."""
    found = []
    for path in modules(package):
        for line, name in imports(path):
            top = name.split(".")[0]
            is_denied = any(name == d or name.startswith(d + ".") for d in denied)
            if is_denied or top not in allowed | {"__future__"}:
                found.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    return found


def test_qos_model_is_the_leaf() -> None:
    assert violations("qos_model", STDLIB | {"qos_model"}) == []


def test_the_protocol_core_is_sans_io() -> None:
    io = {"socket", "asyncio", "threading", "time", "logging", "subprocess", "selectors"}
    allowed = STDLIB - io | {"google", "nri_plugin", "qos_model"}
    offenders = violations("nri_plugin.protocol", allowed)
    offenders += [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in modules("nri_plugin.protocol")
        for line, name in imports(path)
        if name.startswith("nri_plugin") and not name.startswith("nri_plugin.protocol")
    ]
    assert offenders == []


ENGINE_IO = {
    "asyncio",
    "socket",
    "threading",
    "subprocess",
    "selectors",
    "concurrent",
    "os",
    "pathlib",
    "shutil",
    "tempfile",
    "io",
    "time",
    "logging",
    "google",
}


def test_the_engine_is_pure() -> None:
    allowed = STDLIB - ENGINE_IO | {"nri_plugin", "qos_model"}
    denied = frozenset(
        {
            "nri_plugin.protocol",
            "nri_plugin.plugin",
            "nri_plugin.channel",
            "nri_plugin.dispatch",
            "nri_plugin.daemon",
            "nri_plugin.control",
            "nri_plugin.debug",
            "nri_plugin.events",
        }
    )
    assert violations("nri_plugin.policy", allowed, denied) == []
    # and reads no file through a builtin
    for path in modules("nri_plugin.policy"):
        tree = ast.parse(path.read_text())
        calls = [
            n.lineno
            for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "open"
        ]
        assert calls == [], f"{path.relative_to(REPO)} calls open() at lines {calls}"


@pytest.mark.parametrize("package", ["isolation", "ebpf"])
def test_host_adapters_and_probes_never_import_the_plugin(package: str) -> None:
    denied = {"nri_plugin", "embedded_runtime"}
    assert (
        violations(
            package,
            STDLIB
            | {"isolation", "ebpf", "qos_model", "pyroute2", "psutil", "bcc", "kubernetes"}
            | {"urllib3"},
            denied,
        )
        == []
    )


def test_only_the_lab_imports_the_embedded_runtime() -> None:
    users = []
    for package in ("nri_plugin", "isolation", "ebpf", "qos_model"):
        for path in modules(package):
            if any(name.split(".")[0] == "embedded_runtime" for _, name in imports(path)):
                users.append(str(path.relative_to(REPO)))
    assert sorted(users) == ["nri_plugin/lab.py", "nri_plugin/lab_interference.py"]


def test_the_checks_see_a_violation() -> None:
    """The checker itself can fail: the plugin runtime imports asyncio, which a rule that
    forbids it must report."""
    ours = {"nri_plugin", "qos_model", "isolation", "embedded_runtime"}
    allowed = (STDLIB - {"asyncio"}) | ours | {"google", "prometheus_client"}
    offenders = violations("nri_plugin", allowed)
    assert any(o.startswith("nri_plugin/plugin.py:") and "imports asyncio" in o for o in offenders)


# Code that sees the pods and containers the policy was given (the engine, what acts on
# its intents and what shows its state): none of it may read a field the request path
# leaves out of them, or it would silently read the field's default.
POLICY_READERS = (
    "nri_plugin/policy",
    "nri_plugin/control",
    "nri_plugin/debug",
    "nri_plugin/views.py",
    "nri_plugin/exporter.py",
    "nri_plugin/reporter.py",
    "nri_plugin/protect.py",
    "nri_plugin/dispatch.py",
)


def left_out_fields_read(paths: list[Path]) -> list[str]:
    from nri_plugin.protocol.convert import LEFT_OUT_FOR_POLICY

    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Attribute) or node.attr not in LEFT_OUT_FOR_POLICY:
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("_P", "self"):
                continue  # ParamSpec's P.args, an object's own attribute: not a container's
            where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            found.append(f"{where}:{node.lineno} reads .{node.attr}")
    return found


def test_nothing_after_the_request_path_reads_a_field_it_leaves_out() -> None:
    paths: list[Path] = []
    for entry in POLICY_READERS:
        target = REPO / entry
        paths.extend(sorted(target.rglob("*.py")) if target.is_dir() else [target])
    assert left_out_fields_read(paths) == []


def test_the_left_out_check_sees_a_read(tmp_path: Path) -> None:
    reader = tmp_path / "reader.py"
    reader.write_text("def f(pod):\n    return pod.sandbox_resources\n")
    (found,) = left_out_fields_read([reader])
    assert found.endswith("reader.py:2 reads .sandbox_resources")
