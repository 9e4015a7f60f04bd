"""PaddlePaddle model-compression workflow for PP-OCR and other Paddle vision models.

``zlib`` is imported before anything pulls in ``paddle``: Paddle 2.6's ``libpaddle.so``
carries its own zlib symbols, and modules that use zlib after paddle is loaded
(pyclipper, gzip, onnxruntime, paddle2onnx) can otherwise segfault in ``inflateReset2``.

``KMP_BLOCKTIME`` (how long the Intel OpenMP threads under Paddle's oneDNN spin after a parallel region, 200 ms by
default) is 10 ms unless the environment sets it, read when paddle loads: spinning threads took a core from the next
runtime the A/B timing ran. ``benchmarks/bench_timing_fairness.py`` (rec, 2 threads, an untimed call of the same
model before each timed one; 5 runs): interleaved / alone p50 Paddle 0.97-1.07, ONNX Runtime 1.01-1.07, OpenVINO
1.09-1.19, against 1.04-1.06 / 1.13-1.23 / 1.11-1.25 at 200 ms; Paddle alone 20.2 ms either way (0 ms doubled it),
a rec fine-tune step 3.68 s vs 3.71 s.
"""
import os

os.environ.setdefault("KMP_BLOCKTIME", "10")

import zlib  # noqa: E402,F401  (must precede any paddle import, see module docstring)

__version__ = "0.1.0"
