"""Request handling behind the HTTP routes: admission, routing, timed model runs, shadow runs, guardrails.

Everything here runs on the server's event loop, so the counters and windows need no locks; model runs go to each
variant's worker threads (:class:`export.serving.variants.VariantPool`).

* Admission: at most ``Limits.max_concurrency`` requests hold a processing slot and ``Limits.max_queue`` more wait
  for one; any further request is refused at once (429), nothing queues without bound.
* Timeout: ``Limits.timeout_s`` from arrival; a request past it gets 504, and its slot stays taken until its model
  run really ends (a thread cannot be stopped), so timed-out work still counts against the limits.
* Shadow: after the answer, the other variant runs on the same image (at most ``Routing.shadow_queue`` at once,
  else skipped) and the two answers are compared, the baseline's as the reference.
* Guardrails: every recorded sample re-judges the windows; a failing check while the candidate has a share sets it
  to 0 at once (requests already on the candidate finish there), logs one line and counts it.
"""
import asyncio
import dataclasses
import hmac
import logging
import time

from export.serving.agreement import shadow_agreement
from export.serving.guardrails import Guardrails
from export.serving.images import RequestError
from export.serving.metrics import ServiceMetrics
from export.serving.routing import BASELINE, CANDIDATE, ROLLED_BACK, VARIANTS, Router

logger = logging.getLogger("export.serving")

NO_VARIANT = "none"  # metrics label of requests refused before routing


class OcrService:
    """The state of one running service.

    Args:
        cfg: the ServeConfig.
        pools: ``{"baseline": VariantPool, "candidate": VariantPool}`` (loaded).
        api_key: the admin key (None: admin endpoints are off).
        clock: wall-clock source for the router (tests pass their own).
    """

    def __init__(self, cfg, pools, api_key=None, clock=time.time):
        self.cfg = cfg
        self.pools = pools
        self.api_key = api_key
        routing = cfg.Routing
        self.router = Router(routing.canary_share, routing.rollout_steps, routing.promote_after_s,
                             routing.auto_promote, clock=clock)
        self.guardrails = Guardrails(cfg.Guardrails)
        self.metrics = ServiceMetrics()
        self.slots = asyncio.Semaphore(cfg.Limits.max_concurrency)
        self.admitted = 0  # requests inside /ocr (waiting for a slot or holding one)
        self.active = 0  # model runs holding a slot
        self.shadow_pending = 0
        self.shadow_counts = {"compared": 0, "skipped": 0, "failed": 0}
        self.answered = {v: 0 for v in VARIANTS}
        self.tasks = set()
        self.metrics.share.set(self.router.share)
        for name, pool in pools.items():
            self.metrics.load_seconds.labels(name).set(pool.load_seconds)

    # ------------------------------------------------------------------------------------------ admission

    def try_admit(self):
        """Take a place for one request; False when every slot and queue place is taken (answer 429)."""
        limits = self.cfg.Limits
        if self.admitted >= limits.max_concurrency + limits.max_queue:
            return False
        self.admitted += 1
        self._update_gauges()
        return True

    def leave(self):
        """Give back the place taken by :meth:`try_admit`."""
        self.admitted -= 1
        self._update_gauges()

    def overloaded_message(self):
        limits = self.cfg.Limits
        return (f"overloaded: {self.admitted} requests in progress or waiting (Limits.max_concurrency "
                f"{limits.max_concurrency} + max_queue {limits.max_queue}); retry later")

    def _update_gauges(self):
        self.metrics.in_flight.set(self.active)
        self.metrics.queue_depth.set(max(self.admitted - self.active, 0))

    # ------------------------------------------------------------------------------------------ routing

    def route(self, headers):
        """The variant for a request: forced by ``Routing.variant_header``, else by its sticky key or at random."""
        routing = self.cfg.Routing
        forced = headers.get(routing.variant_header) if routing.variant_header else None
        if forced:
            if forced not in VARIANTS:
                raise RequestError(400, f"{routing.variant_header}: {forced!r} is not a variant; use "
                                        f"{' or '.join(VARIANTS)}")
            return forced
        key = headers.get(routing.sticky_header) if routing.sticky_header else None
        return self.router.choose(key)

    # ------------------------------------------------------------------------------------------ model runs

    async def run(self, variant, image, deadline):
        """Run ``variant`` on ``image`` within ``deadline`` (``loop.time()`` units); ``(lines, inference ms)``.

        Raises:
            RequestError: 504 past the deadline, 500 when the model run fails.
        """
        loop = asyncio.get_running_loop()
        timeout = self.cfg.Limits.timeout_s
        try:
            async with asyncio.timeout(deadline - loop.time()):
                await self.slots.acquire()
        except TimeoutError:
            raise RequestError(504, f"timed out after {timeout:g} s waiting for a processing slot "
                                    f"(Limits.timeout_s); the service is busy, retry later") from None
        self.active += 1
        self._update_gauges()
        future = asyncio.wrap_future(self.pools[variant].submit(image))
        future.add_done_callback(self._run_ended)
        try:
            lines, ms = await asyncio.wait_for(asyncio.shield(future), deadline - loop.time())
        except TimeoutError:
            self.record_run(variant, "primary", error=True)
            raise RequestError(504, f"timed out after {timeout:g} s (Limits.timeout_s) while {variant} was "
                                    f"reading the image") from None
        except Exception as exc:  # noqa: BLE001  (any failure of a model run is a 500 for this request)
            self.record_run(variant, "primary", error=True)
            logger.error("%s failed on a request: %s: %s", variant, type(exc).__name__, exc)
            raise RequestError(500, f"{variant} failed: {type(exc).__name__}: {exc}") from None
        self.record_run(variant, "primary", ms)
        return lines, ms

    def _run_ended(self, future):
        if not future.cancelled():
            future.exception()  # retrieved: a run that ended after its 504 is not reported as unhandled
        self.active -= 1
        self.slots.release()
        self._update_gauges()

    def record_run(self, variant, role, ms=None, error=False):
        """One model run's sample for the metrics and the guardrails, then re-judge the guardrails."""
        if ms is not None:
            self.metrics.inference_seconds.labels(variant, role).observe(ms / 1000.0)
        self.guardrails.record_run(variant, ms, error)
        self.judge()

    def record_response(self, variant, code, seconds):
        """One answered request for the metrics."""
        self.metrics.requests.labels(variant or NO_VARIANT, str(code)).inc()
        if variant and code == 200:
            self.answered[variant] += 1
            self.metrics.request_seconds.labels(variant).observe(seconds)

    # ------------------------------------------------------------------------------------------ shadow

    def shadow(self, primary, image, primary_lines):
        """Run the other variant on ``image`` in the background and compare (no-op with ``Routing.shadow`` off)."""
        if not self.cfg.Routing.shadow:
            return
        if self.shadow_pending >= self.cfg.Routing.shadow_queue:
            self._count_shadow("skipped")
            return
        self.shadow_pending += 1
        task = asyncio.get_running_loop().create_task(self._shadow(primary, image, primary_lines))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _shadow(self, primary, image, primary_lines):
        other = CANDIDATE if primary == BASELINE else BASELINE
        try:
            try:
                lines, ms = await asyncio.wrap_future(self.pools[other].submit(image))
            except Exception as exc:  # noqa: BLE001  (a failing shadow run is an error sample, never a failure)
                logger.error("%s failed on a shadow run: %s: %s", other, type(exc).__name__, exc)
                self._count_shadow("failed")
                self.record_run(other, "shadow", error=True)
                return
            reference, compared = (primary_lines, lines) if other == CANDIDATE else (lines, primary_lines)
            agreement = await asyncio.to_thread(shadow_agreement, reference, compared)
            self.metrics.agreement.labels("det").observe(agreement.det)
            if agreement.rec is not None:
                self.metrics.agreement.labels("rec").observe(agreement.rec)
            self.guardrails.record_agreement(agreement.det, agreement.rec)
            self._count_shadow("compared")
            self.record_run(other, "shadow", ms)
        finally:
            self.shadow_pending -= 1

    def _count_shadow(self, outcome):
        self.shadow_counts[outcome] += 1
        self.metrics.shadow.labels(outcome).inc()

    # ------------------------------------------------------------------------------------------ guardrails

    def judge(self):
        """Update the guardrail gauges; roll the candidate back when a judged check fails while it has a share."""
        checks = self.guardrails.checks()
        for check in checks:
            if check.value is not None:
                self.metrics.guardrail.labels(check.name).set(check.value)
        for model, values in self.guardrails.agreement.items():
            if values:
                self.metrics.agreement_window.labels(model).set(sum(values) / len(values))
        failing = [check for check in checks if not check.ok]
        if failing and self.router.share > 0:
            self.rollback("; ".join(check.reason for check in failing), failing[0].name)

    def rollback(self, reason, label):
        """Share 0 now; one log line, one count. Returns the Event (None when already rolled back)."""
        event = self.router.rollback(reason)
        if event is not None:
            self.metrics.rollbacks.labels(label).inc()
            self.metrics.share.set(0.0)
            logger.warning("rollback: candidate share %.2f -> 0 (%s)", event.share_from, reason)
        return event

    def promote(self, reason, share=None):
        """Move the candidate to ``share`` (default: the next rollout step); one log line. Returns the Event.

        After a rollback the candidate's windows start empty, so that its old samples do not roll it back again.
        """
        if self.router.state == ROLLED_BACK:
            self.guardrails.reset_candidate()
        else:
            self.guardrails.candidate_runs = 0
        event = self.router.promote(reason, share)
        self.metrics.share.set(self.router.share)
        logger.info("promote: candidate share %.2f -> %.2f (%s)", event.share_from, event.share_to, reason)
        return event

    def tick(self):
        """Auto promotion, called periodically: promote when the router says the current step is due."""
        cfg = self.cfg
        if self.router.due(self.guardrails.candidate_runs, cfg.Guardrails.min_samples, not self.guardrails.failing()):
            self.promote(f"guardrails held for {cfg.Routing.promote_after_s:g} s and "
                         f"{self.guardrails.candidate_runs} candidate runs")

    # ------------------------------------------------------------------------------------------ admin

    def check_admin(self, headers):
        """RequestError 401 unless ``headers`` carry the admin key (403 when the admin endpoints are off)."""
        if self.api_key is None:
            raise RequestError(403, "admin endpoints are off: set Auth.api_key_env and that environment variable")
        given = headers.get("x-api-key") or ""
        bearer = headers.get("authorization") or ""
        if not given and bearer.lower().startswith("bearer "):
            given = bearer[len("bearer "):].strip()
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise RequestError(401, "missing or wrong API key; send X-API-Key: <key> or Authorization: Bearer <key>")

    def status(self):
        """JSON-ready state for ``GET /status``."""
        return {"variants": {name: pool.info for name, pool in self.pools.items()},
                "routing": dict(self.router.status(), shadow=self.cfg.Routing.shadow,
                                sticky_header=self.cfg.Routing.sticky_header),
                "guardrails": self.guardrails.status(),
                "shadow": dict(self.shadow_counts, pending=self.shadow_pending),
                "requests": {"answered": dict(self.answered), "admitted": self.admitted, "active": self.active},
                "events": [dataclasses.asdict(event) for event in self.router.events]}

    async def close(self):
        """Wait for the shadow runs in progress, then stop the worker threads."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=self.cfg.Limits.timeout_s)
        for pool in self.pools.values():
            pool.close()
