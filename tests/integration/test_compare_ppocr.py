"""compare stage and tools/compare.py on the real PP-OCRv4 det and rec models (small budget).

The run is assembled here in the export stage's layout (``export/<model>/v1/{baseline_fp32,fp32,int8}`` with
``deploy.yml``), from the shipped weights: ``fp32`` is an exact copy of the baseline (so the A/B must show no
metric change), ``int8`` is a Paddle PTQ model (abs_max, a few calibration images).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from compress.checkpoint import Manifest, checksum_tree
from compress.config import dump_config, load_config
from compress.stages import compare as compare_module  # noqa: F401  (registers the stage)
from compress.stages import stage_sections
from compress.stages.base import RunContext
from compress.stages.compare import CompareConfig, CompareStage
from compress.stats import metric_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the manifest below is written by hand, without the baseline stage's fidelity reference: fidelity is not measured
OVERRIDES = ("Models.det.Eval.limit=3", "Models.rec.Eval.limit=32", "Models.det.Calibration.limit=2",
             "Models.rec.Calibration.limit=16", "Models.det.Fidelity=null", "Models.rec.Fidelity=null")


def _export_folder(source_dir, folder, model_cfg, precision, backends, onnx):
    from export.deploy import DeploySettings, build_deploy_config, write_deploy_bundle
    from export.onnx_export import export_to_onnx

    if source_dir != folder:
        shutil.copytree(source_dir, folder)
    if onnx:
        export_to_onnx(folder)
    deploys = [build_deploy_config(model_cfg.task, model_cfg.Input, b, precision, DeploySettings()) for b in backends]
    write_deploy_bundle(folder, model_cfg, precision, deploys, onnx_file="model.onnx" if onnx else None)


@pytest.fixture(scope="module")
def run(tmp_path_factory, demo_data):
    """A run with baseline metrics (dygraph, measured here) and export checkpoints of det and rec."""
    from compress.models import build_model
    from compress.ppocr_compat import rapidocr_root
    from compress.quant.fold import fold_affine_into_conv
    from compress.quant.ptq import quantize_post_static
    from compress.tasks import dygraph_predictor, make_task

    cwd = os.getcwd()
    os.chdir(ROOT)  # model configs name their data relative to the project root
    run_dir = str(tmp_path_factory.mktemp("compare_run"))
    cfg = load_config(os.path.join(ROOT, "configs", "ppocr_prune_quant.yml"),
                      OVERRIDES + (f"Global.run_dir={run_dir}", "Global.show_progress=false",
                                   "Pipeline=[baseline, quant, export, compare]"), stage_sections=stage_sections())
    dump_config(cfg, os.path.join(run_dir, "config.yml"))
    manifest = Manifest(run_dir)
    manifest.data.update(pipeline=["baseline", "quant", "export", "compare"], models=["det", "rec"])
    tasks = {}
    for name, model_cfg in cfg.models.items():
        task = tasks[name] = make_task(model_cfg, show_progress=False)
        model = build_model(dict(model_cfg.Architecture), {"rapidocr": model_cfg.Weights.rapidocr}, ROOT)
        metrics = task.evaluate(dygraph_predictor(model))
        manifest.set_entry("baseline", name, {"status": "done", "dir": f"stages/baseline/{name}/v1", "files": {},
                                              "metrics": dict(metrics, params=1, flops=1)})
        export_dir = os.path.join(run_dir, "stages", "export", name, "v1")
        shipped = os.path.join(rapidocr_root(), "models", f"ch_PP-OCRv4_{name}_infer")
        _export_folder(shipped, os.path.join(export_dir, "baseline_fp32"), model_cfg, "fp32",
                       ("paddle_cpu", "onnxruntime"), onnx=True)
        _export_folder(shipped, os.path.join(export_dir, "fp32"), model_cfg, "fp32", ("paddle_cpu",), onnx=False)
        folded = fold_affine_into_conv(shipped, os.path.join(run_dir, "work", name, "folded")).model_dir
        calib = [{"x": b} for b in task.input_batches("calibration")]
        quantize_post_static(folded, os.path.join(export_dir, "int8"), calib, algo="abs_max")
        _export_folder(os.path.join(export_dir, "int8"), os.path.join(export_dir, "int8"), model_cfg, "int8",
                       ("paddle_cpu",), onnx=False)
        manifest.set_entry("export", name, {"status": "done", "dir": f"stages/export/{name}/v1",
                                            "files": checksum_tree(export_dir), "metrics": {}})
    manifest.save()
    yield {"dir": run_dir, "cfg": cfg, "manifest": manifest, "tasks": tasks}
    os.chdir(cwd)


def _run_compare(run, cfg, models=("det", "rec"), out_dir=None, run_dir=None):
    """The run-level compare stage over ``models``, writing into ``out_dir`` and ``run_dir`` (default: the run)."""
    out_dir = out_dir or os.path.join(run["dir"], "stages", "compare", "_run", "v1")
    os.makedirs(out_dir)
    ctx = RunContext(models=list(models), model_cfgs={m: run["cfg"].models[m] for m in models},
                     tasks={m: run["tasks"][m] for m in models}, global_cfg=run["cfg"].Global, out_dir=out_dir,
                     run_dir=run_dir or run["dir"], manifest=run["manifest"], stage_index=3, stage_count=4)
    return CompareStage().run_all({m: cfg for m in models}, ctx)


def test_compare_stage_on_real_models(run, capsys):
    cfg = CompareConfig(threads=1, warmup=1, repeats=3, batch=4, max_metric_drop=100.0, e2e=True, e2e_limit=2,
                        rss=False, settle_calls=0)
    result = _run_compare(run, cfg)
    assert result.passed, result.message
    printed = capsys.readouterr().out
    assert "== det ==" in printed and "== rec ==" in printed and "== e2e ==" in printed

    data = json.load(open(os.path.join(run["dir"], "report.json")))
    rows = {(r["model"], r["variant"], r["backend"]): r for r in data["rows"]}
    for name, metric in (("det", "hmean"), ("rec", "acc")):
        baseline = rows[(name, "baseline_fp32", "paddle_cpu")]
        dygraph = run["manifest"].entry("baseline", name)["metrics"][metric]
        # the exported float model through Paddle Inference and ONNX Runtime scores what the dygraph model scores
        assert baseline["metric"] == pytest.approx(dygraph, abs=0.02)
        assert rows[(name, "baseline_fp32", "onnxruntime")]["metric"] == pytest.approx(dygraph, abs=0.02)
        copy = rows[(name, "fp32", "paddle_cpu")]
        assert copy["metric_diff"] == pytest.approx(0.0, abs=1e-9) and copy["gated"]
        # per-sample records reproduce the metric; a copy's paired interval is exactly zero
        assert metric_of(copy["eval_records"]) == pytest.approx(copy["metric"], abs=1e-6)
        assert copy["metric_diff_ci95_pt"] == [0.0, 0.0]
        int8 = rows[(name, "int8", "paddle_cpu")]
        low, high = int8["metric_diff_ci95_pt"]
        assert low <= int8["metric_diff_pt"] <= high
        assert int8["precision"] == "int8" and int8["size_ratio"] < 0.6  # int8 weights
        for row in (baseline, copy, int8):
            assert 0 < row["latency_ms_p50"] <= row["latency_ms_p99"] and row["throughput_ips"] > 0
    e2e = {r["variant"]: r for r in data["rows"] if r["model"] == "e2e"}
    assert set(e2e) == {"baseline_fp32", "fp32", "int8"}
    assert e2e["baseline_fp32"]["metric"] > 0.3 and e2e["baseline_fp32"]["metrics"]["char_error_rate"] < 0.3
    assert e2e["fp32"]["metrics"]["word_hmean"] == e2e["baseline_fp32"]["metrics"]["word_hmean"]
    html = open(os.path.join(run["dir"], "report.html")).read()
    assert "http://" not in html and "https://" not in html and html.count("data:image/png;base64,") >= 4


def test_a_real_int8_drop_is_not_delivered_but_does_not_fail_a_passing_copy(run):
    """Zero-point limit: the exact FP32 copy passes, the real INT8 model only when it lost nothing; the gate fails
    only when every compressed variant misses, so the copy keeps it passing and the INT8 row says why it lost."""
    drop = CompareConfig(threads=1, warmup=0, repeats=1, batch=1, backends=("paddle_cpu",), max_metric_drop=0.0,
                         e2e=False, rss=False, settle_calls=0)
    out = os.path.join(run["dir"], "gate_check")
    result = _run_compare(run, drop, models=("det",), out_dir=out, run_dir=out)
    rows = {r["variant"]: r for r in json.load(open(os.path.join(out, "report.json")))["rows"]
            if r["source"] == "measured"}
    int8, fp32 = rows["int8"], rows["fp32"]
    assert fp32["metric_diff"] == 0.0 and result.passed  # an exact copy is within a zero limit
    card = json.load(open(os.path.join(out, "delivered", "det", "model_card.json")))
    int8_card = next(c for c in card["candidates"] if c["variant"] == "int8")
    assert int8_card["passed"] == (int8["metric_diff"] >= 0)  # INT8 only if it lost nothing
    if not int8_card["passed"]:
        assert int8_card["why_not"].startswith("hmean -") and "Compare.max_metric_drop" in int8_card["why_not"]
    assert card["chosen"]["variant"] in {"fp32", "int8", "baseline_fp32"}
    assert os.path.exists(os.path.join(out, "report.html"))


def test_tools_compare_against_a_checkpoint(run, tmp_path):
    out = tmp_path / "ab"
    checkpoint = os.path.join(run["dir"], "stages", "export", "det", "v1")
    command = [sys.executable, os.path.join(ROOT, "tools", "compare.py"), checkpoint, "--against", run["dir"],
               "--out", str(out), "--no-e2e", "--no-rss", "--backends", "paddle_cpu", "--repeats", "2",
               "--warmup", "0", "--eval-limit", "1", "--max-metric-drop", "100"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.load(open(out / "report.json"))["rows"]
    reference = os.path.basename(run["dir"])
    assert {r["run"] for r in rows} == {"v1", reference}
    assert {r["model"] for r in rows if r["run"] == "v1"} == {"det"}  # the checkpoint selects its model
    measured = {r["variant"]: r for r in rows if r["run"] == "v1" and r["source"] == "measured"}
    assert set(measured) == {"baseline_fp32", "fp32", "int8"}
    assert all(r["reference"] == f"{reference}:det/baseline/baseline_fp32@paddle_cpu" for r in measured.values())
    assert measured["fp32"]["metric_diff"] == pytest.approx(0.0, abs=1e-9)
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compare.py"), str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a run directory" in bad.stderr
