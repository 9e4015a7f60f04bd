"""Paddle's CPU ``log_softmax`` against ``finetune.fast_ops.log_softmax`` (``x - logsumexp(x)``), side by side.

Rec's distillation term takes the log-softmax of the CTC head's logits, [batch, 40 frames, 6625 classes] for
PP-OCRv4 rec at 3x48x320, on every fine-tune step. Times forward and backward of both formulations on that shape,
interleaved (one call of each in turn), and prints the medians, the ratio and the largest difference of the values.

Measured (AMD EPYC with AVX-512 VNNI, 2 threads, batch 16): Paddle 2.6.2 1.9 s forward + 2.0 s backward per call,
the fast one about 0.07 s in all.

Usage: python benchmarks/bench_log_softmax.py [--batch 16] [--repeats 5] [--threads 2]
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


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="text lines (the default rec fine-tune: 8 + 8)")
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--classes", type=int, default=6625)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def main():
    from compress.threads import set_threads
    from finetune.fast_ops import log_softmax

    args = parse_args()
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    raw = (rng.standard_normal((args.batch, args.frames, args.classes)) * 4).astype("float32")
    variants = {"paddle": lambda x: paddle.nn.functional.log_softmax(x, axis=-1),
                "fast": lambda x: log_softmax(x, axis=-1)}
    times = {name: {"forward": [], "backward": []} for name in variants}
    values = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, fn in variants.items():
            x = paddle.to_tensor(raw, stop_gradient=False)
            started = time.perf_counter()
            y = fn(x)
            forward = time.perf_counter() - started
            started = time.perf_counter()
            y.sum().backward()
            backward = time.perf_counter() - started
            if repeat:
                times[name]["forward"].append(forward)
                times[name]["backward"].append(backward)
            values[name] = y.numpy()
    print(f"log_softmax of [{args.batch}, {args.frames}, {args.classes}] float32, {args.threads} threads, median of "
          f"{args.repeats} calls")
    total = {}
    for name, parts in times.items():
        forward, backward = statistics.median(parts["forward"]), statistics.median(parts["backward"])
        total[name] = forward + backward
        print(f"{name:8s} forward {1000 * forward:8.1f} ms  backward {1000 * backward:8.1f} ms")
    print(f"ratio paddle / fast: {total['paddle'] / total['fast']:.1f}x; largest difference of the values "
          f"{float(np.abs(values['paddle'] - values['fast']).max()):.2e}")


if __name__ == "__main__":
    main()
