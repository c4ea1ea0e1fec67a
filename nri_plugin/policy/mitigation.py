"""The mitigation ladder: what to do, step by step, while an online container suffers
from its neighbours, and how to step back once it no longer does.

Rungs, mildest first (each is skipped when it cannot change anything here, with the
reason): shrink the reclaimed pool away from the victim's CPUs -> cap the antagonists'
CPU quota -> put them in a tighter memory-bandwidth class (RDT MBA) -> evict one.

Rules, all in the snapshot's time (the engine has no clock):
* One episode per victim. The first rung is taken when the detector declares
  interference by neighbours (never for "self-throttled": its own limit is not anyone's
  fault). The next rung is taken only after the current one had `escalate_after_s` to
  work and the victim still suffers.
* Relaxing: once the detector clears the episode (its own hysteresis: several good
  windows), the highest rung is undone after `relax_after_s`, then the next one after
  another `relax_after_s`, and so on. If the victim suffers again meanwhile, the ladder
  climbs from where it stands.
* No flapping: a rung undone for a victim is not taken again for it within
  `cooldown_s`; escalation passes over it to the next rung instead.
* Eviction is not undone; whether it may happen now is the eviction policy's call
  (ranking, rate limit).

Pure: the caller turns `Action`s into intents (and tells, through `applicable`, whether a
rung can do anything for this detection).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from nri_plugin.policy.interference import Detection, Verdict, WindowResult


class Rung(StrEnum):
    SHRINK_RECLAIMED = "shrink-reclaimed"
    CAP_CPU = "cap-cpu"
    TIGHTEN_MBA = "tighten-mba"
    EVICT = "evict"


LADDER = (Rung.SHRINK_RECLAIMED, Rung.CAP_CPU, Rung.TIGHTEN_MBA, Rung.EVICT)


@dataclass(frozen=True, slots=True)
class LadderConfig:
    escalate_after_s: float = 1.0
    relax_after_s: float = 5.0
    cooldown_s: float = 30.0
    rungs: tuple[Rung, ...] = LADDER

    def check(self) -> None:
        if min(self.escalate_after_s, self.relax_after_s, self.cooldown_s) < 0:
            raise ValueError("escalate_after, relax_after and cooldown must be >= 0")


class Move(StrEnum):
    APPLY = "apply"
    UNDO = "undo"


@dataclass(frozen=True, slots=True)
class Action:
    move: Move
    rung: Rung
    victim: str
    targets: tuple[str, ...]  # antagonist container ids the rung acts on
    reason: str


@dataclass(slots=True)
class _Episode:
    applied: list[tuple[Rung, tuple[str, ...]]] = field(default_factory=list)
    changed_at: float = 0.0
    cleared_at: float | None = None
    undone_at: dict[Rung, float] = field(default_factory=dict)


# (rung, detection) -> "" when the rung can act, else why it cannot (for the note)
Applicable = Callable[[Rung, Detection], tuple[str, tuple[str, ...]]]


class Ladder:
    def __init__(self, config: LadderConfig | None = None) -> None:
        self.config = config or LadderConfig()
        self._episodes: dict[str, _Episode] = {}
        self.skipped: list[str] = []  # why rungs were passed over in the last step

    def rungs_of(self, victim: str) -> tuple[tuple[Rung, tuple[str, ...]], ...]:
        """The rungs in force for a victim, lowest first (for the views)."""
        episode = self._episodes.get(victim)
        return tuple(episode.applied) if episode is not None else ()

    def in_force(self) -> Mapping[str, tuple[tuple[Rung, tuple[str, ...]], ...]]:
        return {v: tuple(e.applied) for v, e in self._episodes.items() if e.applied}

    def forget(self, victim: str) -> list[Action]:
        """The victim is gone: undo what was done for it, at once."""
        episode = self._episodes.pop(victim, None)
        if episode is None:
            return []
        return [
            Action(Move.UNDO, rung, victim, targets, "the container it protected is gone")
            for rung, targets in reversed(episode.applied)
            if rung is not Rung.EVICT
        ]

    def step(self, now: float, result: WindowResult, applicable: Applicable) -> list[Action]:
        self.skipped = []
        actions: list[Action] = []
        suffering = {d.victim: d for d in result.active if d.verdict is Verdict.NEIGHBOURS}
        for victim in result.cleared:
            episode = self._episodes.get(victim)
            if episode is not None and episode.cleared_at is None:
                episode.cleared_at = now
        for victim, detection in sorted(suffering.items()):
            episode = self._episodes.setdefault(victim, _Episode(changed_at=now))
            episode.cleared_at = None
            started = not episode.applied
            due = now - episode.changed_at >= self.config.escalate_after_s
            if not started and not due:
                continue
            if not result.bad.get(victim) and not started:
                continue  # a good window inside the episode: give the rung time
            action = self._climb(now, victim, episode, detection, applicable)
            if action is not None:
                actions.append(action)
        for victim, episode in sorted(self._episodes.items()):
            if victim in suffering or episode.cleared_at is None:
                continue
            if now - max(episode.cleared_at, episode.changed_at) < self.config.relax_after_s:
                continue
            while episode.applied and episode.applied[-1][0] is Rung.EVICT:
                episode.applied.pop()  # an eviction is not undone
            if not episode.applied:
                del self._episodes[victim]
                continue
            rung, targets = episode.applied.pop()
            episode.undone_at[rung] = now
            episode.changed_at = now
            actions.append(
                Action(
                    Move.UNDO,
                    rung,
                    victim,
                    targets,
                    f"clear for {self.config.relax_after_s:g} s: stepping down from {rung}",
                )
            )
        return actions

    def _climb(
        self,
        now: float,
        victim: str,
        episode: _Episode,
        detection: Detection,
        applicable: Applicable,
    ) -> Action | None:
        taken = {r for r, _ in episode.applied}
        for rung in self.config.rungs:
            if rung in taken:
                continue
            undone = episode.undone_at.get(rung)
            if undone is not None and now - undone < self.config.cooldown_s:
                self.skipped.append(f"{rung}: undone {now - undone:.0f} s ago (cool-down)")
                continue
            why_not, targets = applicable(rung, detection)
            if why_not:
                self.skipped.append(f"{rung}: {why_not}")
                continue
            episode.applied.append((rung, targets))
            episode.changed_at = now
            step_no = len(episode.applied)
            return Action(
                Move.APPLY,
                rung,
                victim,
                targets,
                f"step {step_no}: {detection.reason}",
            )
        return None
