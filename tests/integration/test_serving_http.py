"""The real OCR service (``tools/serve.py`` in a subprocess on a free loopback port) over real HTTP, with the shipped
PP-OCRv4 det and rec models exported as the export stage does (OpenVINO deploy configs, as delivered):

* identical variants: the canary share lands within tolerance (1,000 keyed requests on a tiny image, which det
  answers with no line), keys are sticky, shadow agreement is exactly 1.0 on real pages, auth, 413, 400, 429;
* a candidate whose rec has one conv perturbed: shadow agreement drops, the guardrail rolls it back, no request
  fails, and every request after it goes to the baseline.
"""
import asyncio
import base64
import io
import os
import re
import time

import httpx
import numpy as np
import pytest

from export.serving.launch import ServerProcess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API_KEY = "test-key-7f3a"
PAGES = [f"eval_{i:05d}.jpg" for i in range(10)]

SAME_CONFIG = """
Variants:
  baseline: {{det: {root}/same/det, rec: {root}/same/rec}}
  candidate: {{det: {root}/same_copy/det, rec: {root}/same_copy/rec}}
Routing: {{canary_share: 0.1, shadow: true, shadow_queue: 16, auto_promote: false}}
Guardrails: {{window: 50, min_samples: 5, max_p99_ratio: null}}
Limits: {{max_request_bytes: 300000, max_image_pixels: 1000000, max_concurrency: 1, max_queue: 0, timeout_s: 60}}
Auth: {{api_key_env: OCR_TEST_API_KEY}}
"""
BROKEN_CONFIG = """
Variants:
  baseline: {{det: {root}/same/det, rec: {root}/same/rec}}
  candidate: {{det: {root}/same/det, rec: {root}/broken/rec}}
Routing: {{canary_share: 0.5, shadow: true, shadow_queue: 16, auto_promote: false}}
Guardrails: {{window: 20, min_samples: 3, min_det_agreement: 0.5, min_rec_agreement: 0.8, max_p99_ratio: null,
              max_error_rate: 0.5}}
Limits: {{timeout_s: 60}}
Auth: {{api_key_env: null}}
"""


@pytest.fixture(scope="module")
def model_root(tmp_path_factory, demo_data):
    """``same/{det,rec}`` and an independent copy (the shipped models with deploy.yml, OpenVINO) and
    ``broken/rec``: the rec with its middle conv's weights perturbed."""
    from compress.config import load_config
    from compress.ppocr_compat import rapidocr_root
    from compress.stages import stage_sections
    from export.serving.drill import perturbed_copy
    from tests.integration.test_compare_ppocr import _export_folder

    root = tmp_path_factory.mktemp("serving")
    cwd = os.getcwd()
    os.chdir(ROOT)  # model configs name their files relative to the project root
    try:
        cfg = load_config(os.path.join(ROOT, "configs", "ppocr_prune_quant.yml"), stage_sections=stage_sections())
        for copy in ("same", "same_copy"):
            for name in ("det", "rec"):
                shipped = os.path.join(rapidocr_root(), "models", f"ch_PP-OCRv4_{name}_infer")
                _export_folder(shipped, str(root / copy / name), cfg.models[name], "fp32", ("openvino",), onnx=False)
    finally:
        os.chdir(cwd)
    perturbed_copy(str(root / "same" / "rec"), str(root / "broken" / "rec"), noise_scale=1.0)
    return root


def _server(root, template, name):
    config = root / f"{name}.yml"
    config.write_text(template.format(root=root))
    return ServerProcess(str(config), env={"OCR_TEST_API_KEY": API_KEY}, log_path=str(root / f"{name}.log"))


@pytest.fixture(scope="module")
def same_server(model_root):
    with _server(model_root, SAME_CONFIG, "same") as server:
        yield server


def _page(demo_data, name):
    with open(os.path.join(demo_data, "det", "eval", name), "rb") as f:
        return f.read()


def _png(width, height):
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height), (255, 255, 255)).save(out, format="PNG")
    return out.getvalue()


TINY = _png(8, 8)  # det finds nothing: a cheap request through the whole path


def _status(client):
    return client.get("/status").json()


def _wait_for_shadows(client, compared, timeout_s=60.0):
    """Poll /status until ``compared`` shadow comparisons are done and none is pending (no fixed sleep)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _status(client)
        if status["shadow"]["compared"] >= compared and status["shadow"]["pending"] == 0:
            return status
        time.sleep(0.05)
    raise AssertionError(f"shadow comparisons did not reach {compared}: {status['shadow']}")


def _metric(text, name, **labels):
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(f"{name}{{{selector}}}" if labels else name) + r" ([0-9.e+-]+)\n"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else None


def test_canary_share_is_sticky_and_lands_within_tolerance(same_server):
    with httpx.Client(base_url=same_server.url, timeout=60) as client:
        variants = []
        for i in range(1000):
            response = client.post("/ocr", files={"image": ("tiny.png", TINY)}, headers={"X-Request-Key": f"u{i}"})
            assert response.status_code == 200, response.text
            assert response.json()["lines"] == []
            variants.append(response.json()["variant"])
        assert 70 <= variants.count("candidate") <= 130
        again = [client.post("/ocr", files={"image": ("tiny.png", TINY)}, headers={"X-Request-Key": f"u{i}"})
                 .json()["variant"] for i in range(50)]
        assert again == variants[:50]
        forced = client.post("/ocr", files={"image": ("tiny.png", TINY)}, headers={"X-Variant": "candidate",
                                                                                    "X-Request-Key": "u0"})
        assert forced.json()["variant"] == "candidate"


def test_identical_variants_agree_exactly_in_shadow(same_server, demo_data):
    with httpx.Client(base_url=same_server.url, timeout=60) as client:
        before = _status(client)["shadow"]["compared"]
        for index, name in enumerate(PAGES[:4]):
            data = _page(demo_data, name)
            if index == 0:
                response = client.post("/ocr", json={"image": base64.b64encode(data).decode()})
            else:
                response = client.post("/ocr", files={"image": (name, data)}, headers={"X-Request-Key": name})
            assert response.status_code == 200, response.text
            lines = response.json()["lines"]
            assert len(lines) >= 5 and all(len(line["box"]) == 4 and line["text"] for line in lines)
        status = _wait_for_shadows(client, before + 4)
        metrics = client.get("/metrics").text
    checks = {check["name"]: check for check in status["guardrails"]["checks"]}
    assert checks["det_agreement"]["value"] == 1.0 and checks["rec_agreement"]["value"] == 1.0
    assert status["guardrails"]["holds"] and status["routing"]["candidate_share"] == 0.1
    assert status["events"] == []
    # every comparison of the whole run, pages included, in the top bucket: nothing below 0.99
    assert _metric(metrics, "ocr_shadow_agreement_bucket", model="rec", le="0.99") == 0.0
    assert _metric(metrics, "ocr_shadow_agreement_count", model="rec") >= 4
    assert _metric(metrics, "ocr_shadow_agreement_window", model="det") == 1.0
    assert _metric(metrics, "ocr_model_load_seconds", variant="candidate") > 0
    assert _metric(metrics, "process_resident_memory_bytes") > 100e6
    assert _metric(metrics, "ocr_candidate_share") == 0.1
    assert _metric(metrics, "ocr_in_flight_requests") == 0.0 and _metric(metrics, "ocr_queue_depth") == 0.0
    assert _metric(metrics, "ocr_requests_total", variant="baseline", code="200") >= 800
    assert _metric(metrics, "ocr_inference_seconds_count", variant="candidate", role="shadow") >= 800


def test_admin_needs_the_key_and_bad_requests_are_refused_in_one_line(same_server):
    with httpx.Client(base_url=same_server.url, timeout=60) as client:
        assert client.post("/admin/promote", json={"share": 0.1}).status_code == 401
        assert client.post("/admin/rollback", headers={"X-API-Key": "wrong"}).status_code == 401
        promoted = client.post("/admin/promote", json={"share": 0.1}, headers={"X-API-Key": API_KEY})
        assert promoted.status_code == 200 and promoted.json()["routing"]["candidate_share"] == 0.1
        oversized = client.post("/ocr", files={"image": ("big.jpg", np.random.default_rng(0).bytes(400_000))})
        garbage = client.post("/ocr", files={"image": ("x.jpg", np.random.default_rng(1).bytes(3000))})
        too_many_pixels = client.post("/ocr", files={"image": ("wide.png", _png(2000, 1000))})
        healthz = client.get("/healthz")
    assert oversized.status_code == 413 and "Limits.max_request_bytes" in oversized.json()["error"]
    assert garbage.status_code == 400 and garbage.json()["error"].startswith("cannot decode the image")
    assert too_many_pixels.status_code == 400 and "2000x1000 = 2000000 pixels" in too_many_pixels.json()["error"]
    assert healthz.json() == {"status": "ok"}


def test_overload_is_answered_429_at_once(same_server, demo_data):
    page = _page(demo_data, PAGES[5])

    async def burst():
        async with httpx.AsyncClient(base_url=same_server.url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/ocr", files={"image": ("p.jpg", page)}) for _ in range(6)])
    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 429} and codes.count(200) >= 1  # one slot, no queue: the rest are refused
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1" and refused.json()["error"].startswith("overloaded: ")


def test_a_perturbed_candidate_is_rolled_back_with_no_failed_request(model_root, demo_data):
    with _server(model_root, BROKEN_CONFIG, "broken") as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        codes, compared = [], 0
        for name in PAGES:
            response = client.post("/ocr", files={"image": (name, _page(demo_data, name))},
                                   headers={"X-Request-Key": name})
            codes.append(response.status_code)
            compared += 1
            status = _wait_for_shadows(client, compared)
            if status["routing"]["state"] == "rolled_back":
                break
        after = [client.post("/ocr", files={"image": ("t.png", TINY)}, headers={"X-Request-Key": f"k{i}"})
                 .json()["variant"] for i in range(30)]
        metrics = client.get("/metrics").text
    assert codes == [200] * len(codes)
    assert status["routing"]["candidate_share"] == 0.0 and compared == 3  # judged from min_samples on
    (event,) = status["events"]
    assert event["action"] == "rollback" and event["share_from"] == 0.5 and "agreement" in event["reason"]
    checks = {check["name"]: check for check in status["guardrails"]["checks"]}
    assert checks["rec_agreement"]["value"] < 0.8 and not checks["rec_agreement"]["ok"]
    assert after == ["baseline"] * 30
    rollbacks = sum(_metric(metrics, "ocr_rollbacks_total", reason=r) or 0.0 for r in ("det_agreement",
                                                                                          "rec_agreement"))
    assert rollbacks == 1.0 and _metric(metrics, "ocr_candidate_share") == 0.0
    assert status["shadow"]["failed"] == 0 and _metric(metrics, "ocr_requests_total", variant="candidate",
                                                       code="200") >= 1
