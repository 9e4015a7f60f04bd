"""Canary routing: which variant answers a request, and the rollout state (share, step, promotions, rollbacks).

A request with a sticky key goes to the candidate when ``key_point(key) < share``: the point is a hash of the key,
uniform in [0, 1), so a key keeps its variant while the share stays and keeps the candidate when the share grows.
Requests without a key draw a random point. Pure logic, no I/O: the service calls it on its event loop.
"""
import dataclasses
import hashlib
import random
import time

BASELINE, CANDIDATE = "baseline", "candidate"
VARIANTS = (BASELINE, CANDIDATE)

ROLLING = "rolling"  # auto promotion active
COMPLETE = "complete"  # the last step is reached
ROLLED_BACK = "rolled_back"  # share 0 after a guardrail or an admin; promotion waits for POST /admin/promote
HELD = "held"  # auto promotion off


def key_point(key):
    """A point in [0, 1) for a routing key, the same in every process (sha256, not Python's salted hash)."""
    digest = hashlib.sha256(str(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


@dataclasses.dataclass(frozen=True)
class Event:
    """One change of the candidate's share.

    Attributes:
        time: Unix time.
        action: ``promote`` or ``rollback``.
        share_from / share_to: the share before and after.
        reason: why (a guardrail verdict, ``manual``, the promotion rule).
    """

    time: float
    action: str
    share_from: float
    share_to: float
    reason: str


class Router:
    """The candidate's share and its rollout.

    Args:
        share: the share at start (``Routing.canary_share``).
        steps: rollout steps, rising (``Routing.rollout_steps``).
        promote_after_s: seconds at a step before it may be promoted.
        auto_promote: promote by itself when :meth:`due` says so.
        clock: time source (tests pass their own).
        rng: random source for requests without a key.
    """

    def __init__(self, share, steps=(), promote_after_s=600.0, auto_promote=True, clock=time.time, rng=None):
        self.share = float(share)
        self.steps = tuple(float(s) for s in steps)
        self.promote_after_s = float(promote_after_s)
        self.auto_promote = auto_promote
        self.clock = clock
        self.rng = rng or random.Random()
        self.step_started = clock()
        self.events = []
        self.state = self._state_for(self.share)

    def _state_for(self, share):
        if self.next_step(share) is None and self.steps:
            return COMPLETE
        return ROLLING if self.auto_promote else HELD

    def next_step(self, share=None):
        """The first rollout step above ``share`` (default: the current one), or None."""
        share = self.share if share is None else share
        return next((step for step in self.steps if step > share), None)

    def choose(self, key=None):
        """``candidate`` or ``baseline`` for a request with routing key ``key`` (None: a random point)."""
        point = key_point(key) if key is not None else self.rng.random()
        return CANDIDATE if point < self.share else BASELINE

    def due(self, candidate_samples, min_samples, guardrails_hold):
        """Whether auto promotion moves to the next step now.

        Args:
            candidate_samples: candidate runs measured since the current step started.
            min_samples: how many the guardrails need.
            guardrails_hold: the guardrails' verdict over their windows.
        """
        return (self.state == ROLLING and self.next_step() is not None and guardrails_hold
                and candidate_samples >= min_samples and self.clock() - self.step_started >= self.promote_after_s)

    def promote(self, reason, share=None):
        """Move to ``share`` (default: the next step); returns the Event. Clears a rollback."""
        target = self.next_step() if share is None else float(share)
        if target is None:
            target = self.share
        return self._move("promote", target, reason, self._state_for(target))

    def rollback(self, reason):
        """Share 0 until the next :meth:`promote`; returns the Event, or None when already rolled back."""
        if self.state == ROLLED_BACK and self.share == 0.0:
            return None
        return self._move("rollback", 0.0, reason, ROLLED_BACK)

    def _move(self, action, share, reason, state):
        event = Event(self.clock(), action, self.share, share, reason)
        self.share, self.state, self.step_started = share, state, event.time
        self.events.append(event)
        return event

    def status(self):
        """JSON-ready routing state for ``GET /status`` (``step``: 1-based position of the share in the rollout
        steps, None between or below them)."""
        step = self.steps.index(self.share) + 1 if self.share in self.steps else None
        return {"candidate_share": self.share, "state": self.state, "rollout_steps": list(self.steps),
                "step": step, "next_step": self.next_step(), "step_started": self.step_started,
                "promote_after_s": self.promote_after_s, "auto_promote": self.auto_promote}
