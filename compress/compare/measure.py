"""Measuring variants side by side: metric through the real predictor, fidelity to the baseline, size, latency
percentiles (interleaved, see :mod:`compress.timing`), throughput and peak RSS; one report row per variant."""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

from dataclasses import dataclass
from typing import Optional

import numpy as np

from compress.compare.variants import model_files_bytes
from compress.errors import InputError
from compress.report import new_row


@dataclass
class MeasureSettings:
    """Resolved measuring settings (a CompareConfig with the thread count filled in)."""

    threads: int
    warmup: int
    repeats: int
    batch: int
    eval_limit: Optional[int]
    rss: bool
    show_progress: bool = True
    pause_ms: float = 0.0
    settle_calls: int = 0

    @classmethod
    def from_config(cls, cfg, default_threads, show_progress=True):
        return cls(cfg.threads or default_threads, cfg.warmup, cfg.repeats, cfg.batch, cfg.eval_limit, cfg.rss,
                   show_progress, cfg.pause_ms, cfg.settle_calls)


def timing_inputs(task, batch):
    """(batch-1 input, throughput input) from the first Eval samples; same arrays for every variant."""
    samples = task.samples("eval", None)
    first = samples[0][0].astype("float32")
    chosen = [s[0] for s in samples[:batch]]
    if len(chosen) == batch and all(c.shape == first.shape for c in chosen):
        many = np.stack(chosen).astype("float32")
    else:  # differently sized pages (det) or too few samples: repeat the first one
        many = np.repeat(first[None], batch, axis=0)
    return first[None], many


def predict_fn(predictor):
    """``predict(images) -> first output`` over a created predictor (the form ``Task.evaluate`` wants)."""
    name = predictor.input_names[0]

    def predict(images):
        return predictor.run({name: images})[0]

    return predict


def measure_variants(model_name, variants, task, settings, max_batch_size, facts, log=print, reference=None):
    """Evaluate and time exported models against each other; one report row per variant.

    Args:
        model_name: model name for the rows.
        variants: list of Variant.
        task: ``compress.tasks.Task`` of the model (Eval split, main metric).
        settings: MeasureSettings.
        max_batch_size: largest batch the model takes (Input.max_batch_size).
        facts: callable(Variant) -> dict with ``params`` / ``flops`` for the row (from the manifest).
        log: progress lines.
        reference: the baseline's :class:`~compress.fidelity.FidelityReference`; each variant's agreement with it
            goes into the row's metrics (``fidelity``, ...). None: not measured.

    Returns:
        list of report rows (deltas not applied yet).
    """
    from compress.fidelity import measure_fidelity, summary
    from export.predictor import create_predictor

    if not variants:
        return []
    batch = max(1, min(settings.batch, max_batch_size))
    single, many = timing_inputs(task, batch)
    predictors, rows = {}, {}
    for variant in variants:
        key = variant_key(variant)
        predictor = create_predictor(variant.path, variant.deploy(settings.threads))
        predictors[key] = predictor
        samples = []
        metrics = task.evaluate(predict_fn(predictor), limit=settings.eval_limit,
                                desc=f"compare {model_name} {variant_label(variant)}", samples=samples)
        if reference is not None:
            metrics.update(measure_fidelity(task, predict_fn(predictor), reference,
                                            desc=f"fidelity {model_name} {variant_label(variant)}"))
        rows[key] = new_row(model_name, variant.stage, variant=variant.name, backend=variant.backend,
                            precision=variant.precision, run=variant.run, source="measured",
                            metric_name=task.main_metric, metric=metrics.get(task.main_metric), metrics=metrics,
                            eval_records=samples,
                            size_bytes=model_files_bytes(variant.path), gated=variant.stage != "baseline",
                            **facts(variant))
        if predictor.fallback_reason:
            rows[key]["note"] = f"ran on {predictor.backend}: {predictor.fallback_reason}"
        if settings.show_progress:
            log(f"  compare {model_name} {variant_label(variant)}: {task.main_metric}="
                f"{rows[key]['metric']:.4f}  {summary(metrics)}".rstrip())
    latency = _time_all(predictors, single, settings)
    throughput = latency if batch == 1 else _time_all(predictors, many, settings)
    for key, row in rows.items():
        row.update(latency_ms_p50=latency[key].p50_ms, latency_ms_p90=latency[key].p90_ms,
                   latency_ms_p99=latency[key].p99_ms, throughput_ips=throughput[key].items_per_second(batch),
                   throughput_batch=batch)
    predictors.clear()
    if settings.rss:
        from compress.timing import measure_peak_rss
        for variant in variants:
            row = rows[variant_key(variant)]
            try:
                row["peak_rss_mb"] = measure_peak_rss(variant.path, variant.deploy(settings.threads),
                                                      single.shape).peak_rss_mb
            except InputError as exc:  # a memory figure is not worth failing the comparison for
                row["note"] = " ".join(filter(None, [row["note"], f"peak RSS not measured: {exc}"]))
    return list(rows.values())


def variant_key(variant):
    return (variant.run, variant.name, variant.backend)


def variant_label(variant):
    return f"{variant.run + ':' if variant.run else ''}{variant.name}@{variant.backend}"


def _time_all(predictors, images, settings):
    from compress.timing import time_interleaved

    calls = {key: _bound(predictor, images) for key, predictor in predictors.items()}
    return time_interleaved(calls, warmup=settings.warmup, repeats=settings.repeats, pause_s=settings.pause_ms / 1000.0,
                            settle=settings.settle_calls)


def _bound(predictor, images):
    inputs = {predictor.input_names[0]: images}
    return lambda: predictor.run(inputs)
