"""Guardrails over sliding windows: shadow agreement, the candidate's p99 against the baseline's, its error rate.

Each window keeps the last ``Guardrails.window`` samples; a check is judged once its window(s) hold
``Guardrails.min_samples`` (before that it neither holds nor fails: ``judged`` is False). Latencies are inference
times (the model runs, primary and shadow alike, without queueing), so both variants are timed on the same
requests whatever the share. Pure logic: the service records samples and reads the verdict on its event loop.
"""
import collections
import dataclasses
from typing import Optional

import numpy as np

from compress.timing import latency_stats
from export.serving.routing import BASELINE, CANDIDATE, VARIANTS

AGREEMENT_MODELS = ("det", "rec")


@dataclasses.dataclass(frozen=True)
class Check:
    """One guardrail over its window.

    Attributes:
        name: ``det_agreement``, ``rec_agreement``, ``p99_ratio`` or ``error_rate``.
        value: the measured value (None until judged).
        limit: the configured limit.
        samples: samples in the window (for ``p99_ratio`` the smaller of the two variants').
        judged: the window holds enough samples.
        ok: it holds (True while not judged).
    """

    name: str
    value: Optional[float]
    limit: float
    samples: int
    judged: bool
    ok: bool

    @property
    def reason(self):
        """One phrase for logs and events, e.g. ``rec_agreement 0.412 < 0.8 over the last 20 samples``."""
        sign = ">=" if self.ok else ("<" if self.name.endswith("agreement") else ">")
        value = "n/a" if self.value is None else f"{self.value:.3f}"
        return f"{self.name} {value} {sign} {self.limit:g} over the last {self.samples} samples"


class Guardrails:
    """Sliding windows of samples and the verdict of the checks configured in ``cfg`` (a GuardrailsConfig)."""

    def __init__(self, cfg):
        self.cfg = cfg
        window = collections.deque
        self.latency_ms = {v: window(maxlen=cfg.window) for v in VARIANTS}
        self.errors = {v: window(maxlen=cfg.window) for v in VARIANTS}
        self.agreement = {m: window(maxlen=cfg.window) for m in AGREEMENT_MODELS}
        self.candidate_runs = 0  # since the last reset_candidate (the current rollout step)

    def record_run(self, variant, latency_ms=None, error=False):
        """One model run of ``variant`` (primary or shadow): its inference time, or ``error=True``."""
        self.errors[variant].append(bool(error))
        if not error and latency_ms is not None:
            self.latency_ms[variant].append(float(latency_ms))
        if variant == CANDIDATE:
            self.candidate_runs += 1

    def record_agreement(self, det=None, rec=None):
        """One shadow comparison (``export.serving.agreement.shadow_agreement``); None values are not recorded."""
        for model, value in (("det", det), ("rec", rec)):
            if value is not None:
                self.agreement[model].append(float(value))

    def reset_candidate(self):
        """Forget the candidate's samples and the agreements (a new step, or a promotion after a rollback)."""
        for windows in (self.latency_ms, self.errors):
            windows[CANDIDATE].clear()
        for values in self.agreement.values():
            values.clear()
        self.candidate_runs = 0

    def checks(self):
        """Every configured check, judged or not, as Check objects."""
        cfg, out = self.cfg, []
        for model in AGREEMENT_MODELS:
            limit = getattr(cfg, f"min_{model}_agreement")
            if limit is not None:
                values = self.agreement[model]
                out.append(self._check(f"{model}_agreement", float(np.mean(values)) if values else None, limit,
                                       len(values), lambda v, lim: v >= lim))
        if cfg.max_p99_ratio is not None:
            samples = min(len(self.latency_ms[CANDIDATE]), len(self.latency_ms[BASELINE]))
            ratio = None
            if samples:
                ratio = self.p99_ms(CANDIDATE) / max(self.p99_ms(BASELINE), 1e-9)
            out.append(self._check("p99_ratio", ratio, cfg.max_p99_ratio, samples, lambda v, lim: v <= lim))
        if cfg.max_error_rate is not None:
            flags = self.errors[CANDIDATE]
            out.append(self._check("error_rate", float(np.mean(flags)) if flags else None, cfg.max_error_rate,
                                   len(flags), lambda v, lim: v <= lim))
        return out

    def _check(self, name, value, limit, samples, passes):
        judged = samples >= self.cfg.min_samples and value is not None
        return Check(name, value, float(limit), samples, judged, passes(value, limit) if judged else True)

    def failing(self):
        """The judged checks that fail (empty: the guardrails hold)."""
        return [check for check in self.checks() if not check.ok]

    def p99_ms(self, variant):
        """p99 inference time of ``variant`` over its window (None when empty)."""
        values = self.latency_ms[variant]
        return latency_stats(np.asarray(values) / 1000.0).p99_ms if values else None

    def status(self):
        """JSON-ready state for ``GET /status``."""
        return {"holds": not self.failing(), "window": self.cfg.window, "min_samples": self.cfg.min_samples,
                "checks": [dataclasses.asdict(check) for check in self.checks()],
                "p99_ms": {v: self.p99_ms(v) for v in VARIANTS},
                "candidate_runs_this_step": self.candidate_runs}
