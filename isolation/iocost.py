"""Proportional disk sharing on cgroup v2: the iocost controller and io.weight.

iocost (CONFIG_BLK_CGROUP_IOCOST) is enabled per device at the cgroup2 root: a line
"MAJ:MIN enable=1 ctrl=auto" in io.cost.qos switches it on with the kernel's built-in
parameters for that device class, and io.cost.model can replace the cost model's
coefficients. Once it runs on a device, each group's io.weight (1..10000, default 100)
decides its share of that device under contention. Without iocost on a device, io.weight
has no effect there and per-device weights are refused (EOPNOTSUPP).

Every write goes through `HostWriter` (logged with its reason, dry-run aware). Every
change reads the file back first and is skipped when the kernel already shows the wanted
values, so re-applying a policy each reconcile costs reads only. The kernel renders
numbers in its own format ("95" reads back as "95.00", min/max are clamped to
1.00..10000.00), so comparisons normalise both sides the same way.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path

from isolation import inflight
from isolation.blockdev import BlockDevice
from isolation.errors import HostError
from isolation.writes import HostWriter
from isolation.writes import read_file as _read

WEIGHT_MIN, WEIGHT_MAX = 1, 10000

QOS_KEYS = ("enable", "ctrl", "rpct", "rlat", "wpct", "wlat", "min", "max")
MODEL_KEYS = ("ctrl", "model", "rbps", "rseqiops", "rrandiops", "wbps", "wseqiops", "wrandiops")
_QOS_PARAMS = frozenset(QOS_KEYS) - {"enable", "ctrl"}
_MODEL_PARAMS = frozenset(MODEL_KEYS) - {"ctrl", "model"}
_PERCENT_KEYS = frozenset({"rpct", "wpct"})
_VRATE_KEYS = frozenset({"min", "max"})

_DEVNO = re.compile(r"\d+:\d+")
_HUNDREDTH = Decimal("0.01")
_VRATE_MIN, _VRATE_MAX = Decimal("1.00"), Decimal("10000.00")


class IoCost:
    """iocost configuration at a cgroup2 root, and io.weight of groups below it."""

    def __init__(self, cgroup2_root: Path, writer: HostWriter) -> None:
        self.root = cgroup2_root
        self.writer = writer

    @property
    def qos_file(self) -> Path:
        return self.root / "io.cost.qos"

    @property
    def model_file(self) -> Path:
        return self.root / "io.cost.model"

    def unavailable(self) -> str:
        """ "" when iocost can be used here, else one line saying why not."""
        controllers_file = self.root / "cgroup.controllers"
        try:
            controllers = _read(controllers_file).split()
        except HostError as error:
            if error.errno == errno.ENOENT:
                return f"no cgroup2 hierarchy at {self.root} (no cgroup.controllers)"
            return f"cannot read {controllers_file}: {error.message}"
        if "io" not in controllers:
            return (
                f"the io controller is not available in cgroup2 at {self.root} "
                "(bound to cgroup v1 blkio, or not built in)"
            )
        inflight.touching(self.qos_file)
        if not self.qos_file.exists():
            return (
                f"no io.cost.qos at {self.root}: the kernel was built without "
                "CONFIG_BLK_CGROUP_IOCOST"
            )
        return ""

    # ------------------------------------------------------------------ root files

    def read_qos(self) -> dict[str, dict[str, str]]:
        """io.cost.qos as "MAJ:MIN" -> {key: value}; only devices iocost was set up on."""
        return _parse_device_lines(self.qos_file, _read(self.qos_file))

    def read_model(self) -> dict[str, dict[str, str]]:
        """io.cost.model as "MAJ:MIN" -> {key: value}."""
        return _parse_device_lines(self.model_file, _read(self.model_file))

    def configure_device(
        self, dev: BlockDevice, qos: str = "enable=1 ctrl=auto", model: str | None = None
    ) -> str:
        """Turn iocost on for `dev` (and set its cost model when `model` is given).

        `qos` and `model` are the key=value parts of the kernel's lines, without the
        device number. They are checked before anything is written (ValueError for an
        unknown key, a malformed value, or ctrl=auto combined with explicit parameters,
        which the kernel would silently turn into ctrl=user). Each file is written only
        when its current line for the device differs; the model goes first so iocost
        never starts on a model that is about to change. Returns a one-line outcome.
        """
        wanted_qos = _parse_settings(qos, QOS_KEYS, _QOS_PARAMS, "io.cost.qos")
        steps: list[str] = []
        if model is not None:
            wanted_model = _parse_settings(model, MODEL_KEYS, _MODEL_PARAMS, "io.cost.model")
            steps.append(
                self._apply_line(self.model_file, dev, model, wanted_model, self.read_model)
            )
        steps.append(self._apply_line(self.qos_file, dev, qos, wanted_qos, self.read_qos))
        return f"iocost on {dev.name} ({dev.devno}): " + "; ".join(steps)

    def _apply_line(
        self,
        path: Path,
        dev: BlockDevice,
        text: str,
        wanted: dict[str, str],
        read: Callable[[], dict[str, dict[str, str]]],
    ) -> str:
        shown = " ".join(f"{key}={value}" for key, value in wanted.items())
        current = read().get(dev.devno)
        if current is not None and _matches(current, wanted):
            return f"{path.name} already {shown}"
        self.writer.write(
            path,
            f"{dev.devno} {' '.join(text.split())}",
            f"iocost for {dev.name} ({dev.devno})",
        )
        if self.writer.dry_run:
            return f"{path.name} would be set to {shown}"
        after = read().get(dev.devno)
        if after is None or not _matches(after, wanted):
            line = " ".join(f"{k}={v}" for k, v in (after or {}).items()) or "nothing"
            raise HostError(
                path, errno.EIO, f"wrote {shown} for {dev.devno} but {path} shows {line}"
            )
        return f"{path.name} set to {shown}"

    # ------------------------------------------------------------------ io.weight

    def set_weight(
        self,
        group_dir: Path,
        default: int,
        per_device: Mapping[str, int] = {},  # never mutated
        reason: str = "",
    ) -> str:
        """Set the group's io.weight: "default N", then a "MAJ:MIN N" line per device.

        Weights must be 1..10000 and device keys "MAJ:MIN" (ValueError before any
        write). Lines already showing the wanted weight are not rewritten; per-device
        weights of devices not in `per_device` are left as they are. A per-device weight
        on a device without iocost is refused by the kernel (HostError EOPNOTSUPP).
        """
        _check_weight(default, "default io.weight")
        for devno, weight in per_device.items():
            if not _DEVNO.fullmatch(devno):
                raise ValueError(f"io.weight device {devno!r} is not MAJ:MIN")
            _check_weight(weight, f"io.weight for {devno}")
        path = group_dir / "io.weight"
        why = reason or f"io.weight for {group_dir.name}"
        current_default, current = self.read_weight(group_dir)
        done: list[str] = []
        if current_default != default:
            self.writer.write(path, f"default {default}", why)
            done.append(f"default {current_default} -> {default}")
        for devno, weight in per_device.items():
            if current.get(devno) == weight:
                continue
            try:
                self.writer.write(path, f"{devno} {weight}", why)
            except HostError as error:
                if error.errno != errno.EOPNOTSUPP:
                    raise
                raise HostError(
                    path,
                    error.errno,
                    f"cannot weigh device {devno} in {group_dir}: iocost is not enabled on "
                    "it (configure it in io.cost.qos first)",
                ) from error
            done.append(f"{devno} {current.get(devno, 'default')} -> {weight}")
        if not done:
            return f"io.weight in {group_dir} already default {default}" + "".join(
                f", {devno} {weight}" for devno, weight in per_device.items()
            )
        verb = "would set" if self.writer.dry_run else "set"
        return f"io.weight in {group_dir}: {verb} " + ", ".join(done)

    def read_weight(self, group_dir: Path) -> tuple[int, dict[str, int]]:
        """io.weight as (default weight, {"MAJ:MIN": weight})."""
        path = group_dir / "io.weight"
        try:
            text = _read(path)
        except HostError as error:
            if error.errno != errno.ENOENT:
                raise
            raise HostError(
                path,
                errno.ENOENT,
                f"no io.weight in {group_dir}: the io controller is not enabled for this "
                "group (or the kernel lacks iocost)",
            ) from None
        default: int | None = None
        devices: dict[str, int] = {}
        for line in text.splitlines():
            fields = line.split()
            if not fields:
                continue
            if len(fields) == 2 and fields[1].isdigit():
                if fields[0] == "default":
                    default = int(fields[1])
                    continue
                if _DEVNO.fullmatch(fields[0]):
                    devices[fields[0]] = int(fields[1])
                    continue
            raise HostError(path, errno.EIO, f"{path}: unexpected line {line!r}")
        if default is None:
            raise HostError(path, errno.EIO, f"{path} has no 'default N' line")
        return default, devices


# --------------------------------------------------------------------------- helpers


def _parse_device_lines(path: Path, text: str) -> dict[str, dict[str, str]]:
    parsed: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if not _DEVNO.fullmatch(fields[0]) or not all("=" in f for f in fields[1:]):
            raise HostError(path, errno.EIO, f"{path}: unexpected line {line!r}")
        parsed[fields[0]] = dict(field.split("=", 1) for field in fields[1:])
    return parsed


def _parse_settings(
    text: str, known: tuple[str, ...], params: frozenset[str], what: str
) -> dict[str, str]:
    """Check a key=value list the way the kernel will, so a bad one fails before writing."""
    settings: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if not sep or key not in known:
            raise ValueError(f"{what}: unknown setting {token!r} (known: {', '.join(known)})")
        try:
            _normalise(key, value)
        except ValueError:
            raise ValueError(f"{what}: bad value in {token!r}") from None
        settings[key] = value
    if settings.get("ctrl") == "auto" and params & settings.keys():
        raise ValueError(
            f"{what}: ctrl=auto with explicit {', '.join(sorted(params & settings.keys()))}: "
            "the kernel would switch to ctrl=user; drop ctrl=auto or the parameters"
        )
    return settings


def _normalise(key: str, value: str) -> str:
    """A value as the kernel would print it back. ValueError when it would refuse it."""
    if key == "ctrl":
        if value not in ("auto", "user"):
            raise ValueError(value)
        return value
    if key == "model":
        if value != "linear":
            raise ValueError(value)
        return value
    if key in _PERCENT_KEYS or key in _VRATE_KEYS:
        try:
            number = Decimal(value).quantize(_HUNDREDTH, rounding=ROUND_HALF_UP)
        except InvalidOperation:
            raise ValueError(value) from None
        if number < 0 or (key in _PERCENT_KEYS and number > 100):
            raise ValueError(value)
        if key in _VRATE_KEYS:
            number = min(max(number, _VRATE_MIN), _VRATE_MAX)
        return f"{number:.2f}"
    if not value.isdigit():
        raise ValueError(value)
    if key == "enable":
        return "1" if int(value) else "0"
    return str(int(value))


def _matches(current: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    for key, value in wanted.items():
        shown = current.get(key)
        if shown is None:
            return False
        try:
            if _normalise(key, shown) != _normalise(key, value):
                return False
        except ValueError:
            return False
    return True


def _check_weight(weight: int, what: str) -> None:
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise ValueError(f"{what} must be an integer, got {weight!r}")
    if not WEIGHT_MIN <= weight <= WEIGHT_MAX:
        raise ValueError(f"{what} must be {WEIGHT_MIN}..{WEIGHT_MAX}, got {weight}")
