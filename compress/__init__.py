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

``MKL_DEBUG_CPU_TYPE`` is 5 on AMD CPUs unless the environment sets it (an empty value keeps MKL's own choice):
the MKL that Paddle 2.6's CPU wheel ships (``libmklml_intel.so``, read when it loads) otherwise runs its generic
code path on non-Intel CPUs, and Paddle's dygraph convs and matmuls, hence every fine-tune step and the prune
stage's forward passes, go through it. On an AMD EPYC (Zen 4, AVX-512; 2 threads, scratch timing,
median of 5): a 1x1 conv 120 -> 480 channels on [4, 120, 30, 30] 5.9 -> 2.0 ms, a 3x3 conv 96 -> 96 on
[4, 96, 120, 120] 187 -> 109 ms; ``python benchmarks/bench_train_step.py`` measures the whole step. Intel CPUs
are left alone.
"""
import os

os.environ.setdefault("KMP_BLOCKTIME", "10")


def _cpu_vendor():
    """The first ``vendor_id`` of /proc/cpuinfo ('' where there is none: not Linux, not x86)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


if "MKL_DEBUG_CPU_TYPE" not in os.environ and _cpu_vendor() == "AuthenticAMD":
    os.environ["MKL_DEBUG_CPU_TYPE"] = "5"

import zlib  # noqa: E402,F401  (must precede any paddle import, see module docstring)

__version__ = "0.1.0"
