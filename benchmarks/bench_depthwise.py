"""Paddle's CPU depth-wise conv against ``finetune.depthwise`` (Numba kernels), forward and backward, side by side.

The shapes are PP-OCRv4's own, at the default fine-tune batches: rec (batch 8, 3x48x320) runs 3x3 convs on
[8, 64, 24, 160] and 5x5 ones on [8, 240, 12, 80], some with stride (2, 1); det (batch 4 crops of 480x480) runs
3x3 stride-2 convs on [4, 48, 120, 120] and 5x5 ones on [4, 192, 30, 30]. For each shape both implementations run in
turn (one call of each, ``--repeats`` times, after one warm-up call that also compiles the Numba kernels), and the
medians of forward and backward times, their ratios and the largest relative difference of output and gradients
are printed.

Usage: python benchmarks/bench_depthwise.py [--repeats 5] [--threads 2]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import compress  # noqa: E402,F401  (imports zlib before paddle)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402

SHAPES = [  # (input shape, kernel, stride, padding): what PP-OCRv4 mobile rec / det train on
    ("rec", (8, 64, 24, 160), 3, (1, 1), 1),
    ("rec", (8, 64, 24, 160), 3, (2, 1), 1),
    ("rec", (8, 240, 12, 80), 5, (1, 1), 2),
    ("rec", (8, 240, 12, 80), 5, (2, 1), 2),
    ("det", (4, 48, 120, 120), 3, (2, 2), 1),
    ("det", (4, 192, 30, 30), 5, (1, 1), 2),
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def time_call(conv, x, weight, grad):
    """One forward and backward: (forward s, backward s, (output, input gradient, weight gradient))."""
    xt, wt = paddle.to_tensor(x, stop_gradient=False), paddle.to_tensor(weight, stop_gradient=False)
    gt = paddle.to_tensor(grad)
    start = time.perf_counter()
    out = conv(xt, wt)
    middle = time.perf_counter()
    out.backward(gt)
    end = time.perf_counter()
    return middle - start, end - middle, (out.numpy(), xt.grad.numpy(), wt.grad.numpy())


def main():
    from compress.threads import set_threads
    from finetune.depthwise import depthwise_conv2d
    args = parse_args()
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"depth-wise conv, {args.threads} threads, median of {args.repeats} (ms): Paddle 2.6 vs finetune.depthwise")
    for model, shape, kernel, stride, padding in SHAPES:
        channels = shape[1]
        x = rng.standard_normal(shape).astype("float32")
        weight = rng.standard_normal((channels, 1, kernel, kernel)).astype("float32")
        out_shape = paddle.nn.functional.conv2d(paddle.to_tensor(x[:1]), paddle.to_tensor(weight), stride=stride,
                                                padding=padding, groups=channels).shape
        grad = rng.standard_normal([shape[0]] + list(out_shape[1:])).astype("float32")
        convs = {
            "paddle": lambda a, b: paddle.nn.functional.conv2d(a, b, stride=stride, padding=padding, groups=channels),
            "numba": lambda a, b: depthwise_conv2d(a, b, stride, padding),
        }
        times = {name: ([], []) for name in convs}
        results = {name: time_call(conv, x, weight, grad)[2] for name, conv in convs.items()}  # warm-up, compile
        for _ in range(args.repeats):
            for name, conv in convs.items():
                forward, backward, _ = time_call(conv, x, weight, grad)
                times[name][0].append(forward)
                times[name][1].append(backward)
        med = {name: [statistics.median(t) * 1e3 for t in pair] for name, pair in times.items()}
        diff = max(float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
                   for a, b in zip(results["numba"], results["paddle"]))
        print(f"  {model} {kernel}x{kernel} stride {stride[0]}x{stride[1]} on {list(shape)}: forward "
              f"{med['paddle'][0]:.1f} -> {med['numba'][0]:.1f} ({med['paddle'][0] / med['numba'][0]:.1f}x), "
              f"backward {med['paddle'][1]:.1f} -> {med['numba'][1]:.1f} ({med['paddle'][1] / med['numba'][1]:.1f}x), "
              f"max rel. diff {diff:.1e}", flush=True)


if __name__ == "__main__":
    main()
