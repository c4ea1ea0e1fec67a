"""isolation.netclass without a kernel: rate parsing, the default classes, validation, and
the dry run (every change is recorded, nothing is sent to the kernel).

The tree reads the interface through netlink; here a fake netlink answers the reads and
fails the test on any write, so "touches nothing" is checked, not assumed.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from isolation.errors import HostError
from isolation.netclass import (
    DEFAULT_CLASS,
    NetClassSpec,
    NetClassTree,
    cgroup2_id,
    classid_text,
    default_classes,
    link_speed_bps,
    parse_rate,
)
from isolation.writes import HostWriter

MBIT = 1_000_000
GBIT = 1_000_000_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30%", 30 * MBIT),
        ("12.5%", 12_500_000),
        ("100%", 100 * MBIT),
        ("100mbit", 100 * MBIT),
        ("1gbit", GBIT),
        ("1.5GBit", 1_500_000_000),
        ("500kbit", 500_000),
        ("64000", 64_000),
        (" 20 mbit ", 20 * MBIT),
        ("1000bit", 1000),
    ],
)
def test_parse_rate(text: str, expected: int) -> None:
    assert parse_rate(text, 100 * MBIT) == expected


@pytest.mark.parametrize(
    ("text", "link", "message"),
    [
        ("fast", 100 * MBIT, "not a number"),
        ("100mbps", 100 * MBIT, "not bytes"),
        ("10furlong", 100 * MBIT, "unknown unit"),
        ("0", 100 * MBIT, "below 1 bit/s"),
        ("150%", 100 * MBIT, "(0, 100]"),
        ("0%", 100 * MBIT, "(0, 100]"),
        ("30%", 0, "link rate is unknown"),
        ("-5mbit", 100 * MBIT, "not a number"),
    ],
)
def test_parse_rate_refuses(text: str, link: int, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("]", r"\]")):
        parse_rate(text, link)


def test_default_classes_share_the_link() -> None:
    classes = default_classes(100 * MBIT)
    assert [(c.name, c.minor, c.rate_bps, c.ceil_bps, c.prio) for c in classes] == [
        ("system", 0x10, 40 * MBIT, 100 * MBIT, 0),
        ("online", 0x20, 30 * MBIT, 100 * MBIT, 1),
        ("batch", 0x30, 30 * MBIT, 100 * MBIT, 2),
    ]
    assert sum(c.rate_bps for c in classes) <= 100 * MBIT
    assert DEFAULT_CLASS in {c.name for c in classes}
    with pytest.raises(ValueError, match="positive"):
        default_classes(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"minor": 1}, "minor"),
        ({"minor": 0x10000}, "minor"),
        ({"rate_bps": 0}, "rate <= ceil"),
        ({"ceil_bps": 5}, "rate <= ceil"),
        ({"prio": 8}, "prio"),
        ({"name": ""}, "name"),
    ],
)
def test_spec_validation(kwargs: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"name": "x", "minor": 0x10, "rate_bps": 10, "ceil_bps": 20, "prio": 0}
    with pytest.raises(ValueError, match=message):
        NetClassSpec(**(base | kwargs))


def test_tree_validation() -> None:
    classes = default_classes(100 * MBIT)
    with pytest.raises(ValueError, match="default class 'gold'"):
        NetClassTree("eth0", classes, default="gold")
    with pytest.raises(ValueError, match="unique"):
        NetClassTree("eth0", [*classes, classes[0]], default="online")
    oversold = [NetClassSpec("a", 0x10, 60, 100, 0), NetClassSpec("b", 0x20, 60, 100, 1)]
    with pytest.raises(ValueError, match="more than the link"):
        NetClassTree("eth0", oversold, default="a")
    with pytest.raises(ValueError, match="at least one"):
        NetClassTree("eth0", [], default="a")


def test_identities() -> None:
    assert classid_text(0x7A510020) == "7a51:20"
    tree = NetClassTree("eth0", default_classes(GBIT), default="online", netns="pod-1")
    assert tree.classid(0x20) == 0x7A510020
    assert tree.pin_dir == Path("/sys/fs/bpf/nri-qos/pod-1-eth0")
    assert tree.link_bps == GBIT
    assert NetClassTree("eth0", default_classes(GBIT), default="online").where == "eth0@host"


def test_cgroup2_id_is_the_directory_inode(tmp_path: Path) -> None:
    group = tmp_path / "pod"
    group.mkdir()
    with pytest.raises(HostError) as raised:
        cgroup2_id(group)
    assert raised.value.errno == errno.ENOTDIR
    (group / "cgroup.controllers").write_text("")
    assert cgroup2_id(group) == group.stat().st_ino


def test_link_speed_of_a_missing_link_is_unknown() -> None:
    assert link_speed_bps("no-such-link0") is None


# --- dry run against a fake netlink --------------------------------------------------------


class Msg(dict[str, Any]):
    """A netlink message as pyroute2 shows it: fields by key, attributes by get_attr."""

    def __init__(self, attrs: dict[str, Any] | None = None, **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs or {}

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


class FakeNetlink:
    """Answers reads with a fixed state; any write fails the test."""

    def __init__(
        self,
        qdiscs: list[Msg] | None = None,
        classes: list[Msg] | None = None,
        filters: list[Msg] | None = None,
    ) -> None:
        self.qdiscs = qdiscs or [Msg({"TCA_KIND": "noqueue"}, handle=0, parent=0xFFFFFFFF)]
        self.classes = classes or []
        self.filters = filters or []

    def link_lookup(self, ifname: str) -> list[int]:
        return [7] if ifname == "veth0" else []

    def get_qdiscs(self, index: int) -> list[Msg]:
        return self.qdiscs

    def get_classes(self, index: int) -> list[Msg]:
        return self.classes

    def get_filters(self, index: int, parent: int) -> list[Msg]:
        return self.filters

    def tc(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"dry run sent a tc change: {args} {kwargs}")

    def close(self) -> None:
        pass


def htb_root(handle: int, default: int) -> Msg:
    options = Msg({"TCA_HTB_INIT": {"defcls": default}})
    return Msg({"TCA_KIND": "htb", "TCA_OPTIONS": options}, handle=handle, parent=0xFFFFFFFF)


def htb_class(classid: int, parent: int, rate_bps: int, ceil_bps: int, prio: int) -> Msg:
    parms = {"rate": rate_bps // 8, "ceil": ceil_bps // 8, "prio": prio}
    options = Msg({"TCA_HTB_PARMS": parms})
    stats = Msg({"TCA_STATS_BASIC": {"bytes": 1234, "packets": 5}})
    return Msg(
        {"TCA_KIND": "htb", "TCA_OPTIONS": options, "TCA_STATS2": stats},
        handle=classid,
        parent=parent,
    )


def dry_tree(fake: FakeNetlink, tmp_path: Path) -> tuple[NetClassTree, HostWriter]:
    writer = HostWriter(dry_run=True)
    tree = NetClassTree(
        "veth0",
        default_classes(100 * MBIT),
        default="online",
        netns="pod-1",
        writer=writer,
        pin_dir=tmp_path / "pins" / "pod-1-veth0",
    )
    tree._ipr = fake  # the netlink handle the tree would have opened in the netns
    return tree, writer


def test_dry_run_install_records_the_plan_and_touches_nothing(tmp_path: Path) -> None:
    tree, writer = dry_tree(FakeNetlink(), tmp_path)
    line = tree.ensure()
    assert line.startswith("planned: installed htb 7a51: on veth0@pod-1")
    actions = [(c.action, c.target.split(" ", 1)[1]) for c in writer.planned if " " in c.target]
    assert actions[:6] == [
        ("tc add qdisc", "root htb 7a51:"),
        ("tc add class", "7a51:1"),
        ("tc add class", "7a51:10"),
        ("tc add qdisc", "fq_codel parent 7a51:10"),
        ("tc add class", "7a51:20"),
        ("tc add qdisc", "fq_codel parent 7a51:20"),
    ]
    planned = [str(change) for change in writer.planned]
    assert any(c.action == "bpf load" for c in writer.planned), planned
    assert writer.planned[-1].action == "tc add filter"
    assert writer.planned[0].value == "default 20"  # unclassified traffic -> online
    online = next(c for c in writer.planned if c.target == "veth0@pod-1 7a51:20")
    assert online.value == "rate 30000000bit ceil 100000000bit prio 1"

    tree.classify(4242, "batch")
    assert tree.unclassify(4242) is True  # a dry run assumes the change would succeed
    assert [c.action for c in writer.planned[-2:]] == ["bpf map update", "bpf map delete"]
    assert writer.planned[-2].value == "4242 -> 7a51:30"
    assert tree.classified() == {}
    assert not (tmp_path / "pins").exists()  # not even the pin directory


def test_dry_run_adopt_changes_classes_in_place(tmp_path: Path) -> None:
    link = 100 * MBIT
    fake = FakeNetlink(
        qdiscs=[htb_root(0x7A510000, 0x20)],
        classes=[
            htb_class(0x7A510001, 0xFFFFFFFF, link, link, 0),
            htb_class(0x7A510010, 0x7A510001, 40 * MBIT, link, 0),
            htb_class(0x7A510020, 0x7A510001, 20 * MBIT, link, 1),  # was 20, now 30
            htb_class(0x7A510030, 0x7A510001, 30 * MBIT, link, 2),
        ],
        filters=[
            Msg({"TCA_KIND": "bpf", "TCA_OPTIONS": Msg({"TCA_BPF_NAME": "nri-qos-netclass"})})
        ],
    )
    tree, writer = dry_tree(fake, tmp_path)
    line = tree.ensure()
    assert line.startswith("planned: adopted htb 7a51:")
    assert "changed online (rate 20mbit->30mbit" in line
    assert "kept filter" in line
    assert [(c.action, c.target) for c in writer.planned] == [
        ("tc change class", "veth0@pod-1 7a51:20")
    ]
    stats = tree.stats()
    assert stats["online"].bytes == 1234 and stats["online"].classid == "7a51:20"
    assert stats["online"].rate_bps == 20 * MBIT


def test_dry_run_adopt_with_nothing_to_do(tmp_path: Path) -> None:
    link = 100 * MBIT
    specs = default_classes(link)
    fake = FakeNetlink(
        qdiscs=[htb_root(0x7A510000, 0x20)],
        classes=[htb_class(0x7A510001, 0xFFFFFFFF, link, link, 0)]
        + [
            htb_class(0x7A510000 | s.minor, 0x7A510001, s.rate_bps, s.ceil_bps, s.prio)
            for s in specs
        ],
        filters=[
            Msg({"TCA_KIND": "bpf", "TCA_OPTIONS": Msg({"TCA_BPF_NAME": "nri-qos-netclass"})})
        ],
    )
    tree, writer = dry_tree(fake, tmp_path)
    assert tree.ensure().endswith("classes unchanged; kept filter")
    assert writer.planned == []


def test_a_root_qdisc_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    tree, writer = dry_tree(FakeNetlink(qdiscs=[htb_root(0x10000, 0x30)]), tmp_path)
    with pytest.raises(HostError) as raised:
        tree.ensure()
    assert raised.value.errno == errno.EEXIST
    assert "htb 1:0 that nri-qos did not install" in str(raised.value)
    assert writer.planned == []


def test_dry_run_remove_of_our_tree(tmp_path: Path) -> None:
    tree, writer = dry_tree(FakeNetlink(qdiscs=[htb_root(0x7A510000, 0x20)]), tmp_path)
    assert tree.remove() == "planned: removed htb 7a51: from veth0@pod-1"
    assert [c.action for c in writer.planned] == ["tc del qdisc"]


def test_missing_interface_is_one_clear_error(tmp_path: Path) -> None:
    writer = HostWriter(dry_run=True)
    tree = NetClassTree("eth9", default_classes(GBIT), default="online", writer=writer)
    tree._ipr = FakeNetlink()
    with pytest.raises(HostError, match="no interface eth9 in host") as raised:
        tree.ensure()
    assert raised.value.errno == errno.ENODEV


def test_classify_an_unknown_class(tmp_path: Path) -> None:
    tree, _ = dry_tree(FakeNetlink(), tmp_path)
    with pytest.raises(ValueError, match="unknown net class 'gold'"):
        tree.classify(1, "gold")
