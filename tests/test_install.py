"""`nri-qos install` / `uninstall` under a temporary --root holding copies of the runtime
configs in tests/data/runtime-configs/ (see its README for what each reproduces)."""

from __future__ import annotations

import argparse
import io
import json
import os
import tomllib
from pathlib import Path

import pytest

from nri_plugin import install
from nri_plugin.config import parse_config
from tests.conftest import DATA

CONFIGS = DATA / "runtime-configs"
NRI = "io.containerd.nri.v1.nri"

Tree = dict[str, tuple[bytes | None, int]]  # path -> content (None: a directory), mode


def run(root: Path, *argv: str, answer: str | None = None) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    install.add_install_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args([*argv, "--root", str(root)])
    out, err = io.StringIO(), io.StringIO()
    ask = None if answer is None else (lambda _question: answer)
    code = install.run_install_command(args, ask=ask, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def place(root: Path, fixture: str, target: str, mode: int = 0o644) -> Path:
    path = root / target.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((CONFIGS / fixture).read_bytes())
    path.chmod(mode)
    return path


def snapshot(root: Path) -> Tree:
    tree: Tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = Path(dirpath, name)
            tree[str(p.relative_to(root))] = (None, p.stat().st_mode & 0o7777)
        for name in filenames:
            p = Path(dirpath, name)
            tree[str(p.relative_to(root))] = (p.read_bytes(), p.stat().st_mode & 0o7777)
    return tree


def nri_of(root: Path) -> dict[str, object]:
    data = tomllib.loads((root / "etc/containerd/config.toml").read_text())
    section = data["plugins"].get(NRI, {})
    assert isinstance(section, dict)
    return section


def text_without(before: str, after: str) -> tuple[list[str], list[str]]:
    """Lines only in before, lines only in after (order kept)."""
    old, new = before.splitlines(), after.splitlines()
    return [ln for ln in old if ln not in new], [ln for ln in new if ln not in old]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


# --- containerd 1.7 -------------------------------------------------------------------------


def test_dry_run_shows_the_diff_and_changes_nothing(root: Path) -> None:
    place(root, "containerd-1.7-default.toml", install.CONTAINERD_CONFIG)
    before = snapshot(root)
    code, out, err = run(root, "install", "--dry-run")
    assert (code, err) == (0, "")
    assert snapshot(root) == before
    assert "--- a/etc/containerd/config.toml\n+++ b/etc/containerd/config.toml\n" in out
    assert "-    disable = true\n+    disable = false\n" in out
    assert "dry run: nothing changed" in out


def test_install_then_uninstall_restores_every_byte(root: Path) -> None:
    place(root, "containerd-1.7-default.toml", install.CONTAINERD_CONFIG, mode=0o600)
    place(root, "crio.conf", install.CRIO_CONFIG)
    place(root, "crio-dropin-disabled.conf", f"{install.CRIO_DROPINS}/10-site.conf")
    before = snapshot(root)
    original = (CONFIGS / "containerd-1.7-default.toml").read_text()

    code, out, err = run(root, "install", "--yes")
    assert (code, err) == (0, ""), out
    # containerd: exactly one line changed, comments and layout kept
    edited = (root / "etc/containerd/config.toml").read_text()
    assert text_without(original, edited) == (["    disable = true"], ["    disable = false"])
    assert nri_of(root)["disable"] is False
    assert (root / "etc/containerd/config.toml").stat().st_mode & 0o777 == 0o600
    # CRI-O: the drop-in that decides (enable_nri = false) is the one edited
    dropin = (root / "etc/crio/crio.conf.d/10-site.conf").read_text()
    assert "enable_nri = true" in dropin and "enable_nri = false" not in dropin
    assert (root / "etc/crio/crio.conf").read_bytes() == (CONFIGS / "crio.conf").read_bytes()
    # ours
    unit = (root / "etc/systemd/system/nri-qos.service").read_text()
    assert "Type=notify" in unit and "ExecStart=/usr/local/bin/nri-qos run" in unit
    assert (root / "etc/tmpfiles.d/nri-qos.conf").read_text().count("/run/nri-qos") >= 1
    parse_config((root / "etc/nri-qos/config.toml").read_text(), "default config")
    manifest = json.loads((root / "var/lib/nri-qos/install.json").read_text())
    assert {e["path"] for e in manifest["modified"]} == {
        install.CONTAINERD_CONFIG,
        f"{install.CRIO_DROPINS}/10-site.conf",
    }
    for entry in manifest["modified"]:  # timestamped backups of the originals
        backup = root / entry["backup"].lstrip("/")
        assert backup.name.startswith(Path(entry["path"]).name + ".20")
        assert backup.read_bytes() == before[entry["path"].lstrip("/")][0]
    assert "systemctl restart containerd" in out and "systemctl restart crio" in out

    code, out, err = run(root, "uninstall", "--yes")
    assert (code, err) == (0, ""), out
    assert snapshot(root) == before


def test_a_config_without_the_section_gets_it_added(root: Path) -> None:
    place(root, "containerd-1.7-no-nri.toml", install.CONTAINERD_CONFIG)
    original = (CONFIGS / "containerd-1.7-no-nri.toml").read_text()
    code, out, _ = run(root, "install", "--yes")
    assert code == 0, out
    edited = (root / "etc/containerd/config.toml").read_text()
    assert edited.startswith(original)  # everything that was there, untouched
    assert edited[len(original) :] == f'\n[plugins."{NRI}"]\n  disable = false\n'
    assert nri_of(root) == {"disable": False}


def test_crio_default_config_gets_enable_nri_under_its_commented_default(root: Path) -> None:
    place(root, "crio.conf", install.CRIO_CONFIG)
    code, out, _ = run(root, "install", "--yes")
    assert code == 0, out
    text = (root / "etc/crio/crio.conf").read_text()
    assert "# enable_nri = false\nenable_nri = true\n" in text
    assert tomllib.loads(text)["crio"]["nri"] == {"enable_nri": True}


def test_crio_without_nri_table_gets_one(root: Path) -> None:
    place(root, "crio-no-nri.conf", install.CRIO_CONFIG)
    code, out, _ = run(root, "install", "--yes")
    assert code == 0, out
    data = tomllib.loads((root / "etc/crio/crio.conf").read_text())
    assert data["crio"] == {"runtime": {"default_runtime": "crun"}, "nri": {"enable_nri": True}}


# --- already enabled, or disabled on 2.x ----------------------------------------------------


def test_an_enabled_containerd_2_config_is_left_alone(root: Path) -> None:
    path = place(root, "containerd-2.x-default.toml", install.CONTAINERD_CONFIG)
    before = path.read_bytes()
    code, out, _ = run(root, "install", "--yes")
    assert code == 0, out
    assert path.read_bytes() == before
    assert "NRI enabled" in out and "systemctl restart containerd" not in out
    manifest = json.loads((root / "var/lib/nri-qos/install.json").read_text())
    assert manifest["modified"] == []


def test_containerd_2_disabled_is_enabled_keeping_quotes_and_comments(root: Path) -> None:
    place(root, "containerd-2.x-disabled.toml", install.CONTAINERD_CONFIG)
    original = (CONFIGS / "containerd-2.x-disabled.toml").read_text()
    code, out, _ = run(root, "install", "--yes")
    assert code == 0, out
    edited = (root / "etc/containerd/config.toml").read_text()
    assert text_without(original, edited) == (
        ["  disable = true   # off until we need it", "  disable_connections = true"],
        ["  disable = false   # off until we need it", "  disable_connections = false"],
    )


def test_pre_installed_keeps_connections_closed(root: Path) -> None:
    """The runtime launches a pre-installed plugin itself: external connections may stay off."""
    place(root, "containerd-2.x-disabled.toml", install.CONTAINERD_CONFIG)
    code, out, _ = run(root, "install", "--yes", "--pre-installed")
    assert code == 0, out
    assert nri_of(root)["disable"] is False
    assert nri_of(root)["disable_connections"] is True


# --- consent -------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [None, "n", "", "no"])
def test_no_consent_no_change(root: Path, answer: str | None) -> None:
    place(root, "containerd-1.7-default.toml", install.CONTAINERD_CONFIG)
    before = snapshot(root)
    code, out, _ = run(root, "install", answer=answer)
    assert code == install.EXIT_REFUSED
    assert snapshot(root) == before
    assert "+    disable = false" in out  # it did show what it wanted to do
    if answer is None:  # no terminal to ask: says how to proceed
        assert "run again with --yes" in out


def test_interactive_yes_applies(root: Path) -> None:
    place(root, "containerd-1.7-default.toml", install.CONTAINERD_CONFIG)
    code, _, _ = run(root, "install", answer="y")
    assert code == 0
    assert nri_of(root)["disable"] is False


# --- our own files -------------------------------------------------------------------------


def test_an_existing_config_is_never_overwritten(root: Path) -> None:
    mine = root / "etc/nri-qos/config.toml"
    mine.parent.mkdir(parents=True)
    mine.write_text('[log]\nlevel = "debug"\n')
    code, out, _ = run(root, "install", "--yes")
    assert code == 0
    assert mine.read_text() == '[log]\nlevel = "debug"\n'
    assert "config.toml exists: kept" in out
    run(root, "uninstall", "--yes")
    assert mine.read_text() == '[log]\nlevel = "debug"\n'


def test_default_config_uses_the_runtime_socket(root: Path) -> None:
    path = place(root, "containerd-2.x-default.toml", install.CONTAINERD_CONFIG)
    path.write_text(path.read_text().replace("/var/run/nri/nri.sock", "/run/nri/other.sock"))
    assert run(root, "install", "--yes")[0] == 0
    config = parse_config((root / "etc/nri-qos/config.toml").read_text())
    assert str(config.plugin.socket_path) == "/run/nri/other.sock"


def test_pre_installed_layout(root: Path) -> None:
    place(root, "containerd-1.7-default.toml", install.CONTAINERD_CONFIG)
    before = snapshot(root)
    code, out, _ = run(root, "install", "--yes", "--pre-installed", "--exec", "/usr/bin/nri-qos")
    assert code == 0, out
    launcher = root / "opt/nri/plugins/50-nri-qos"
    assert launcher.stat().st_mode & 0o777 == 0o755
    assert launcher.read_text().startswith("#!/bin/sh\n")
    assert 'exec /usr/bin/nri-qos run "$@"\n' in launcher.read_text()
    # empty: any text the runtime passes replaces config.toml's [policy]
    assert (root / "etc/nri/conf.d/50-nri-qos.conf").read_bytes() == b""
    assert not (root / "etc/systemd/system/nri-qos.service").exists()
    assert nri_of(root)["disable"] is False
    assert "systemctl restart containerd" in out
    assert run(root, "uninstall", "--yes")[0] == 0
    assert snapshot(root) == before


# --- uninstall -------------------------------------------------------------------------------


def test_uninstall_keeps_what_changed_since(root: Path) -> None:
    place(root, "containerd-1.7-default.toml", install.CONTAINERD_CONFIG)
    assert run(root, "install", "--yes")[0] == 0
    config = root / "etc/containerd/config.toml"
    config.write_text(config.read_text() + "# edited by an admin afterwards\n")
    edited = config.read_bytes()
    code, out, _ = run(root, "uninstall", "--yes")
    assert code == 0
    assert config.read_bytes() == edited
    backup = next((root / "var/lib/nri-qos/backups/etc/containerd").iterdir())
    assert f"the original is /{backup.relative_to(root)}" in out
    assert backup.read_bytes() == (CONFIGS / "containerd-1.7-default.toml").read_bytes()
    assert not (root / "etc/systemd/system/nri-qos.service").exists()


def test_uninstall_dry_run_and_refusal_change_nothing(root: Path) -> None:
    place(root, "containerd-1.7-default.toml", install.CONTAINERD_CONFIG)
    assert run(root, "install", "--yes")[0] == 0
    installed = snapshot(root)
    code, out, _ = run(root, "uninstall", "--dry-run")
    assert code == 0 and "+    disable = true" in out
    assert run(root, "uninstall", answer="n")[0] == install.EXIT_REFUSED
    assert snapshot(root) == installed


# --- errors: one line each --------------------------------------------------------------------


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("nri-qos: "), err
    return err


def test_second_install_is_refused(root: Path) -> None:
    assert run(root, "install", "--yes")[0] == 0
    code, _, err = run(root, "install", "--yes")
    assert code == install.EXIT_SETUP
    assert "run `nri-qos uninstall` first" in one_line(err)


def test_uninstall_without_install(root: Path) -> None:
    code, _, err = run(root, "uninstall", "--yes")
    assert code == install.EXIT_SETUP
    assert "nothing to uninstall" in one_line(err)


def test_broken_toml_is_not_touched(root: Path) -> None:
    path = root / "etc/containerd/config.toml"
    path.parent.mkdir(parents=True)
    path.write_text('version = 2\n[plugins."io.containerd.nri.v1.nri"\ndisable = true\n')
    before = snapshot(root)
    code, _, err = run(root, "install", "--yes")
    assert code == install.EXIT_SETUP
    assert "is not valid TOML" in one_line(err)
    assert snapshot(root) == before


def test_a_layout_the_editor_cannot_follow_is_refused(root: Path) -> None:
    """Dotted keys instead of a table header: no line to edit, and appending a header
    would redefine the table; the check after the edit catches it, nothing is written."""
    path = root / "etc/containerd/config.toml"
    path.parent.mkdir(parents=True)
    path.write_text(f'version = 2\n[plugins]\n"{NRI}".disable = true\n')
    before = snapshot(root)
    code, _, err = run(root, "install", "--yes")
    assert code == install.EXIT_SETUP
    assert "set disable = false" in one_line(err) and "by hand" in err
    assert snapshot(root) == before


def test_version_1_config_is_refused(root: Path) -> None:
    path = root / "etc/containerd/config.toml"
    path.parent.mkdir(parents=True)
    path.write_text('[plugins.cri]\nsandbox_image = "pause"\n')
    code, _, err = run(root, "install", "--yes")
    assert code == install.EXIT_SETUP
    assert "config version 1 is not supported" in one_line(err)


def test_containerd_without_a_config_file_gets_a_minimal_one(root: Path) -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/containerd").write_text("")
    assert run(root, "install", "--yes")[0] == 0
    data = tomllib.loads((root / "etc/containerd/config.toml").read_text())
    assert data == {"version": 2, "plugins": {NRI: {"disable": False}}}
    assert run(root, "uninstall", "--yes")[0] == 0
    assert not (root / "etc/containerd").exists()


def test_set_bool_is_a_minimal_edit() -> None:
    text = "# top\n[a]\n  x = 1 # keep\n  flag = true  # why\n[b]\n  flag = true\n"
    new = install.set_bool(text, "t.toml", ("a",), "flag", False, "[a]")
    assert new == text.replace("flag = true  # why", "flag = false  # why")
    quoted = "[plugins.'io.containerd.nri.v1.nri']\n  disable = true\n"
    header = "[plugins.'io.containerd.nri.v1.nri']"
    assert install.set_bool(quoted, "t", ("plugins", NRI), "disable", False, header) == (
        quoted.replace("true", "false")
    )
