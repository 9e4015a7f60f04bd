"""Export of the real PP-OCRv4 det and rec through the runner (baseline -> export -> compare), then tools/infer.py on
a page, from the export folders and from what the run delivered."""
import compress  # noqa: F401  (imports zlib before paddle)

import json
import os
import subprocess
import sys

import cv2
import pytest
import yaml

import export.stage  # noqa: F401  (registers the stage)
from compress.config import load_config
from compress.runner import Runner
from compress.stages import STAGES
from compress.stages.base import PLANNED_STAGES
from export.deploy import read_deploy_bundle

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGE = os.path.join("data", "demo", "det", "eval", "eval_00000.jpg")
MIN_MATCHING_WORDS = 5


@pytest.fixture(scope="module")
def export_run(demo_data, tmp_path_factory):
    """Run [baseline, export, compare] on both models once: a few eval samples, fp32 only."""
    folder = tmp_path_factory.mktemp("export_run")
    config = {
        "Global": {"run_dir": str(folder / "run"), "threads": 1, "show_progress": False},
        "Models": {name: os.path.join(ROOT, "configs", "models", f"ppocrv4_{name}.yml") for name in ("det", "rec")},
        "Pipeline": ["baseline", "export", "compare"],
        "Baseline": {"eval_limit": 2, "per_model": {"rec": {"eval_limit": 16}}},
        "Export": {"precisions": ["fp32"], "parity_samples": 2, "per_model": {"rec": {"parity_samples": 16}}},
        "Compare": {"warmup": 1, "repeats": 3, "batch": 1, "settle_calls": 0, "rss": False, "e2e": False,
                    "backends": ["paddle_cpu", "openvino"], "eval_limit": 2, "per_model": {"rec": {"eval_limit": 16}}},
    }
    path = folder / "pipeline.yml"
    path.write_text(yaml.safe_dump(config))
    sections = {STAGES.get(n).section for n in STAGES.names()} | {n.capitalize() for n in PLANNED_STAGES}
    cwd = os.getcwd()
    os.chdir(ROOT)  # model configs name their data relative to the project root
    try:
        overrides = ["Models.det.Fidelity.limit=2", "Models.rec.Fidelity.limit=16"]
        runner = Runner(load_config(str(path), overrides, stage_sections=sections), log=lambda line: None)
        manifest = runner.run()
    finally:
        os.chdir(cwd)
    return {name: manifest.verified_dir("export", name) for name in ("det", "rec")}, manifest


@pytest.mark.parametrize("name", ["det", "rec"])
def test_paddle_and_onnx_parity_within_tolerance(export_run, name):
    dirs, manifest = export_run
    entry = manifest.entry("export", name)
    assert entry["status"] == "done", entry["message"]
    metrics = entry["metrics"]
    for backend in ("paddle_cpu", "onnxruntime", "onnxruntime_vs_paddle", "openvino"):
        assert metrics[f"fp32/{backend}/max_abs_diff"] < 2e-4, backend
    assert metrics["fp32/paddle_bytes"] > 1e6 and metrics["fp32/onnx_bytes"] > 1e6
    parity = export.stage.load_parity(dirs[name])
    assert parity["failures"] == [] and parity["reports"]["fp32/paddle_cpu"]["samples"] == (2 if name == "det"
                                                                                           else 16)


@pytest.mark.parametrize("name, ops, reshapes", [("det", 313, 0), ("rec", 307, 5)])
def test_conv_biases_are_added_as_in_the_shipped_programs(export_run, name, ops, reshapes):
    from paddle.base import core

    program = core.ProgramDesc(open(os.path.join(export_run[0][name], "fp32", "inference.pdmodel"), "rb").read())
    types = [program.block(0).op(i).type() for i in range(program.block(0).op_size())]
    assert (len(types), types.count("reshape2")) == (ops, reshapes)  # jit.save alone: det 367 / 54, rec 339 / 37


@pytest.mark.parametrize("name, trt_range", [
    ("det", [[1, 3, 64, 64], [1, 3, 640, 640], [1, 3, 1280, 1280]]),
    ("rec", [[1, 3, 48, 32], [8, 3, 48, 320], [8, 3, 48, 1280]]),
])
def test_deploy_configs(export_run, name, trt_range):
    bundle = read_deploy_bundle(os.path.join(export_run[0][name], "fp32"))
    assert bundle.task == name and bundle.backends() == ["paddle_cpu", "onnxruntime", "openvino", "paddle_trt"]
    assert bundle.model_path("openvino") == bundle.model_dir  # OpenVINO reads the exported Paddle program
    trt = bundle.deploy("paddle_trt")
    assert [list(s) for s in trt.trt.dynamic_shapes["x"]] == trt_range and not trt.trt.use_calib_mode
    assert ("self_attention_fuse_pass" in trt.delete_passes) == (name == "rec")
    assert os.path.isfile(bundle.model_path("onnxruntime"))


def _label_words(image_name):
    with open(os.path.join(ROOT, "data", "demo", "det", "eval.txt"), encoding="utf-8") as labels:
        for line in labels:
            path, boxes = line.rstrip("\n").split("\t", 1)
            if os.path.basename(path) == image_name:
                return {box["transcription"].replace(" ", "") for box in json.loads(boxes)}
    raise AssertionError(f"{image_name} not in eval.txt")


@pytest.mark.parametrize("backend", ["paddle_cpu", "onnxruntime"])
def test_infer_reads_a_demo_page(export_run, backend, tmp_path):
    dirs = export_run[0]
    command = [sys.executable, os.path.join(ROOT, "tools", "infer.py"), "--det", os.path.join(dirs["det"], "fp32"),
               "--rec", os.path.join(dirs["rec"], "fp32"), "--image", os.path.join(ROOT, PAGE),
               "--backend", backend, "--draw", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    name, result = proc.stdout.strip().splitlines()[-1].split("\t", 1)
    lines = json.loads(result)
    found = {line["transcription"].replace(" ", "") for line in lines}
    matching = found & _label_words(name)
    assert name == os.path.basename(PAGE) and len(matching) >= MIN_MATCHING_WORDS, (found, _label_words(name))
    assert all(len(line["points"]) == 4 and 0 <= line["score"] <= 1 for line in lines)
    drawn = cv2.imread(str(tmp_path / "eval_00000_ocr.png"))
    page = cv2.imread(os.path.join(ROOT, PAGE))
    assert drawn.shape == (page.shape[0], 2 * page.shape[1], 3)  # boxes left, text right


def test_fidelity_crops_from_pages_read_like_the_label_lines(export_run, tmp_path):
    """tools/make_fidelity_crops.py: the baseline det's lines on two pages become a rec Fidelity folder."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from make_fidelity_crops import main, make_crops

    from compress.data.labels import list_images

    pages = tmp_path / "pages"
    pages.mkdir()
    for name in ("eval_00000.jpg", "eval_00001.jpg"):
        (pages / name).write_bytes(open(os.path.join(ROOT, "data", "demo", "det", "eval", name), "rb").read())
    det = os.path.join(export_run[0]["det"], "fp32")
    out = tmp_path / "crops"
    info = make_crops(det, str(pages), str(out), show_progress=False)
    truth = len([b for n in ("eval_00000.jpg", "eval_00001.jpg") for b in _label_words(n)])
    assert info["pages"] == 2 and abs(info["crops"] - truth) <= 0.3 * truth, (info, truth)
    listed = (out / "crops.txt").read_text(encoding="utf-8").splitlines()
    assert len(listed) == info["crops"] == len(list_images(str(out)))
    assert {line.split("\t")[1] for line in listed} == {"eval_00000.jpg", "eval_00001.jpg"}
    assert main(["--det", det, "--pages", str(pages), "--out", str(out), "--quiet"]) == 2  # exists, no --force
    assert main(["--det", det, "--pages", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2


def test_the_run_delivers_the_fastest_passing_variant_and_infer_reads_it(export_run, tmp_path):
    """No stage changed the weights: each model's delivery is its baseline on its fastest backend, exit 0, and
    ``tools/infer.py --model-dir <run>/delivered`` reads a page with it."""
    manifest = export_run[1]
    delivered = os.path.join(manifest.run_dir, "delivered")
    entry = manifest.entry("compare", "_run")
    assert entry["status"] == "done" and os.path.islink(delivered)
    assert os.path.realpath(delivered) == os.path.join(manifest.run_dir, entry["dir"], "delivered")
    for name in ("det", "rec"):
        card = json.load(open(os.path.join(delivered, name, "model_card.json")))
        candidates = {c["backend"]: c["latency_ms_p50"] for c in card["candidates"]}
        assert set(candidates) == {"paddle_cpu", "openvino"} and not card["compressed"]
        assert card["chosen"]["backend"] == min(candidates, key=candidates.get)
        assert read_deploy_bundle(os.path.join(delivered, name)).deploy().backend == card["chosen"]["backend"]
    assert entry["metadata"]["delivered"].count("the pipeline made no compressed variant") == 2
    command = [sys.executable, os.path.join(ROOT, "tools", "infer.py"), "--model-dir", delivered,
               "--image", os.path.join(ROOT, PAGE)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    name, result = proc.stdout.strip().splitlines()[-1].split("\t", 1)
    found = {line["transcription"].replace(" ", "") for line in json.loads(result)}
    assert len(found & _label_words(name)) >= MIN_MATCHING_WORDS
