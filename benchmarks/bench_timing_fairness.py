"""Is the A/B timing fair? A variant's p50 alone against its p50 interleaved with the other runtimes, in one run.

The compare stage times every variant interleaved (one call of each in turn). A runtime whose worker threads keep
spinning after a call returns (Intel OpenMP under Paddle's oneDNN: ``KMP_BLOCKTIME`` 200 ms; ONNX Runtime's pool
when ``allow_spinning`` is on) takes a core from the next call, so interleaved numbers can be worse than what a
deployment sees. This measures, for the shipped PP-OCRv4 rec (3x48x320) on Paddle Inference, ONNX Runtime and
OpenVINO (FP32, ``--threads``):

  alone              the variant by itself (``time_interleaved`` with one candidate)
  interleaved        all three in turn, one timed call each
  interleaved+pause  all three in turn with ``--pause-ms`` idle before each call
  interleaved+settle all three in turn, ``--settle`` untimed calls of the same variant before each timed one (the
                     compare stage's ``Compare.settle_calls``)

and prints each p50 and its ratio to ``alone``: fair timing keeps the ratio within noise of 1.00. Nothing is
downloaded; the ONNX model is converted into a temporary folder. The machine's own speed drifts during a run
(``alone`` moved up to 1.5x between the start and the end of one run on an AMD EPYC), so the run is repeated in
``--rounds`` rounds, each timing ``alone`` and then every condition; a ratio is taken within its round, and the
median over rounds is printed with its range.

Measured (Xeon with VNNI and AMX, 2 vCPUs, 2 threads, ``--repeats 30``, ``KMP_BLOCKTIME`` 10 ms as
``compress/__init__.py`` sets it; 5 runs), p50 ms alone and ratios interleaved / +pause / +settle: paddle_cpu
19.3-20.4, 1.11-1.14 / 1.17-1.23 / 0.97-1.07; onnxruntime 13.8-14.2, 1.12-1.17 / 1.27-1.37 / 1.01-1.07; openvino
5.4-5.8, 1.27-1.34 / 2.13-2.24 / 1.09-1.19. With ``KMP_BLOCKTIME=200`` (Intel OpenMP's default) the +settle ratios
were 1.04-1.06 / 1.13-1.23 / 1.11-1.25.
AMD EPYC with AVX-512 VNNI, 2 vCPUs, no steal time, ``--rounds 5`` and ``--rounds 7``: +settle medians 1.01 / 1.02
(paddle_cpu), 1.03 / 1.04 (onnxruntime), 1.04 / 1.00 (openvino); single rounds 0.69-1.68.

Usage: python benchmarks/bench_timing_fairness.py [--threads 2] [--repeats 30] [--pause-ms 250] [--settle 1]
       [--rounds 5]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compress  # noqa: E402,F401  (imports zlib before paddle)

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from compress.ppocr_compat import rapidocr_root  # noqa: E402
from compress.timing import machine_info, time_interleaved  # noqa: E402
from export.deploy import delete_passes_for  # noqa: E402
from export.onnx_export import export_to_onnx  # noqa: E402
from export.predictor import DeployConfig, create_predictor  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--pause-ms", type=float, default=250.0)
    parser.add_argument("--settle", type=int, default=1, help="untimed calls of the same variant before each timed one")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each timing alone and every condition")
    return parser.parse_args()


def main():
    args = parse_args()
    shipped = os.path.join(rapidocr_root(), "models", "ch_PP-OCRv4_rec_infer")
    work = tempfile.mkdtemp(prefix="fairness-")
    try:
        folder = os.path.join(work, "rec")
        shutil.copytree(shipped, folder)
        onnx_file = export_to_onnx(folder, os.path.join(folder, "model.onnx")).path
        x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 48, 320)).astype(np.float32)
        paths = {"paddle_cpu": folder, "onnxruntime": onnx_file, "openvino": folder}
        calls = {}
        for backend, path in paths.items():
            deploy = DeployConfig(backend=backend, threads=args.threads, delete_passes=delete_passes_for("rec"))
            predictor = create_predictor(path, deploy)
            calls[backend] = (lambda p: lambda: p.run({"x": x}))(predictor)
        conditions = {"interleaved": {}, "+pause": {"pause_s": args.pause_ms / 1000.0},
                      "+settle": {"settle": args.settle}}
        ratios = {name: {k: [] for k in calls} for name in conditions}
        alone_ms = {k: [] for k in calls}
        for _ in tqdm(range(args.rounds), desc="rounds"):
            alone = {k: time_interleaved({k: call}, args.warmup, args.repeats)[k].p50_ms for k, call in calls.items()}
            for name, options in conditions.items():
                stats = time_interleaved(calls, args.warmup, args.repeats, **options)
                for k in calls:
                    ratios[name][k].append(stats[k].p50_ms / alone[k])
            for k in calls:
                alone_ms[k].append(alone[k])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = machine_info()
    print(f"rec 1x3x48x320 FP32, {args.threads} threads, p50 of {args.repeats} calls per condition, {args.rounds} "
          f"rounds; {info.get('cpu_model')} ({', '.join(info.get('cpu_flags', []))})")
    print("ratio: p50 in the condition / p50 alone in the same round; median over rounds [min, max]")
    print(f"{'backend':<12} {'alone ms':>18} " + " ".join(f"{name:>20}" for name in conditions))
    for k in calls:
        low, high = min(alone_ms[k]), max(alone_ms[k])
        cells = [f"{np.median(r):.2f} [{min(r):.2f}, {max(r):.2f}]" for r in (ratios[n][k] for n in conditions)]
        print(f"{k:<12} {np.median(alone_ms[k]):>6.1f} [{low:.1f}, {high:.1f}] " + " ".join(f"{c:>20}" for c in cells))


if __name__ == "__main__":
    main()
