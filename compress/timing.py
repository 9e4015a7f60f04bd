"""Fair speed and memory measurements: interleaved latency percentiles, throughput, peak RSS, machine facts.

Fairness rules used by the compare stage and the benchmarks:

* every candidate runs in the same process with the same thread count (the caller builds the predictors);
* repeats are interleaved, one run of each candidate per round, so that load from other processes on a shared
  machine hits all candidates alike; the order is reversed every other round (A,B,B,A,...) so that no candidate
  always runs right after the same neighbour;
* the previous runtime's worker threads (ONNX Runtime's pool when spinning is on, Intel OpenMP under Paddle's oneDNN,
  which spins 200 ms) and cache lines slow the next call; ``settle`` untimed calls of the same candidate right before
  each timed one leave it running as a deployment calling one model does (``benchmarks/bench_timing_fairness.py``:
  interleaved p50 1.07-1.19x of alone with one settle call, 1.12-1.23x without; an idle pause instead, ``pause_s``,
  made it worse: up to 1.83x, threads asleep and caches cold);
* numbers are medians / percentiles over the repeats, never means;
* peak memory is measured in a fresh child process per model (load + a few runs) with the same layout for all.

Run as ``python -m compress.timing --rss-child JSON`` only from :func:`measure_peak_rss`.
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from compress.errors import InputError

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Percentiles of one candidate's run times.

    Attributes:
        p50_ms / p90_ms / p99_ms: percentiles in milliseconds (linear interpolation between samples).
        mean_ms / min_ms: for reference only; compare medians.
        samples: number of timed runs.
    """

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    samples: int

    def items_per_second(self, batch):
        """Throughput at the median: ``batch`` items per p50 run time."""
        return batch / (self.p50_ms / 1000.0) if self.p50_ms > 0 else float("inf")


def latency_stats(seconds):
    """Percentiles of a list of durations in seconds.

    Raises:
        ValueError: when ``seconds`` is empty.
    """
    if len(seconds) == 0:
        raise ValueError("latency_stats needs at least one sample")
    ms = np.asarray(seconds, dtype="float64") * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LatencyStats(float(p50), float(p90), float(p99), float(ms.mean()), float(ms.min()), int(ms.size))


def time_interleaved(candidates, warmup=3, repeats=20, clock=time.perf_counter, pause_s=0.0, sleep=time.sleep,
                     settle=0):
    """Time several zero-argument callables fairly against each other.

    Args:
        candidates: mapping key -> callable running one inference (inputs bound already).
        warmup: untimed runs of each candidate first (oneDNN / ORT build kernels and caches on the first runs).
        repeats: timed rounds; each round runs every candidate once, in alternating order.
        clock: time source (tests pass a fake one).
        pause_s: idle time before every timed call (untimed).
        sleep: the pause function (tests pass a fake one).
        settle: untimed calls of the same candidate right before each timed call, so the timed call finds its own
            runtime's threads awake and its weights in cache, as a deployment calling one model does, instead of
            the previous runtime's spinning threads and cache lines.

    Returns:
        dict key -> LatencyStats.
    """
    keys = list(candidates)
    for _ in range(warmup):
        for key in keys:
            candidates[key]()
    samples = {key: [] for key in keys}
    for round_index in range(max(1, repeats)):
        order = keys if round_index % 2 == 0 else keys[::-1]
        for key in order:
            if pause_s > 0:
                sleep(pause_s)
            for _ in range(settle):
                candidates[key]()
            start = clock()
            candidates[key]()
            samples[key].append(clock() - start)
    return {key: latency_stats(values) for key, values in samples.items()}


@dataclasses.dataclass(frozen=True)
class MemoryStats:
    """Resident memory of a fresh process that loaded a model and ran it.

    Attributes:
        peak_rss_mb: peak resident set size of the whole process (MiB, see :func:`peak_rss_mb`).
        import_rss_mb: resident size after importing the libraries, before loading the model.
    """

    peak_rss_mb: float
    import_rss_mb: float

    @property
    def model_rss_mb(self):
        """What loading and running the model added on top of the imported libraries."""
        return self.peak_rss_mb - self.import_rss_mb


def measure_peak_rss(model_path, deploy, input_shape, runs=3, timeout_s=300):
    """Peak RSS of a fresh Python process that loads ``model_path`` with ``deploy`` and runs it ``runs`` times.

    Every model is measured in the same kind of process (same imports, same deploy settings except the model),
    so differences come from the model and its backend.

    Args:
        model_path: inference model folder or file (see ``export.predictor.find_model_files``).
        deploy: ``export.predictor.DeployConfig``.
        input_shape: shape of the float32 input fed to the first model input.
        runs: inference runs after loading.
        timeout_s: give up after this many seconds.

    Returns:
        MemoryStats.

    Raises:
        InputError: when the child process fails (the message carries the end of its output).
    """
    request = {"model_path": str(model_path), "deploy": deploy.to_dict(), "input_shape": [int(d) for d in input_shape],
               "runs": int(runs)}
    env = dict(os.environ)
    env["PYTHONPATH"] = PROJECT_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, "-m", "compress.timing", "--rss-child", json.dumps(request)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=PROJECT_ROOT)
    except subprocess.TimeoutExpired:
        raise InputError(f"memory measurement of {model_path} took over {timeout_s}s; check the model") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InputError(f"memory measurement of {model_path} failed (exit {proc.returncode}): {tail[0]}")
    data = json.loads(lines[-1])
    return MemoryStats(data["peak_rss_mb"], data["import_rss_mb"])


def _proc_status_mb(field):
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb():
    """Peak resident memory of this process's address space (MiB).

    Linux ``VmHWM``: ``getrusage().ru_maxrss`` is no good in a child process, because Linux carries the high-water
    mark of the forked copy of the parent's address space across ``execve`` (a child of a 2 GB process reports
    2 GB).
    """
    value = _proc_status_mb("VmHWM")
    if value is not None:
        return value
    import resource

    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss / (1024.0 * 1024.0) if sys.platform == "darwin" else max_rss / 1024.0


def current_rss_mb():
    """Resident memory of this process now (MiB)."""
    value = _proc_status_mb("VmRSS")
    return value if value is not None else peak_rss_mb()


def _rss_child(request):
    """Body of the child process of :func:`measure_peak_rss`; prints one JSON line."""
    from export.predictor import DeployConfig, create_predictor, detect_capabilities

    detect_capabilities()  # imports paddle (and onnxruntime) for every backend alike
    import_rss = current_rss_mb()
    predictor = create_predictor(request["model_path"], DeployConfig.from_dict(request["deploy"]))
    example = np.random.default_rng(0).standard_normal(request["input_shape"]).astype("float32")
    for _ in range(request["runs"]):
        predictor.run({predictor.input_names[0]: example})
    print(json.dumps({"peak_rss_mb": round(peak_rss_mb(), 1), "import_rss_mb": round(import_rss, 1)}), flush=True)


def machine_info():
    """Facts that make timings comparable: CPU model, logical CPUs, ISA flags, library versions.

    Returns:
        dict of plain values.
    """
    info = {"cpu_model": _cpu_model(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "cpu_flags": _cpu_flags()}
    for module in ("paddle", "onnxruntime", "openvino", "nncf", "paddleslim", "paddle2onnx", "numpy"):
        info[f"{module}_version"] = _module_version(module)
    return info


def _cpu_model():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags():
    interesting = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in interesting if flag in flags]
    except OSError:
        pass
    return []


def _module_version(module):
    from importlib import metadata

    names = {"paddle": "paddlepaddle"}
    try:
        return metadata.version(names.get(module, module))
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-child":
        _rss_child(json.loads(sys.argv[2]))
    else:
        sys.exit("usage: python -m compress.timing --rss-child JSON (used by compress.timing.measure_peak_rss)")
