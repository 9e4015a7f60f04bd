"""The serving logic without models: routing shares and stickiness, guardrail windows, shadow agreement, request
decoding, config errors, and the service's admission / timeout / rollback behaviour with fake engines behind the
real Starlette app (in process, through httpx's ASGI transport)."""
import asyncio
import base64
import dataclasses
import io
import os
import random
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from compress.errors import ConfigError
from export.ocr_system import OcrLine
from export.serving.agreement import match_lines, shadow_agreement
from export.serving.config import GuardrailsConfig, load_serve_config, parse_serve_config
from export.serving.guardrails import Guardrails
from export.serving.images import RequestError, decode_image, image_bytes_from_json
from export.serving.routing import BASELINE, CANDIDATE, COMPLETE, ROLLED_BACK, ROLLING, Router, key_point

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS_SECTION = {"baseline": {"det": "b/det", "rec": "b/rec"}, "candidate": {"det": "c/det", "rec": "c/rec"}}


# ------------------------------------------------------------------------------------------------ routing

def _candidate_keys(router, keys):
    return {key for key in keys if router.choose(key) == CANDIDATE}


def test_sticky_share_lands_within_tolerance_and_keys_keep_their_variant():
    keys = [f"user-{i}" for i in range(1000)]
    router = Router(0.1)
    at_10 = _candidate_keys(router, keys)
    assert 70 <= len(at_10) <= 130
    assert _candidate_keys(router, keys) == at_10  # the same keys, every time
    router.promote("test", 0.5)
    at_50 = _candidate_keys(router, keys)
    assert 450 <= len(at_50) <= 550 and at_10 <= at_50  # growing the share keeps the candidate's users
    assert key_point("user-1") == key_point("user-1") and 0.0 <= key_point("user-1") < 1.0


def test_keyless_requests_draw_at_random_and_edges_are_exact():
    router = Router(0.1, rng=random.Random(0))
    share = sum(router.choose() == CANDIDATE for _ in range(2000)) / 2000
    assert 0.08 <= share <= 0.12
    assert {Router(0.0).choose(f"k{i}") for i in range(200)} == {BASELINE}
    assert {Router(1.0).choose(f"k{i}") for i in range(200)} == {CANDIDATE}


def test_rollout_promotes_step_by_step_only_when_due_and_rollback_waits_for_a_promote():
    now = [1000.0]
    router = Router(0.1, (0.1, 0.5, 1.0), promote_after_s=60, clock=lambda: now[0])
    assert router.state == ROLLING and router.next_step() == 0.5 and router.status()["step"] == 1
    now[0] += 59
    assert not router.due(candidate_samples=50, min_samples=20, guardrails_hold=True)  # too early
    now[0] += 1
    assert not router.due(candidate_samples=19, min_samples=20, guardrails_hold=True)  # too few samples
    assert not router.due(candidate_samples=50, min_samples=20, guardrails_hold=False)
    assert router.due(candidate_samples=20, min_samples=20, guardrails_hold=True)
    event = router.promote("held")
    assert (event.share_from, event.share_to, router.share, router.step_started) == (0.1, 0.5, 0.5, 1060.0)
    event = router.rollback("rec_agreement 0.4 < 0.8")
    assert (event.share_from, router.share, router.state) == (0.5, 0.0, ROLLED_BACK)
    assert router.status()["step"] is None and router.status()["next_step"] == 0.1
    assert router.rollback("again") is None  # one event per rollback
    now[0] += 1000
    assert not router.due(candidate_samples=100, min_samples=20, guardrails_hold=True)
    router.promote("manual")
    assert router.share == 0.1 and router.state == ROLLING  # the first step above 0
    router.promote("manual", 1.0)
    assert router.state == COMPLETE and router.next_step() is None
    assert [e.action for e in router.events] == ["promote", "rollback", "promote", "promote"]


# ------------------------------------------------------------------------------------------------ guardrails

def _guardrails(**overrides):
    values = dict(window=10, min_samples=4, min_det_agreement=0.9, min_rec_agreement=0.8, max_p99_ratio=1.5,
                  max_error_rate=0.2)
    values.update(overrides)
    return Guardrails(GuardrailsConfig(**values))


def _check(guardrails, name):
    return next(check for check in guardrails.checks() if check.name == name)


def test_p99_ratio_over_the_window():
    guardrails = _guardrails()
    for ms in (10.0, 10.0, 10.0):
        guardrails.record_run(BASELINE, ms)
        guardrails.record_run(CANDIDATE, 2 * ms)
    assert not _check(guardrails, "p99_ratio").judged and guardrails.failing() == []  # 3 < min_samples
    guardrails.record_run(BASELINE, 10.0)
    guardrails.record_run(CANDIDATE, 14.0)
    check = _check(guardrails, "p99_ratio")
    # np.percentile with linear interpolation: candidate [14, 20, 20, 20] -> 20.0, baseline 10.0
    assert check.judged and check.value == pytest.approx(2.0) and not check.ok
    assert "p99_ratio 2.000 > 1.5 over the last 4 samples" == check.reason
    for _ in range(10):  # the window forgets: 10 fast candidate runs push the slow ones out
        guardrails.record_run(CANDIDATE, 11.0)
    assert _check(guardrails, "p99_ratio").value == pytest.approx(1.1) and guardrails.failing() == []


def test_error_rate_and_agreement_windows():
    guardrails = _guardrails()
    for error in (False, False, False, True):
        guardrails.record_run(CANDIDATE, 5.0, error=error)
    check = _check(guardrails, "error_rate")
    assert check.value == 0.25 and not check.ok and guardrails.candidate_runs == 4
    for det, rec in ((1.0, 1.0), (1.0, 0.5), (0.9, None), (1.0, 0.7), (0.8, 0.6)):
        guardrails.record_agreement(det, rec)
    det, rec = _check(guardrails, "det_agreement"), _check(guardrails, "rec_agreement")
    assert det.value == pytest.approx(0.94) and det.samples == 5 and det.ok
    assert rec.value == pytest.approx(0.7) and rec.samples == 4 and not rec.ok  # None is not a sample
    assert {c.name for c in guardrails.failing()} == {"error_rate", "rec_agreement"}
    guardrails.reset_candidate()
    assert guardrails.failing() == [] and guardrails.candidate_runs == 0


def test_a_check_set_to_null_is_not_judged():
    guardrails = _guardrails(max_error_rate=None, min_det_agreement=None)
    guardrails.record_agreement(0.0, 1.0)
    assert [c.name for c in guardrails.checks()] == ["rec_agreement", "p99_ratio"]


# ------------------------------------------------------------------------------------------------ agreement

def _line(text, x, y, width=100, height=20, score=0.9):
    return OcrLine(text, score, ((x, y), (x + width, y), (x + width, y + height), (x, y + height)))


def test_shadow_agreement_of_identical_shifted_and_misread_answers():
    page = [_line("total 12.50", 10, 10), _line("合计", 10, 50), _line("2026-12-01", 10, 90)]
    same = shadow_agreement(page, list(page))
    assert (same.det, same.rec, same.rec_ned, same.matched) == (1.0, 1.0, 1.0, 3)
    misread = shadow_agreement(page, [page[0], _line("合汁", 10, 50), _line("2026-12-07", 12, 91)])
    assert misread.det == 1.0 and misread.rec == pytest.approx(1 / 3) and misread.matched == 3
    lost = shadow_agreement(page, [page[0], _line("合计", 10, 200)])  # one box moved away, one missing
    assert lost.det == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3)) and lost.rec == 1.0
    assert lost.matched == 1
    assert shadow_agreement([], []).rec == 1.0 and shadow_agreement(page, []).rec is None
    assert match_lines(page, page[::-1]) == [(0, 2), (1, 1), (2, 0)]


# ------------------------------------------------------------------------------------------------ images

def _png(width, height):
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (255, 0, 0)).save(out, format="PNG")
    return out.getvalue()


def test_images_are_decoded_as_bgr_within_the_pixel_limit():
    image = decode_image(_png(40, 30), max_pixels=1200)
    assert image.shape == (30, 40, 3) and image[0, 0].tolist() == [0, 0, 255]
    with pytest.raises(RequestError, match=r"41x30 = 1230 pixels, over the limit of 1200") as info:
        decode_image(_png(41, 30), max_pixels=1200)
    assert info.value.status == 400
    with pytest.raises(RequestError, match="not an image file"):
        decode_image(os.urandom(2000), max_pixels=1200)
    with pytest.raises(RequestError, match="empty"):
        decode_image(b"", max_pixels=1200)


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"), (b'{"img": "AAAA"}', "no \"image\" key"),
    (b'{"image": "AAAA", "path": "/etc"}', "unknown key 'path'"), (b'{"image": "!!"}', "not valid base64"),
    (b'{"image": 3}', "must be a base64 string")])
def test_json_bodies_are_checked(body, message):
    with pytest.raises(RequestError, match=message):
        image_bytes_from_json(body)


# ------------------------------------------------------------------------------------------------ config

def test_the_shipped_serve_config_parses():
    cfg = load_serve_config(os.path.join(ROOT, "configs", "serve.yml"))
    assert cfg.Variants.candidate.model_dir == "output/ppocr_prune_quant/delivered"
    assert cfg.Variants.baseline.baseline_of == "output/ppocr_prune_quant"
    assert cfg.Routing.rollout_steps == (0.1, 0.5, 1.0) and cfg.Auth.api_key_env == "OCR_SERVE_API_KEY"


@pytest.mark.parametrize("data, message", [
    ({"Variants": VARIANTS_SECTION, "Routing": {"canary_shar": 0.1}},
     r"^serve.yml: Routing.canary_shar: unknown key; did you mean 'canary_share'\?$"),
    ({"Variants": VARIANTS_SECTION, "Router": {}}, r"^serve.yml.Router: unknown key; did you mean 'Routing'\?$"),
    ({"Variants": VARIANTS_SECTION, "Auth": {"api_key": "secret"}},
     r"^serve.yml: Auth.api_key: unknown key; did you mean 'api_key_env'\?$"),
    ({"Variants": VARIANTS_SECTION, "Routing": {"canary_share": 1.5}}, r"canary_share: 1.5 is not a share"),
    ({"Variants": VARIANTS_SECTION, "Routing": {"rollout_steps": [0.5, 0.1]}}, r"must rise step by step"),
    ({"Variants": VARIANTS_SECTION, "Guardrails": {"window": 10, "min_samples": 20}}, r"more than the window"),
    ({"Variants": VARIANTS_SECTION, "Limits": {"timeout_s": "soon"}}, r"Limits.timeout_s: expected a number"),
    ({"Variants": {"baseline": {"model_dir": "a", "baseline_of": "b"}, "candidate": {"model_dir": "c"}}},
     r"Variants.baseline: give model_dir or baseline_of, not both"),
    ({"Variants": {"baseline": {"det": "a"}, "candidate": {"model_dir": "c"}}}, r"Variants.baseline: no model"),
    ({"Server": {}}, r"Variants: required")])
def test_config_errors_name_the_file_and_key(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_serve_config(data, "serve.yml")


def test_serve_cli_prints_one_line_and_exits_2_on_a_config_error(tmp_path):
    config = tmp_path / "serve.yml"
    config.write_text("Variants:\n  baseline: {det: a, rec: b}\n  candidate: {det: a, rec: b}\nLimits:\n"
                      "  max_concurency: 3\n")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "-c", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == (f"error: {config}: Limits.max_concurency: unknown key; did you mean "
                           f"'max_concurrency'?\n")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "-c", str(config),
                           "-o", "Limits.max_concurency=null", "Limits.max_concurrency=3"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1  # -o cannot delete a key: still unknown
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "-c", str(config),
                           "--run", str(tmp_path / "no_run")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1


# ------------------------------------------------------------------------------------------------ service

class FakeEngine:
    """An engine answering ``lines`` after ``delay_s``; blocks while ``gate`` is clear; raises when ``fail``."""

    def __init__(self, lines, delay_s=0.0, gate=None, fail=False):
        self.lines, self.delay_s, self.gate, self.fail = lines, delay_s, gate, fail
        self.calls = 0

    def __call__(self, image):
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("broken model")
        return list(self.lines)


PAGE = [_line("total 12.50", 10, 10), _line("合计", 10, 50)]
MISREAD = [_line("tota1 12.5O", 10, 10), _line("合汁", 10, 50)]


def _service(baseline, candidate, **sections):
    from export.serving.service import OcrService
    from export.serving.variants import VariantPool

    data = {"Variants": VARIANTS_SECTION, "Routing": {"canary_share": 0.5, "shadow": False, "auto_promote": False},
            "Guardrails": {"window": 10, "min_samples": 3, "max_p99_ratio": None}}
    for name, values in sections.items():
        data[name] = dict(data.get(name, {}), **values)
    cfg = parse_serve_config(data, "test")
    pools = {BASELINE: VariantPool(BASELINE, lambda: baseline), CANDIDATE: VariantPool(CANDIDATE, lambda: candidate)}
    return OcrService(cfg, pools, api_key="secret")


def _serve(service, scenario):
    """Run ``scenario(client)`` against the app in this process; returns its result."""
    import httpx

    from export.serving.app import build_app

    async def main():
        transport = httpx.ASGITransport(app=build_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://serving.test", timeout=30) as client:
            try:
                return await scenario(client)
            finally:
                await service.close()
    return asyncio.run(main())


def _post(client, variant=None, key=None, data=None):
    headers = {k: v for k, v in (("X-Variant", variant), ("X-Request-Key", key)) if v}
    return client.post("/ocr", files={"image": ("page.png", data or _png(32, 32))}, headers=headers)


def test_ocr_answers_and_a_forced_variant_is_used():
    service = _service(FakeEngine(PAGE), FakeEngine(MISREAD))

    async def scenario(client):
        forced = await _post(client, variant="candidate")
        base64_body = {"image": base64.b64encode(_png(32, 32)).decode()}
        plain = await client.post("/ocr", json=base64_body, headers={"X-Variant": "baseline"})
        bad = await _post(client, variant="gamma")
        return forced, plain, bad
    forced, plain, bad = _serve(service, scenario)
    assert forced.status_code == 200 and forced.json()["variant"] == "candidate"
    assert [line["text"] for line in forced.json()["lines"]] == ["tota1 12.5O", "合汁"]
    body = plain.json()
    assert body["variant"] == "baseline" and body["lines"][0] == {"text": "total 12.50", "score": 0.9,
                                                                  "box": [[10, 10], [110, 10], [110, 30], [10, 30]]}
    assert body["ms"] > 0
    assert bad.status_code == 400 and bad.json() == {"error": "X-Variant: 'gamma' is not a variant; use baseline "
                                                              "or candidate"}


def test_timeout_is_504_and_the_slot_stays_taken_until_the_run_ends():
    gate = threading.Event()
    service = _service(FakeEngine(PAGE, gate=gate), FakeEngine(PAGE), Limits={"timeout_s": 0.3,
                                                                              "max_concurrency": 1})

    async def scenario(client):
        slow = await _post(client, variant="baseline")
        busy = service.active
        waiting = await _post(client, variant="candidate")  # the only slot is still held by the stuck run
        gate.set()
        for _ in range(100):
            if service.active == 0:
                break
            await asyncio.sleep(0.05)
        after = await _post(client, variant="candidate")
        return slow, busy, waiting, after
    slow, busy, waiting, after = _serve(service, scenario)
    assert slow.status_code == 504 and "timed out after 0.3 s (Limits.timeout_s)" in slow.json()["error"]
    assert busy == 1
    assert waiting.status_code == 504 and "waiting for a processing slot" in waiting.json()["error"]
    assert after.status_code == 200


def test_overload_is_refused_at_once_with_429():
    gate = threading.Event()
    service = _service(FakeEngine(PAGE, gate=gate), FakeEngine(PAGE), Limits={"max_concurrency": 1,
                                                                              "max_queue": 1})

    async def scenario(client):
        first = asyncio.ensure_future(_post(client, variant="baseline"))
        second = asyncio.ensure_future(_post(client, variant="baseline"))
        while service.admitted < 2:
            await asyncio.sleep(0.01)
        started = time.perf_counter()
        refused = await _post(client, variant="baseline")
        refused_s = time.perf_counter() - started
        gate.set()
        return refused, refused_s, await first, await second
    refused, refused_s, first, second = _serve(service, scenario)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"].startswith("overloaded: 2 requests in progress or waiting")
    assert refused_s < 1.0  # not queued behind the stuck run (it is held for up to 10 s)
    assert (first.status_code, second.status_code) == (200, 200)
    assert 'ocr_requests_total{code="429",variant="none"} 1.0' in service.metrics.exposition().decode()


def test_disagreeing_shadow_rolls_back_and_no_request_fails():
    service = _service(FakeEngine(PAGE), FakeEngine(MISREAD), Routing={"shadow": True, "shadow_queue": 8})

    async def scenario(client):
        codes, variants = [], []
        for i in range(8):
            response = await _post(client, key=f"user-{i}")
            codes.append(response.status_code)
            variants.append(response.json()["variant"])
            while service.shadow_pending:
                await asyncio.sleep(0.01)
        return codes, variants
    codes, variants = _serve(service, scenario)
    assert codes == [200] * 8
    assert service.router.share == 0.0 and service.router.state == ROLLED_BACK
    # rolled back on the 3rd comparison (min_samples 3); every request after it went to the baseline
    assert service.shadow_counts["compared"] == 8 and variants[3:] == ["baseline"] * 5
    (event,) = service.router.events
    assert event.action == "rollback" and event.share_from == 0.5 and "rec_agreement 0.000 < 0.7" in event.reason
    text = service.metrics.exposition().decode()
    assert 'ocr_rollbacks_total{reason="rec_agreement"} 1.0' in text and "ocr_candidate_share 0.0" in text
    assert 'ocr_shadow_agreement_window{model="det"} 1.0' in text


def test_in_flight_candidate_requests_finish_after_a_rollback_and_admin_needs_the_key():
    gate = threading.Event()
    service = _service(FakeEngine(PAGE), FakeEngine(PAGE, gate=gate))

    async def scenario(client):
        in_flight = asyncio.ensure_future(_post(client, variant="candidate"))
        while service.active < 1:
            await asyncio.sleep(0.01)
        no_key = await client.post("/admin/rollback")
        wrong = await client.post("/admin/rollback", headers={"X-API-Key": "guess"})
        done = await client.post("/admin/rollback", headers={"Authorization": "Bearer secret"})
        gate.set()
        promoted = await client.post("/admin/promote", json={"share": 0.2}, headers={"X-API-Key": "secret"})
        status = await client.get("/status")
        return await in_flight, no_key, wrong, done, promoted, status
    in_flight, no_key, wrong, done, promoted, status = _serve(service, scenario)
    assert (no_key.status_code, wrong.status_code) == (401, 401) and "API key" in no_key.json()["error"]
    assert done.status_code == 200 and done.json()["event"]["share_to"] == 0.0
    assert in_flight.status_code == 200 and in_flight.json()["variant"] == "candidate"
    assert promoted.json()["routing"]["candidate_share"] == 0.2
    events = status.json()["events"]
    assert [(e["action"], e["share_to"]) for e in events] == [("rollback", 0.0), ("promote", 0.2)]
    assert events[0]["reason"] == "manual (POST /admin/rollback)"


def test_failing_candidate_is_a_500_and_its_error_rate_rolls_it_back():
    service = _service(FakeEngine(PAGE), FakeEngine(PAGE, fail=True))

    async def scenario(client):
        return [(await _post(client, variant="candidate")).status_code for _ in range(3)]
    assert _serve(service, scenario) == [500, 500, 500]
    assert service.router.state == ROLLED_BACK
    assert "error_rate 1.000 > 0.02" in service.router.events[0].reason


def test_slow_candidate_rolls_back_on_p99_ratio_and_auto_promotion_waits_for_the_window():
    now = [0.0]
    service = _service(FakeEngine(PAGE), FakeEngine(PAGE, delay_s=0.05),
                       Routing={"auto_promote": True, "promote_after_s": 10.0}, Guardrails={"max_p99_ratio": 3.0})
    service.router.clock = lambda: now[0]

    async def scenario(client):
        for _ in range(3):
            await _post(client, variant="baseline")
            await _post(client, variant="candidate")
        return service.router.share
    assert _serve(service, scenario) == 0.0
    assert service.router.events[0].reason.startswith("p99_ratio ")
    assert dataclasses.asdict(service.router.events[0])["share_from"] == 0.5
    now[0] = 100.0
    service.tick()
    assert service.router.share == 0.0  # rolled back: no auto promotion until an admin promotes


def test_auto_promotion_after_the_step_window():
    now = [0.0]
    service = _service(FakeEngine(PAGE), FakeEngine(PAGE),
                       Routing={"auto_promote": True, "promote_after_s": 10.0, "canary_share": 0.1})
    service.router.clock = lambda: now[0]
    service.router.step_started = 0.0
    for _ in range(3):
        service.record_run(CANDIDATE, "primary", 1.0)
    now[0] = 9.0
    service.tick()
    assert service.router.share == 0.1
    now[0] = 10.0
    service.tick()
    assert service.router.share == 0.5 and service.guardrails.candidate_runs == 0
    service.tick()
    assert service.router.share == 0.5  # the next step needs its own samples
    for pool in service.pools.values():
        pool.close()


def test_undecodable_oversized_and_unsupported_bodies():
    service = _service(FakeEngine(PAGE), FakeEngine(PAGE), Limits={"max_request_bytes": 5000})

    async def scenario(client):
        garbage = await _post(client, data=np.random.default_rng(0).bytes(3000))
        big = await _post(client, data=np.random.default_rng(0).bytes(6000))
        raw = await client.post("/ocr", content=_png(8, 8), headers={"content-type": "image/png"})
        no_field = await client.post("/ocr", files={"file": ("a.png", _png(8, 8))})
        return garbage, big, raw, no_field
    garbage, big, raw, no_field = _serve(service, scenario)
    assert garbage.status_code == 400 and "not an image file" in garbage.json()["error"]
    assert big.status_code == 413 and "over the limit of 5000 (Limits.max_request_bytes)" in big.json()["error"]
    assert raw.status_code == 415 and no_field.status_code == 400
    assert all("\n" not in r.json()["error"] for r in (garbage, big, raw, no_field))
