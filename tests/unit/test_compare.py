"""compare stage and reports: rows and deltas, the gate both ways, self-contained HTML, timing percentiles."""
import html
import json
import os
import re
import types

import numpy as np
import pytest

from compress import report
from compress.checkpoint import Manifest, checksum_tree

from compress.stages import compare as compare_stage  # noqa: F401  (registers the stage)
from compress.stages.base import STAGES, RunContext
from compress.compare.rows import finish_rows
from compress.compare.variants import discover_variants
from compress.stages.compare import CompareConfig, CompareStage
from compress.timing import latency_stats, time_interleaved


# --------------------------------------------------------------------------------------------- tiny models

def _tiny_net(seed, scale=1.0):
    import paddle

    paddle.seed(seed)
    net = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3, padding=1), paddle.nn.ReLU(), paddle.nn.Conv2D(4, 1, 1),
                               paddle.nn.Sigmoid())
    if scale != 1.0:
        for param in net.parameters():
            param.set_value(param * scale)
    net.eval()
    return net


def _save(net, folder):
    import paddle

    spec = [paddle.static.InputSpec([None, 3, None, None], "float32", "x")]
    paddle.jit.save(net, os.path.join(folder, "inference"), input_spec=spec)


@pytest.fixture(scope="module")
def export_dirs(tmp_path_factory):
    """Export dirs with a baseline and a compressed variant: one close to the baseline, one far from it."""
    root = tmp_path_factory.mktemp("exports")
    dirs = {}
    for name, scale in (("close", 1.0), ("far", -1.0)):
        folder = root / name
        _save(_tiny_net(0), str(folder / "baseline_fp32"))
        _save(_tiny_net(0, scale), str(folder / "fp32"))
        dirs[name] = str(folder)
    return dirs


class FakeTask:
    """Det-like task over random images: the metric is 1 - mean |output - baseline output| (baseline = 1.0)."""

    task = "det"
    main_metric = "hmean"

    def __init__(self):
        rng = np.random.default_rng(0)
        self._samples = [(rng.standard_normal((3, 16, 16)).astype("float32"),) for _ in range(4)]
        net = _tiny_net(0)
        import paddle
        with paddle.no_grad():
            self._reference = [net(paddle.to_tensor(s[0][None])).numpy() for s in self._samples]

    def samples(self, split, limit=None):
        return self._samples[:limit] if limit else self._samples

    def evaluate(self, predict, split="eval", limit=None, desc=None, samples=None):
        diffs = [np.abs(predict(s[0][None]) - ref).mean() for s, ref in zip(self.samples(split, limit),
                                                                             self._reference)]
        return {"hmean": float(1.0 - np.mean(diffs)), "precision": 1.0}


def _fake_run(tmp_path, export_dir, models=("det",)):
    """A run dir with a manifest: baseline and prune from the pipeline, export pointing at ``export_dir``."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    manifest = Manifest(str(run_dir))
    manifest.data["pipeline"] = ["baseline", "prune", "export", "compare"]
    manifest.data["models"] = list(models)
    export_rel = os.path.relpath(export_dir, run_dir)
    for model in models:
        manifest.set_entry("baseline", model, {"status": "done", "dir": f"stages/baseline/{model}/v1", "files": {},
                                               "metrics": {"hmean": 0.80, "params": 1000, "flops": 5e6,
                                                           "weights_bytes": 4000}})
        manifest.set_entry("prune", model, {"status": "done", "dir": f"stages/prune/{model}/v1", "files": {},
                                            "metrics": {"hmean": 0.78, "params": 600, "flops": 3e6,
                                                        "weights_bytes": 2400}})
        manifest.set_entry("export", model, {"status": "done", "dir": export_rel, "files": checksum_tree(export_dir),
                                             "metrics": {}})
    return manifest


def _ctx(manifest, tmp_path, models=("det",), out_name="out"):
    out_dir = tmp_path / out_name
    out_dir.mkdir()
    model_cfg = types.SimpleNamespace(Input=types.SimpleNamespace(max_batch_size=4), Fidelity=None)
    return RunContext(models=list(models), model_cfgs={m: model_cfg for m in models},
                      tasks={m: FakeTask() for m in models},
                      global_cfg=types.SimpleNamespace(threads=1, show_progress=False), out_dir=str(out_dir),
                      run_dir=manifest.run_dir, manifest=manifest, stage_index=3, stage_count=4)


def _run(manifest, tmp_path, cfg, models=("det",), out_name="out"):
    return CompareStage().run_all({m: cfg for m in models}, _ctx(manifest, tmp_path, models, out_name))


def _cfg(**kwargs):
    base = dict(threads=1, warmup=1, repeats=3, batch=2, backends=("paddle_cpu",), e2e=False, rss=False, settle_calls=0)
    base.update(kwargs)
    return CompareConfig(**base)


# --------------------------------------------------------------------------------------------- the stage

def test_stage_is_registered_with_its_ordering():
    stage = STAGES.get("compare")
    assert stage is CompareStage and stage.section == "Compare"
    assert set(stage.allowed_after) == {"export", "quant", "finetune", "prune", "eval", "baseline"}


def test_discover_variants_without_deploy_yml(export_dirs):
    variants = discover_variants(export_dirs["close"], ("paddle_cpu", "onnxruntime"), task="det")
    assert [(v.name, v.backend, v.precision, v.stage) for v in variants] == [
        ("baseline_fp32", "paddle_cpu", "fp32", "baseline"), ("fp32", "paddle_cpu", "fp32", "export")]
    assert "conv_transpose_eltwiseadd_bn_fuse_pass" in variants[0].deploy(1).delete_passes


def test_gate_passes_and_rows_have_deltas(tmp_path, export_dirs):
    manifest = _fake_run(tmp_path, export_dirs["close"])
    result = _run(manifest, tmp_path, _cfg(max_metric_drop=1.0))
    assert result.passed and result.message == ""
    data = json.loads((tmp_path / "run" / "report.json").read_text())
    rows = {report.row_key(r): r for r in data["rows"]}
    assert set(rows) == {"det/baseline/checkpoint@pipeline", "det/prune/checkpoint@pipeline",
                         "det/baseline/baseline_fp32@paddle_cpu", "det/export/fp32@paddle_cpu"}
    measured = rows["det/export/fp32@paddle_cpu"]
    for field in ("model", "stage", "backend", "precision", "metric_name", "metric", "metric_diff", "params", "flops",
                  "size_bytes", "latency_ms_p50", "latency_ms_p99", "throughput_ips", "peak_rss_mb"):
        assert field in measured
    assert measured["reference"] == "det/baseline/baseline_fp32@paddle_cpu"
    assert measured["metric"] == pytest.approx(1.0) and measured["metric_diff"] == pytest.approx(0.0, abs=1e-6)
    assert measured["params"] == 600 and rows["det/baseline/baseline_fp32@paddle_cpu"]["params"] == 1000
    assert measured["latency_ms_p50"] > 0 and measured["latency_ms_p99"] >= measured["latency_ms_p50"]
    assert measured["throughput_batch"] == 2 and measured["throughput_ips"] > 0
    assert measured["gated"] and not rows["det/prune/checkpoint@pipeline"]["gated"]
    pruned = rows["det/prune/checkpoint@pipeline"]
    assert pruned["metric_diff_pt"] == pytest.approx(-2.0) and pruned["size_ratio"] == pytest.approx(0.6)
    for folder in (tmp_path / "run", tmp_path / "out"):
        assert all((folder / name).exists() for name in report.REPORT_FILES)
    assert data["machine"]["threads"] == 1 and data["machine"]["cpu_model"]
    assert data["gate"]["passed"] is True


def test_gate_fails_with_one_clear_message_and_reports_are_written(tmp_path, export_dirs):
    manifest = _fake_run(tmp_path, export_dirs["far"])
    result = _run(manifest, tmp_path, _cfg(max_metric_drop=1.0))
    assert not result.passed
    assert re.match(r"det fp32 on paddle_cpu: hmean 1\.0000 -> 0\.\d{4} \(-\d+\.\d\d pt\), more than the 1\.00 pt "
                    r"allowed by Compare\.max_metric_drop", result.message), result.message
    data = json.loads((tmp_path / "run" / "report.json").read_text())
    assert data["gate"]["passed"] is False and data["gate"]["failing"] == ["det/export/fp32@paddle_cpu"]
    assert "Gate FAILED" in (tmp_path / "run" / "report.html").read_text()
    assert result.metrics["det/max_drop_pt"] > 1.0


def test_gate_off_and_manifest_only_run(tmp_path, export_dirs):
    manifest = _fake_run(tmp_path, export_dirs["far"])
    del manifest.entries["export"]
    result = _run(manifest, tmp_path, _cfg(max_metric_drop=1.0))
    # no export: the last pipeline stage (prune, -2 pt) is gated
    assert not result.passed and result.message.startswith("det checkpoint on pipeline: hmean 0.8000 -> 0.7800")
    assert _run(manifest, tmp_path, _cfg(max_metric_drop=None), out_name="again").passed


def test_one_run_level_call_measures_every_model_with_its_own_limits(tmp_path, export_dirs):
    manifest = _fake_run(tmp_path, export_dirs["far"], models=("a", "b"))
    cfgs = {"a": _cfg(max_metric_drop=100.0), "b": _cfg(max_metric_drop=1.0)}  # per_model: b is gated tighter
    result = CompareStage().run_all(cfgs, _ctx(manifest, tmp_path, ("a", "b")))
    rows = json.loads((tmp_path / "run" / "report.json").read_text())["rows"]
    assert {r["model"] for r in rows} == {"a", "b"}
    assert "## a" in (tmp_path / "run" / "report.md").read_text()
    assert not result.passed and result.message.startswith("b fp32 on paddle_cpu: hmean")
    gate = json.loads((tmp_path / "run" / "report.json").read_text())["gate"]
    assert gate["failing"] == ["b/export/fp32@paddle_cpu"]
    assert {m: limits["max_metric_drop"] for m, limits in gate["limits"].items()} == {"a": 100.0, "b": 1.0}
    assert CompareStage.scope == "run"


def test_the_gate_box_quotes_each_models_own_limits():
    limits = {"det": {"max_metric_drop": 2.0, "max_fidelity_drop": None, "max_script_fidelity_drop": None},
              "rec": {"max_metric_drop": 0.5, "max_fidelity_drop": 3.0, "max_script_fidelity_drop": None}}
    page = report.render_html([], {}, gate={"passed": True, "message": "", "limits": limits})
    assert "Gate passed:</b> " + html.escape(
        "every gated row is within its model's limits: det 2 pt of its baseline's metric; rec 0.5 pt of its "
        "baseline's metric, 3 pt of fidelity to the baseline") + "</div>" in page
    off = {m: dict.fromkeys(own) for m, own in limits.items()}
    assert "Gate off:" in report.render_html([], {}, gate={"passed": True, "message": "", "limits": off})


def test_config_is_strict():
    from compress.config import parse_section
    from compress.errors import ConfigError

    with pytest.raises(ConfigError, match="did you mean 'repeats'"):
        parse_section(CompareConfig, {"repeat": 3}, "Compare")
    with pytest.raises(ConfigError, match="backends"):
        parse_section(CompareConfig, {"backends": ["tensorflow"]}, "Compare")
    with pytest.raises(ConfigError, match="max_metric_drop"):
        parse_section(CompareConfig, {"max_metric_drop": -1}, "Compare")


# --------------------------------------------------------------------------------------------- reports

def _rows():
    rows = [report.new_row("det", "baseline", variant="baseline_fp32", backend="paddle_cpu", metric_name="hmean",
                           metric=0.80, size_bytes=4_000_000, latency_ms_p50=100.0, source="measured"),
            report.new_row("det", "export", variant="int8", backend="paddle_cpu", metric_name="hmean", metric=0.785,
                           size_bytes=1_000_000, latency_ms_p50=50.0, source="measured", gated=True),
            report.new_row("det", "baseline", variant="baseline_fp32", backend="onnxruntime", metric_name="hmean",
                           metric=0.80, latency_ms_p50=80.0, source="measured"),
            report.new_row("det", "export", variant="fp32", backend="onnxruntime", metric_name="hmean", metric=0.795,
                           latency_ms_p50=40.0, source="measured", gated=True)]
    return report.apply_deltas(report.assign_references(rows))


def test_deltas_use_the_same_backend_baseline():
    rows = _rows()
    assert rows[1]["reference"] == "det/baseline/baseline_fp32@paddle_cpu"
    assert rows[1]["metric_diff_pt"] == pytest.approx(-1.5) and rows[1]["speedup_p50"] == pytest.approx(2.0)
    assert rows[1]["size_ratio"] == pytest.approx(0.25)
    assert rows[3]["reference"] == "det/baseline/baseline_fp32@onnxruntime"
    assert rows[3]["speedup_p50"] == pytest.approx(2.0)


def test_gate_failures_both_ways():
    rows = _rows()
    assert report.gate_failures(rows, 2.0) == [] and report.gate_failures(rows, None) == []
    failing = report.gate_failures(rows, 1.0)
    assert [r["variant"] for r, _ in failing] == ["int8"]
    message = report.gate_message(failing, 1.0, {report.row_key(r): r for r in rows})
    assert "det int8 on paddle_cpu: hmean 0.8000 -> 0.7850 (-1.50 pt)" in message and "1.00 pt" in message


def test_html_is_self_contained_and_embeds_images(tmp_path):
    png = report.chart_sizes(_rows(), "det")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    written = report.write_reports(_rows(), [str(tmp_path)], {"cpu_model": "test cpu", "threads": 1},
                                   images={"det": [("sensitivity", png)]},
                                   gate={"passed": True, "message": "", "max_metric_drop": 1.0, "failing": []})
    assert sorted(os.path.basename(p) for p in written) == sorted(report.REPORT_FILES)
    page = (tmp_path / "report.html").read_text()
    assert not re.search(r"https?://", page)
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:)""", page)
    assert page.count("data:image/png;base64,") >= 3  # metric-vs-latency, sizes, and the given image
    assert "| det |" not in page and "<table>" in page
    md = (tmp_path / "report.md").read_text()
    assert "| export | int8 | paddle_cpu |" in md and "-1.50" in md
    assert json.loads((tmp_path / "report.json").read_text())["rows"][1]["metric_diff_pt"] == pytest.approx(-1.5)


def test_summary_text_lists_baseline_and_gated_rows():
    text = report.summary_text(_rows())
    assert text.startswith("== det ==") and "int8" in text and "2.00x" in text


def test_new_row_rejects_unknown_fields():
    with pytest.raises(TypeError, match="unknown report row fields"):
        report.new_row("det", "baseline", latency=1.0)


# --------------------------------------------------------------------------------------------- timing

def test_latency_stats_percentiles():
    stats = latency_stats([i / 1000.0 for i in range(1, 101)])  # 1..100 ms
    assert stats.p50_ms == pytest.approx(50.5) and stats.p90_ms == pytest.approx(90.1)
    assert stats.p99_ms == pytest.approx(99.01) and stats.min_ms == pytest.approx(1.0) and stats.samples == 100
    assert stats.items_per_second(8) == pytest.approx(8 / 0.0505)
    with pytest.raises(ValueError):
        latency_stats([])


def test_time_interleaved_alternates_order_and_measures_each():
    now = [0.0]
    calls = []

    def clock():
        return now[0]

    def runner(key, seconds):
        def run():
            calls.append(key)
            now[0] += seconds
        return run

    stats = time_interleaved({"a": runner("a", 0.010), "b": runner("b", 0.030)}, warmup=1, repeats=4, clock=clock)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert stats["a"].p50_ms == pytest.approx(10.0) and stats["b"].p99_ms == pytest.approx(30.0)
    assert stats["a"].samples == 4


def test_time_interleaved_pauses_before_every_timed_call_and_does_not_time_the_pause():
    now, events = [0.0], []

    def sleep(seconds):
        events.append(("pause", seconds))
        now[0] += seconds

    def runner(key):
        def run():
            events.append(key)
            now[0] += 0.010
        return run

    stats = time_interleaved({"a": runner("a"), "b": runner("b")}, warmup=1, repeats=2, clock=lambda: now[0],
                             pause_s=0.25, sleep=sleep)
    assert events == ["a", "b", ("pause", 0.25), "a", ("pause", 0.25), "b", ("pause", 0.25), "b", ("pause", 0.25),
                      "a"]
    assert stats["a"].p50_ms == pytest.approx(10.0) and stats["b"].p99_ms == pytest.approx(10.0)


def test_time_interleaved_settles_each_candidate_with_untimed_calls_of_its_own():
    now, events = [0.0], []

    def runner(key, seconds):
        def run():
            events.append(key)
            now[0] += seconds
        return run

    stats = time_interleaved({"a": runner("a", 0.010), "b": runner("b", 0.030)}, warmup=0, repeats=2,
                             clock=lambda: now[0], settle=1)
    assert events == ["a", "a", "b", "b", "b", "b", "a", "a"]  # settle call, then the timed one
    assert stats["a"].p50_ms == pytest.approx(10.0) and stats["b"].samples == 2


def test_peak_rss_follows_allocations():
    from compress.timing import current_rss_mb, peak_rss_mb

    before = peak_rss_mb()
    extra_mb = max(0.0, before - current_rss_mb()) + 150
    block = np.ones(int(extra_mb * 1024 * 1024 / 8))  # touched pages: resident
    assert peak_rss_mb() >= before + 100 and block[-1] == 1.0


def test_peak_rss_of_a_fresh_process(export_dirs):
    from compress.timing import measure_peak_rss
    from export.predictor import DeployConfig

    memory = measure_peak_rss(os.path.join(export_dirs["close"], "fp32"), DeployConfig(), (1, 3, 16, 16), runs=1)
    assert 50 < memory.peak_rss_mb < 4000 and 0 < memory.import_rss_mb <= memory.peak_rss_mb
    # not inherited from this (larger) process: a child's own address space only
    assert memory.model_rss_mb < 200


# --------------------------------------------------------------------------------------------- delivery

def _measured(stage, variant, backend, p50, metric, fidelity=None, size=100):
    row = report.new_row("det", stage, variant=variant, backend=backend, source="measured", metric_name="hmean",
                         metric=metric, latency_ms_p50=p50, latency_ms_p99=p50 * 1.2, size_bytes=size,
                         gated=stage != "baseline", metrics={"fidelity": fidelity} if fidelity else {})
    return row


def test_delivery_picks_the_fastest_passing_variant_and_says_why_the_others_lost():
    from compress.compare.delivery import choose

    rows = finish_rows([_measured("baseline", "baseline_fp32", "paddle_cpu", 100.0, 0.90, 1.0),
                        _measured("baseline", "baseline_fp32", "openvino", 50.0, 0.90, 1.0),
                        _measured("export", "int8", "openvino", 20.0, 0.85, 0.99),   # -5 pt: fails the metric
                        _measured("export", "int8", "onnxruntime", 30.0, 0.895, 0.90),  # fidelity -10 pt
                        _measured("export", "fp32", "openvino", 40.0, 0.90, 0.995, size=60)])
    choice = choose("det", rows, _cfg(max_metric_drop=1.0, max_fidelity_drop=3.0))
    assert (choice.chosen["variant"], choice.chosen["backend"]) == ("fp32", "openvino") and choice.compressed
    reasons = {(r["variant"], r["backend"]): why for r, why in choice.candidates}
    assert reasons[("int8", "openvino")].startswith("hmean -5.00 pt vs the baseline, more than the 1 pt")
    assert reasons[("int8", "onnxruntime")].startswith("fidelity 0.9000 is 10.00 pt below the baseline")
    assert reasons[("fp32", "openvino")] is None and choice.compressed_passed
    # every compressed variant failing: the fastest baseline is delivered and the model's gate fails
    strict = choose("det", rows, _cfg(max_metric_drop=0.0, max_fidelity_drop=0.1))
    assert strict.chosen["stage"] == "baseline" and strict.chosen["backend"] == "openvino"
    assert strict.tried and not strict.compressed_passed


def test_compare_writes_delivered_with_a_model_card_and_publishes_it(tmp_path, export_dirs):
    manifest = _fake_run(tmp_path, export_dirs["close"])
    result = _run(manifest, tmp_path, _cfg(max_metric_drop=1.0))
    assert result.passed and result.publish == {"delivered": "delivered"}
    card = json.loads((tmp_path / "out" / "delivered" / "det" / "model_card.json").read_text())
    assert card["chosen"]["backend"] == "paddle_cpu" and card["eval_samples"] == 4
    assert {c["variant"] for c in card["candidates"]} == {"baseline_fp32", "fp32"}
    assert sum(c["chosen"] for c in card["candidates"]) == 1
    assert (tmp_path / "out" / "delivered" / "det" / "MODEL_CARD.md").read_text().startswith("# det: ")
    assert result.metadata["delivered"].startswith("delivered det: ")


def test_publish_link_swaps_atomically_and_refuses_a_real_folder(tmp_path):
    from compress.errors import CheckpointError
    from compress.runner import publish_link

    for version in ("v1", "v2"):
        (tmp_path / "stages" / version / "delivered").mkdir(parents=True)
        (tmp_path / "stages" / version / "delivered" / "mark").write_text(version)
        publish_link(str(tmp_path / "delivered"), str(tmp_path / "stages" / version / "delivered"))
        assert (tmp_path / "delivered" / "mark").read_text() == version
    assert os.readlink(tmp_path / "delivered") == os.path.join("stages", "v2", "delivered")  # relative: movable
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError, match="exists and is not a link"):
        publish_link(str(tmp_path / "other"), str(tmp_path / "stages" / "v1" / "delivered"))
