"""The controller contract and the registry that runs controllers.

Rules:
* A controller declares the one intent domain it applies and its mode. `start` raises
  `ControllerUnavailable` with a sentence saying what is missing and what to do.
* A hook gets one intent of its domain and returns a one-line outcome for the decision
  events; it may raise anything — the registry catches it per intent, records it with the
  controller's name, and goes on with the next intent. `RefusedAction` (the target is
  not provably the container's) is a decision, reported as "refused"; a `HostError` whose
  errno may pass (`TRANSIENT_ERRNOS`) is marked for retry; anything else is final.
* `Controllers.apply` is synchronous and runs in the host thread (`executor`); it never
  runs on the path that answers the runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from isolation.errors import TRANSIENT_ERRNOS, HostError, RefusedAction
from nri_plugin.policy.intents import HostIntent, Note, Phase, Severity

log = logging.getLogger("nri_qos.control")


class Mode(StrEnum):
    REQUIRED = "required"  # must start; a failing hook is an error
    OPTIONAL = "optional"  # disabled when it cannot start; a failing hook is a warning


class ControllerUnavailable(Exception):
    """The controller's backend is missing on this host; the message says what to do."""


class ControllerStartError(Exception):
    """A Required controller could not start; nri-qos cannot run without it."""


class Controller:
    """One host domain. Subclasses set `name`, `domain`, `mode` and override the hooks
    of the phases their domain acts in; the others do nothing."""

    name = "controller"
    domain = ""
    mode = Mode.OPTIONAL

    def start(self) -> None:
        """Check the backend; raise ControllerUnavailable when it is missing."""

    def stop(self) -> None:
        """Release what start acquired."""

    def pre_create(self, intent: HostIntent) -> str:
        return ""

    def post_start(self, intent: HostIntent) -> str:
        return ""

    def post_update(self, intent: HostIntent) -> str:
        return ""

    def post_stop(self, intent: HostIntent) -> str:
        return ""

    def hook(self, phase: Phase) -> Callable[[HostIntent], str]:
        return {
            Phase.PRE_CREATE: self.pre_create,
            Phase.POST_START: self.post_start,
            Phase.POST_UPDATE: self.post_update,
            Phase.POST_STOP: self.post_stop,
        }[phase]


@dataclass(slots=True)
class ControllerStatus:
    """What the status views show per controller."""

    name: str
    domain: str
    mode: Mode
    enabled: bool = False
    reason: str = "not started"
    applied: int = 0
    failed: int = 0
    refused: int = 0
    last_error: str = ""


@dataclass(frozen=True, slots=True)
class Applied:
    """The outcome of one intent: its note (if any), and whether a failure may pass."""

    note: Note | None
    retry: bool = False


class Controllers:
    """The controllers of one daemon, by domain."""

    def __init__(self, controllers: Sequence[Controller]) -> None:
        self._by_domain: dict[str, Controller] = {}
        for c in controllers:
            if c.domain in self._by_domain:
                other = self._by_domain[c.domain].name
                raise ValueError(f"controllers {other} and {c.name} both claim domain {c.domain}")
            self._by_domain[c.domain] = c
        self._status = {c.domain: ControllerStatus(c.name, c.domain, c.mode) for c in controllers}

    def start(self) -> list[Note]:
        """Start every controller. Raises ControllerStartError when a Required one cannot;
        an Optional one that cannot is disabled, with a note saying why."""
        notes = []
        for domain, controller in self._by_domain.items():
            status = self._status[domain]
            try:
                controller.start()
            except ControllerUnavailable as exc:
                if controller.mode is Mode.REQUIRED:
                    raise ControllerStartError(f"{controller.name} controller: {exc}") from None
                status.enabled, status.reason = False, str(exc)
                notes.append(
                    Note("controller", controller.name, f"disabled: {exc}", Severity.WARNING)
                )
                continue
            status.enabled, status.reason = True, "started"
        return notes

    def stop(self) -> None:
        for domain, controller in self._by_domain.items():
            if self._status[domain].enabled:
                try:
                    controller.stop()
                except Exception:
                    log.exception("%s controller failed to stop", controller.name)
                self._status[domain].enabled = False
                self._status[domain].reason = "stopped"

    def apply(self, intents: Sequence[HostIntent]) -> list[Note]:
        """Run each intent's hook on its domain's controller, in order; one note each."""
        notes = []
        for intent in intents:
            note = self.apply_one(intent).note
            if note is not None:
                notes.append(note)
        return notes

    def status(self) -> list[ControllerStatus]:
        return list(self._status.values())

    def apply_one(self, intent: HostIntent) -> Applied:
        """Run one intent's hook; never raises."""
        subject = intent.container.name or intent.container.id
        controller = self._by_domain.get(intent.domain)
        status = self._status.get(intent.domain)
        if controller is None or status is None:
            why = f"no controller applies domain {intent.domain!r}: {intent.phase} not applied"
            return Applied(Note("host", subject, why, Severity.WARNING))
        if not status.enabled:
            return Applied(None)  # disabled at start, with a note then
        try:
            outcome = controller.hook(intent.phase)(intent)
        except RefusedAction as exc:
            status.refused += 1
            why = f"{controller.name} {intent.phase} refused: {exc}"
            return Applied(Note("refused", subject, why, Severity.WARNING))
        except Exception as exc:
            status.failed += 1
            status.last_error = f"{type(exc).__name__}: {exc}"
            severity = Severity.ERROR if controller.mode is Mode.REQUIRED else Severity.WARNING
            why = f"{controller.name} {intent.phase} failed: {status.last_error}"
            transient = isinstance(exc, HostError) and exc.errno in TRANSIENT_ERRNOS
            return Applied(Note("host", subject, why, severity), retry=transient)
        status.applied += 1
        return Applied(Note("host", subject, outcome) if outcome else None)
