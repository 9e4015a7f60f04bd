"""Stage ``compare``: A/B of the compressed models against the baseline, with reports and a quality gate.

For each model the stage gathers

* one row per finished stage of the run, from the manifest (metric, params, FLOPs, weights size), and
* one row per exported model and backend, measured now: main metric on the Eval split through the real predictor
  (``ctx.task.evaluate``), size on disk, latency p50/p90/p99 at batch 1, throughput at ``batch``, and the peak RSS
  of a fresh process that loads and runs the model (see ``compress.timing`` for the fairness rules);

then compares every row with its baseline row (``compress.report``). When the last model of the run is processed
it also runs the end-to-end OCR A/B (baseline det+rec system vs compressed det+rec system on the det eval pages)
and writes the run-level reports into the run directory as well as into the stage directory.

Export layout read (``export/stage.py`` writes one folder per model variant into its checkpoint directory)::

    <export dir>/baseline_fp32/   the baseline weights (absent when no stage changed them: fp32/ is the baseline)
    <export dir>/fp32/            the compressed float model
    <export dir>/int8/            the INT8 model from the quant stage
    each with inference.pdmodel/.pdiparams, model.onnx, deploy.yml and deploy_<backend>.yml

Each deploy config a folder's ``deploy.yml`` lists is one variant (``export.deploy.DeployBundle``); folders without
``deploy.yml`` are read from their files (Paddle program -> ``paddle_cpu``, each ``*.onnx`` -> ``onnxruntime``,
precision from ``int8`` in the name).
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import dataclasses
import glob
import json
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from compress.checkpoint import DONE, FAILED, atomic_write_json, verify_files
from compress.errors import CheckpointError, ConfigError, InputError
from compress.fidelity import validate_fidelity_limits
from compress.report import (apply_deltas, assign_references, gate_failures, gate_message, new_row, row_key,
                             summary_text, write_reports)
from compress.stages.base import Stage, StageResult, register_stage
from export.backends import get_backend
from compress.stages.evaluation import fidelity_reference

ROWS_FILE = "rows.json"
BASELINE_VARIANT_PREFIX = "baseline"


@dataclass(frozen=True)
class CompareConfig:
    """``Compare`` section."""

    threads: Optional[int] = None  # CPU threads for every measured model (null: Global.threads)
    warmup: int = 3  # untimed runs per model before timing
    repeats: int = 20  # interleaved timed runs per model (medians / percentiles over these)
    batch: int = 8  # throughput batch (capped by the model's Input.max_batch_size)
    eval_limit: Optional[int] = None  # evaluate exported models on the first N eval samples (null: the Eval limit)
    backends: List[str] = ("paddle_cpu", "onnxruntime")
    max_metric_drop: Optional[float] = 1.0  # gate: largest allowed main-metric drop in points (null: no gate)
    # gate: largest allowed loss of agreement with the baseline on the Fidelity split, in points, overall and for
    # the worst script (rec); null: not gated
    max_fidelity_drop: Optional[float] = None
    max_script_fidelity_drop: Optional[float] = None
    e2e: bool = True  # end-to-end det+rec OCR A/B on the det eval pages (at the last model of the run)
    e2e_limit: Optional[int] = None  # pages for the end-to-end A/B (null: all det eval pages)
    rss: bool = True  # measure peak RSS in a fresh process per exported model

    def validate(self, where):
        for key, low in (("threads", 1), ("warmup", 0), ("repeats", 1), ("batch", 1), ("eval_limit", 1),
                         ("e2e_limit", 1)):
            value = getattr(self, key)
            if value is not None and value < low:
                raise ConfigError(f"{where}.{key}: must be >= {low}, got {value}")
        for backend in self.backends:
            get_backend(backend, f"{where}.backends")
        validate_fidelity_limits(self, where)
        if self.max_metric_drop is not None and self.max_metric_drop < 0:
            raise ConfigError(f"{where}.max_metric_drop: must be >= 0 points (or null for no gate), "
                              f"got {self.max_metric_drop}")


# --------------------------------------------------------------------------------------------- variants

@dataclass(frozen=True)
class Variant:
    """One exported model on one backend.

    Attributes:
        name: variant name: the folder name in the export dir (``baseline_fp32``, ``fp32``, ``int8``), plus
            ``/<file stem>`` for ONNX files found without a ``deploy.yml`` when the folder holds several.
        path: what ``create_predictor`` loads: the model folder (Paddle) or the ``.onnx`` file.
        backend: deploy backend requested (the predictor may fall back, e.g. ``paddle_trt`` -> ``paddle_cpu``).
        precision: ``fp32``, ``fp16`` or ``int8``.
        deploy_config: the DeployConfig as a dict (``to_dict`` form); ``threads`` is replaced when measuring.
        run: run label (``tools/compare.py --against``), empty inside a pipeline.
        deploy_key: the key of this deploy config in the folder's ``deploy.yml`` (None without one).
        baseline: True for the exported baseline model.
    """

    name: str
    path: str
    backend: str
    precision: str
    deploy_config: dict = dataclasses.field(default_factory=dict)
    run: str = ""
    deploy_key: Optional[str] = None
    baseline: bool = False

    @property
    def folder(self):
        """The exported model folder (holding ``deploy.yml`` when the export wrote one)."""
        return self.path if os.path.isdir(self.path) else os.path.dirname(self.path)

    @property
    def stage(self):
        return "baseline" if self.baseline else "export"

    def deploy(self, threads):
        """DeployConfig to run this variant with ``threads`` CPU threads."""
        from export.predictor import DeployConfig

        return DeployConfig.from_dict(dict(self.deploy_config, threads=int(threads)))


def discover_variants(export_dir, backends=("paddle_cpu", "onnxruntime"), run="", task=None, baseline_names=()):
    """Exported models in an export checkpoint dir, one Variant per (folder, backend).

    Folders starting with ``_`` or ``.`` (scratch, caches) are skipped. A folder with a ``deploy.yml``
    (``export.deploy.write_deploy_bundle``) gives one variant per deploy config it lists whose backend is in
    ``backends`` (``paddle_trt_fp16`` counts as ``paddle_trt``). A folder without one gives a ``paddle_cpu``
    variant for its Paddle program and an ``onnxruntime`` variant per ``*.onnx`` file, with the precision read from
    ``int8`` in the name and the delete-passes of ``task``.

    Args:
        export_dir: the export stage's checkpoint directory (one sub-folder per variant).
        backends: keep only these backends.
        run: run label copied into every Variant.
        task: ``det`` / ``rec`` (for folders without ``deploy.yml``).
        baseline_names: folders holding the baseline model besides ``baseline*`` ones (``fp32`` when no stage
            before the export changed the weights).

    Returns:
        list of Variant, baseline variants first, then by folder name.
    """
    from export.deploy import DEPLOY_FILE

    folders = sorted((name for name in os.listdir(export_dir) if os.path.isdir(os.path.join(export_dir, name))
                      and not name.startswith(("_", "."))),
                     key=lambda name: (not name.startswith(BASELINE_VARIANT_PREFIX), name))
    variants = []
    for name in folders:
        folder = os.path.join(export_dir, name)
        if os.path.exists(os.path.join(folder, DEPLOY_FILE)):
            found = _bundle_variants(name, folder, backends, run)
        else:
            found = _plain_variants(name, folder, backends, run, task)
        is_baseline = name.startswith(BASELINE_VARIANT_PREFIX) or name in baseline_names
        variants += [dataclasses.replace(v, baseline=is_baseline) for v in found]
    return variants


def baseline_folders(manifest, model_name, export_dir, until_stage="export"):
    """``("fp32",)`` when the export holds no ``baseline*`` folder and no stage before ``until_stage`` saved weights
    other than the baseline's: the export's ``fp32`` model then is the baseline; else ``()``."""
    if export_dir is None or any(n.startswith(BASELINE_VARIANT_PREFIX) for n in os.listdir(export_dir)):
        return ()
    return ("fp32",) if manifest.weight_stages(model_name, until_stage) == ["baseline"] else ()


def _bundle_variants(name, folder, backends, run):
    from export.deploy import read_deploy_bundle

    bundle = read_deploy_bundle(folder)
    variants = []
    for key in bundle.backends():
        deploy = bundle.deploy(key)
        if deploy.backend not in backends:
            continue
        label = name if key == deploy.backend else f"{name}/{key[len(deploy.backend) + 1:]}"
        variants.append(Variant(label, bundle.model_path(deploy.backend), deploy.backend, deploy.precision,
                                deploy.to_dict(), run, key))
    return variants


def _plain_variants(name, folder, backends, run, task):
    """Variants of a folder without ``deploy.yml``: per backend, each model file in the folder it reads (a Paddle
    program, ``*.onnx`` files, OpenVINO ``*.xml`` IRs), precision ``int8`` when the name says so."""
    from export.deploy import delete_passes_for
    from export.predictor import DeployConfig, find_model_files

    passes = delete_passes_for(task) if task else DeployConfig().delete_passes
    try:
        paddle = find_model_files(folder).format in ("pdmodel", "json")
    except InputError:
        paddle = False
    candidates = ([("paddle", folder, name)] if paddle else []) + [
        (fmt, path, os.path.splitext(os.path.basename(path))[0])
        for fmt, pattern in (("onnx", "*.onnx"), ("openvino", "*.xml"))
        for path in sorted(glob.glob(os.path.join(folder, pattern)))]
    variants = []
    for backend in backends:
        reader = get_backend(backend)
        own = [c for c in candidates if c[0] == _FORMAT_KEYS[reader.int8_format or reader.formats[0]]]
        for fmt, path, stem in own:
            label = name if len(own) == 1 else f"{name}/{stem}"
            precision = _precision_from_name(name if fmt == "paddle" else stem if len(own) > 1 else name + stem)
            variants.append(Variant(label, path, backend, precision,
                                    DeployConfig(backend=backend, precision=precision,
                                                 delete_passes=passes).to_dict(), run))
    return variants


# deploy.yml Model.files keys of the model formats
_FORMAT_KEYS = {"pdmodel": "paddle", "json": "paddle", "onnx": "onnx", "openvino": "openvino"}


def drop_unavailable(variants, threads, notes):
    """Drop variants whose backend cannot run here and would fall back onto a backend already measured.

    A ``paddle_trt`` request on a CPU-only build runs on ``paddle_cpu``: measuring it again next to the real
    ``paddle_cpu`` variant would only duplicate that row. The reason goes into ``notes``.
    """
    from export.predictor import resolve_backend

    kept, seen = [], {(v.run, v.name.split("/")[0], v.backend) for v in variants}
    for variant in variants:
        resolved, reason = resolve_backend(variant.deploy(threads))
        if resolved != variant.backend and (variant.run, variant.name.split("/")[0], resolved) in seen:
            notes.append(f"{variant.name}@{variant.backend} not measured: {reason}; it would run on {resolved}, "
                         f"which is measured already")
            continue
        kept.append(variant)
    return kept


def _precision_from_name(name):
    return "int8" if "int8" in name.lower() else "fp32"


def model_files_bytes(path):
    """Size on disk of an inference model: program + params (Paddle folder) or the ``.onnx`` file (+ its data)."""
    from export.predictor import find_model_files

    files = find_model_files(path)
    total = os.path.getsize(files.model_file)
    if files.params_file:
        total += os.path.getsize(files.params_file)
    if files.format == "onnx":
        stem = os.path.splitext(files.model_file)[0]
        total += sum(os.path.getsize(p) for p in glob.glob(stem + ".onnx.data") + glob.glob(stem + ".data"))
    return total


# --------------------------------------------------------------------------------------------- measuring

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

    @classmethod
    def from_config(cls, cfg, default_threads, show_progress=True):
        return cls(cfg.threads or default_threads, cfg.warmup, cfg.repeats, cfg.batch, cfg.eval_limit, cfg.rss,
                   show_progress)


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
        key = _variant_key(variant)
        predictor = create_predictor(variant.path, variant.deploy(settings.threads))
        predictors[key] = predictor
        metrics = task.evaluate(predict_fn(predictor), limit=settings.eval_limit,
                                desc=f"compare {model_name} {_label(variant)}")
        if reference is not None:
            metrics.update(measure_fidelity(task, predict_fn(predictor), reference,
                                            desc=f"fidelity {model_name} {_label(variant)}"))
        rows[key] = new_row(model_name, variant.stage, variant=variant.name, backend=variant.backend,
                            precision=variant.precision, run=variant.run, source="measured",
                            metric_name=task.main_metric, metric=metrics.get(task.main_metric), metrics=metrics,
                            size_bytes=model_files_bytes(variant.path), gated=variant.stage != "baseline",
                            **facts(variant))
        if predictor.fallback_reason:
            rows[key]["note"] = f"ran on {predictor.backend}: {predictor.fallback_reason}"
        if settings.show_progress:
            log(f"  compare {model_name} {_label(variant)}: {task.main_metric}="
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
            row = rows[_variant_key(variant)]
            try:
                row["peak_rss_mb"] = measure_peak_rss(variant.path, variant.deploy(settings.threads),
                                                      single.shape).peak_rss_mb
            except InputError as exc:  # a memory figure is not worth failing the comparison for
                row["note"] = " ".join(filter(None, [row["note"], f"peak RSS not measured: {exc}"]))
    return list(rows.values())


def _variant_key(variant):
    return (variant.run, variant.name, variant.backend)


def _label(variant):
    return f"{variant.run + ':' if variant.run else ''}{variant.name}@{variant.backend}"


def _time_all(predictors, images, settings):
    from compress.timing import time_interleaved

    calls = {key: _bound(predictor, images) for key, predictor in predictors.items()}
    return time_interleaved(calls, warmup=settings.warmup, repeats=settings.repeats)


def _bound(predictor, images):
    inputs = {predictor.input_names[0]: images}
    return lambda: predictor.run(inputs)


# --------------------------------------------------------------------------------------------- manifest rows

def manifest_rows(manifest, model_name, main_metric, until_stage="compare", run=""):
    """One row per finished stage of ``model_name`` recorded in the manifest before ``until_stage``.

    Rows carry the stage's metrics as recorded during the pipeline (no timings).
    """
    rows = []
    for stage in manifest.data.get("pipeline", []):
        if stage == until_stage:
            break
        entry = manifest.entry(stage, model_name)
        if entry is None or entry.get("status") != DONE:
            continue
        metrics = entry.get("metrics", {})
        if main_metric not in metrics and "params" not in metrics:
            continue
        rows.append(new_row(model_name, stage, variant="checkpoint", backend="pipeline",
                            precision="int8" if stage == "quant" else "fp32", run=run, source="manifest",
                            metric_name=main_metric, metric=metrics.get(main_metric),
                            params=metrics.get("params"), flops=metrics.get("flops"),
                            size_bytes=_weights_bytes(manifest, entry, metrics),
                            metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    return rows


def _weights_bytes(manifest, entry, metrics):
    if metrics.get("weights_bytes"):
        return metrics["weights_bytes"]
    path = os.path.join(manifest.abs_dir(entry), "model.pdparams")
    return os.path.getsize(path) if "model.pdparams" in entry.get("files", {}) and os.path.exists(path) else None


def model_facts_from_manifest(manifest, model_name, until_stage="compare"):
    """``facts(variant)`` for :func:`measure_variants`: baseline params/FLOPs for the baseline export, else those
    of the last stage before ``until_stage`` that recorded them."""
    recorded = []
    for stage in manifest.data.get("pipeline", []):
        if stage == until_stage:
            break
        entry = manifest.entry(stage, model_name)
        if entry is not None and entry.get("status") == DONE and "params" in entry.get("metrics", {}):
            recorded.append((stage, entry["metrics"]))
    baseline = dict(recorded).get("baseline", {})
    latest = recorded[-1][1] if recorded else {}

    def facts(variant):
        source = baseline if variant.stage == "baseline" else latest
        return {"params": source.get("params"), "flops": source.get("flops")}

    return facts


def mark_gated(rows):
    """Gate the measured compressed rows; when nothing was measured, the last manifest row of each model."""
    for model in dict.fromkeys(r["model"] for r in rows):
        model_rows = [r for r in rows if r["model"] == model]
        if any(r["gated"] for r in model_rows):
            continue
        staged = [r for r in model_rows if r["source"] == "manifest" and r["stage"] != "baseline"
                  and r.get("metric") is not None]
        if staged:
            staged[-1]["gated"] = True
    return rows


def fidelity_failures(rows, max_drop_pt, max_script_drop_pt=None, setting="Compare.max_fidelity_drop"):
    """Gated rows whose agreement with the baseline (``metrics.fidelity``) fell more than the limits allow.

    Returns:
        list of (row, one-line reason), in row order; empty when the gate passes or is off.
    """
    from compress.fidelity import fidelity_gate

    failing = []
    for row in rows:
        reason = fidelity_gate(row.get("metrics") or {}, max_drop_pt, max_script_drop_pt, setting=setting) \
            if row.get("gated") else None
        if reason:
            failing.append((row, f"{row['model']} {row.get('variant') or row['stage']} on {row.get('backend')}: "
                                 f"{reason}"))
    return failing


def gate_summary(rows, cfg, metric_setting="Compare.max_metric_drop"):
    """The gate over ``rows``: (failing row keys, one-line message) for the metric and the fidelity limits of a
    :class:`CompareConfig`; no keys and an empty message when it passes."""
    metric = gate_failures(rows, cfg.max_metric_drop)
    fidelity = fidelity_failures(rows, cfg.max_fidelity_drop, cfg.max_script_fidelity_drop)
    parts = []
    if metric:
        parts.append(gate_message(metric, cfg.max_metric_drop, {row_key(r): r for r in rows}, metric_setting))
    if fidelity:
        more = f" ({len(fidelity) - 1} more rows over it)" if len(fidelity) > 1 else ""
        parts.append(fidelity[0][1] + more + "; recover fidelity (distill on unlabelled images, prune less) or raise "
                                              "the limit")
    keys = list(dict.fromkeys([row_key(r) for r, _ in metric] + [row_key(r) for r, _ in fidelity]))
    return keys, " | ".join(parts)


def run_gate(rows, cfg, metric_setting="Compare.max_metric_drop"):
    """The gate summary stored in the reports: limits, passed, message, failing row keys."""
    keys, message = gate_summary(rows, cfg, metric_setting)
    return {"max_metric_drop": cfg.max_metric_drop, "max_fidelity_drop": cfg.max_fidelity_drop,
            "max_script_fidelity_drop": cfg.max_script_fidelity_drop, "passed": not keys, "message": message,
            "failing": keys}


def finish_rows(rows, reference_run=None):
    """References, deltas and gate flags for a list of rows."""
    return apply_deltas(assign_references(mark_gated(rows), reference_run))


# --------------------------------------------------------------------------------------------- run config

def load_run_config(run_dir):
    """The fully merged config a run wrote (``run_dir/config.yml``), parsed with every model config.

    Raises:
        CheckpointError: when the run has no config.yml.
    """
    from compress.config import PIPELINE_KEYS, load_config, read_yaml

    path = os.path.join(run_dir, "config.yml")
    if not os.path.exists(path):
        raise CheckpointError(f"{run_dir}: no config.yml; pass a run directory written by tools/run.py")
    sections = [key for key in read_yaml(path) if key not in PIPELINE_KEYS]
    return load_config(path, (), stage_sections=sections)


def checkpoint_dir(manifest, stage, model_name):
    """The (sha256-checked) directory of a finished or gate-failed (stage, model), or None when there is none."""
    entry = manifest.entry(stage, model_name)
    if entry is None or entry.get("status") not in (DONE, FAILED):
        return None
    folder = manifest.abs_dir(entry)
    verify_files(folder, entry.get("files", {}), f"stage '{stage}', model '{model_name}'")
    return folder


def read_rows(folder):
    path = os.path.join(folder, ROWS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["rows"]


# --------------------------------------------------------------------------------------------- end to end

def read_e2e_pages(det_cfg, limit=None):
    """Det eval pages with their ground-truth lines: list of (image path, [(transcription, points), ...]).

    Boxes marked to ignore (``###``) are left out.
    """
    from compress.data.labels import read_det_labels

    samples = read_det_labels(det_cfg.Eval.label_file, det_cfg.Eval.data_dir)
    pages = [(str(s.image_path), [(b.transcription, b.points) for b in s.boxes if not b.ignore]) for s in samples]
    return pages[:limit] if limit else pages


def _box_iou(points_a, points_b):
    """IoU of the axis-aligned bounding rectangles of two polygons."""
    a, b = np.asarray(points_a, dtype="float64"), np.asarray(points_b, dtype="float64")
    ax0, ay0, ax1, ay1 = a[:, 0].min(), a[:, 1].min(), a[:, 0].max(), a[:, 1].max()
    bx0, by0, bx1, by1 = b[:, 0].min(), b[:, 1].min(), b[:, 0].max(), b[:, 1].max()
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def page_scores(truth, predicted, iou_threshold=0.5):
    """Word and character counts of one page.

    Words: whitespace-separated tokens of all lines, matched as multisets (order-free). Characters: each
    ground-truth line is matched to the predicted line whose box overlaps it most (IoU >= ``iou_threshold``,
    each predicted line used once) and scored by Levenshtein distance; an unmatched line costs its length.

    Args:
        truth: [(transcription, points)] of the page.
        predicted: [(text, points)] from the OCR system.

    Returns:
        dict with ``words_true``, ``words_pred``, ``words_matched``, ``chars``, ``char_edits``, ``lines``,
        ``lines_exact``.
    """
    from collections import Counter

    from rapidfuzz.distance import Levenshtein

    true_words = Counter(w for text, _ in truth for w in text.split())
    pred_words = Counter(w for text, _ in predicted for w in text.split())
    scores = {"words_true": sum(true_words.values()), "words_pred": sum(pred_words.values()),
              "words_matched": sum((true_words & pred_words).values()), "chars": 0, "char_edits": 0,
              "lines": len(truth), "lines_exact": 0}
    unused = list(range(len(predicted)))
    for text, points in truth:
        overlaps = [(_box_iou(points, predicted[i][1]), i) for i in unused]
        best_iou, best = max(overlaps, default=(0.0, None))
        guess = ""
        if best is not None and best_iou >= iou_threshold:
            unused.remove(best)
            guess = predicted[best][0]
        scores["chars"] += len(text)
        scores["char_edits"] += Levenshtein.distance(text, guess)
        scores["lines_exact"] += int(text == guess)
    return scores


def summarize_scores(page_results, page_seconds):
    """Micro-averaged end-to-end metrics and per-page latency percentiles."""
    from compress.timing import latency_stats

    total = {key: sum(p[key] for p in page_results) for key in page_results[0]}
    precision = total["words_matched"] / total["words_pred"] if total["words_pred"] else 0.0
    recall = total["words_matched"] / total["words_true"] if total["words_true"] else 0.0
    stats = latency_stats(page_seconds)
    return {"word_precision": precision, "word_recall": recall,
            "word_hmean": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "char_error_rate": total["char_edits"] / total["chars"] if total["chars"] else 0.0,
            "char_edit_distance": total["char_edits"], "line_accuracy": total["lines_exact"] / max(total["lines"], 1),
            "pages": len(page_results), "page_ms_p50": stats.p50_ms, "page_ms_p90": stats.p90_ms,
            "page_ms_p99": stats.p99_ms, "pages_per_s": stats.items_per_second(1)}


def evaluate_systems(systems, pages, warmup=1, clock=None):
    """Run every OCR system on every page, interleaved per page (order alternating), and score them.

    Args:
        systems: key -> callable(image_bgr) -> list of lines with ``text`` and ``points``.
        pages: from :func:`read_e2e_pages`.
        warmup: untimed runs of each system on the first page.

    Returns:
        key -> dict of metrics (see :func:`summarize_scores`).
    """
    import time

    from export.ocr_system import read_image

    clock = clock or time.perf_counter
    images = [read_image(path) for path, _ in pages]
    keys = list(systems)
    for _ in range(warmup):
        for key in keys:
            systems[key](images[0])
    scores = {key: [] for key in keys}
    seconds = {key: [] for key in keys}
    for index, ((_, truth), image) in enumerate(zip(pages, images)):
        for key in (keys if index % 2 == 0 else keys[::-1]):
            start = clock()
            lines = systems[key](image)
            seconds[key].append(clock() - start)
            scores[key].append(page_scores(truth, [(line.text, line.points) for line in lines]))
    return {key: summarize_scores(scores[key], seconds[key]) for key in keys}


def build_ocr_system(det, rec, threads):
    """An ``export.ocr_system.OcrSystem`` over two exported variants, running with ``threads`` CPU threads."""
    from export.ocr_system import OcrSystem
    from export.predictor import create_predictor

    system = OcrSystem(det.folder, rec.folder, backend=det.deploy_key)
    # OcrSystem takes the threads of the export's deploy files; every system compared must use the same count
    for part, variant in ((system.detector, det), (system.recognizer, rec)):
        if variant.deploy_config.get("threads") != threads:
            part.predictor = create_predictor(variant.path, variant.deploy(threads))
    return system


def e2e_rows(det_variants, rec_variants, det_cfg, settings, limit=None, log=print):
    """End-to-end OCR A/B: the baseline det+rec system against each compressed det+rec system.

    Systems pair det and rec variants of the same name and deploy config; the baseline system pairs the baseline
    variants. Variants without a ``deploy.yml`` cannot run as a system and are left out.

    Returns:
        list of report rows with model ``e2e`` (metric ``word_hmean``; word precision / recall, character error
        rate and line accuracy in ``metrics``; latency per page).
    """
    rec_by_key = {(v.run, v.name, v.deploy_key): v for v in rec_variants if v.deploy_key}
    # a model no stage changed exports only fp32/, which is its baseline: the baseline det pairs with it
    rec_baselines = {(v.run, v.deploy_key): v for v in rec_variants if v.deploy_key and v.baseline}
    pairs = []
    for det in det_variants:
        rec = rec_by_key.get((det.run, det.name, det.deploy_key))
        if rec is None and det.baseline:
            rec = rec_baselines.get((det.run, det.deploy_key))
        if rec is not None:
            pairs.append((det, rec))
    if not any(d.stage == "baseline" for d, _ in pairs):
        return []
    pages = read_e2e_pages(det_cfg, limit)
    systems = {_variant_key(d): build_ocr_system(d, r, settings.threads) for d, r in pairs}
    results = evaluate_systems(systems, pages, warmup=min(settings.warmup, 1))
    if det_cfg.Fidelity is not None:
        baseline_key = next(_variant_key(d) for d, _ in pairs if d.stage == "baseline")
        agreement = e2e_agreement(systems, baseline_key, fidelity_pages(det_cfg), settings.show_progress)
        for key, result in results.items():
            result.update(agreement[key])
    rows = []
    for det, rec in pairs:
        result = results[_variant_key(det)]
        rows.append(new_row("e2e", det.stage, variant=det.name, backend=det.backend, precision=det.precision,
                            run=det.run, source="measured", metric_name="word_hmean",
                            metric=result["word_hmean"], metrics=result,
                            size_bytes=model_files_bytes(det.path) + model_files_bytes(rec.path),
                            latency_ms_p50=result["page_ms_p50"], latency_ms_p90=result["page_ms_p90"],
                            latency_ms_p99=result["page_ms_p99"], throughput_ips=result["pages_per_s"],
                            throughput_batch=1, note="per page: det + crops + rec"))
        if settings.show_progress:
            agreement = f" fidelity={result['fidelity']:.4f}" if "fidelity" in result else ""
            log(f"  compare e2e {_label(det)}: word_hmean={result['word_hmean']:.4f} "
                f"CER={result['char_error_rate']:.4f}{agreement} page p50={result['page_ms_p50']:.0f} ms")
    return rows


def fidelity_pages(det_cfg):
    """Image paths of the det model's Fidelity split (unlabelled pages)."""
    from compress.data.labels import image_paths

    cfg = det_cfg.Fidelity
    return image_paths(det_cfg.path(cfg.data_dir), det_cfg.path(cfg.label_file) if cfg.label_file else None,
                       cfg.limit, where=f"{det_cfg.source_file}: Fidelity")


def e2e_agreement(systems, baseline_key, paths, show_progress=True):
    """End-to-end agreement with the baseline OCR system on unlabelled pages: the baseline system's lines are the
    reference; each system is scored against them as against ground truth (:func:`page_scores`).

    Returns:
        key -> {``fidelity`` (word hmean vs the baseline's words), ``fidelity_line`` (share of the baseline's lines
        read identically at the same place), ``fidelity_cer`` (character error rate vs the baseline's text),
        ``fidelity_pages``}; the baseline system scores 1.0 against itself.
    """
    from tqdm import tqdm

    from export.ocr_system import read_image

    outputs = {key: [] for key in systems}
    for path in tqdm(paths, desc="e2e fidelity", disable=not show_progress, leave=False):
        image = read_image(path)
        for key, system in systems.items():
            outputs[key].append([(line.text, line.points) for line in system(image)])
    out = {}
    for key, pages in outputs.items():
        scores = [page_scores(reference, page) for reference, page in zip(outputs[baseline_key], pages)]
        total = summarize_scores(scores, [0.0] * len(scores)) if scores else {}
        out[key] = {"fidelity": total.get("word_hmean", 1.0), "fidelity_line": total.get("line_accuracy", 1.0),
                    "fidelity_cer": total.get("char_error_rate", 0.0), "fidelity_pages": len(scores)}
    return out


# --------------------------------------------------------------------------------------------- runs

@dataclass
class RunSource:
    """A run, or one checkpoint of it, to compare (``tools/compare.py``).

    Attributes:
        label: run label in the rows (empty when only one run is compared).
        manifest: the run's Manifest.
        config: the run's PipelineConfig (``config.yml``).
        models: model names to compare.
        export_dirs: model name -> export checkpoint dir (None: nothing exported).
        until_stage: manifest rows stop before this stage.
    """

    label: str
    manifest: object
    config: object
    models: list
    export_dirs: dict
    until_stage: str = "compare"


def open_source(path, label=""):
    """A RunSource for a run directory or for a checkpoint directory inside one (``stages/<stage>/<model>/v<N>``).

    A checkpoint selects its model; an export checkpoint also selects that version's exported models, any other
    stage limits the manifest rows to the stages up to it.

    Raises:
        CheckpointError: when ``path`` is neither a run directory nor inside one.
    """
    from compress.checkpoint import MANIFEST_NAME, Manifest

    path = os.path.abspath(path)
    run_dir = next((folder for folder in _self_and_parents(path, 4)
                    if os.path.exists(os.path.join(folder, MANIFEST_NAME))), None)
    if run_dir is None:
        raise CheckpointError(f"{path}: not a run directory (no {MANIFEST_NAME} in it or up to 4 levels above); "
                              f"pass the Global.run_dir of a run, or a checkpoint dir inside one")
    inside = os.path.relpath(path, run_dir) if run_dir != path else None
    manifest = Manifest.load(run_dir)
    config = load_run_config(run_dir)
    models = list(manifest.data.get("models") or config.models)
    export_dirs = {m: checkpoint_dir(manifest, "export", m) for m in models}
    if inside is None:
        return RunSource(label, manifest, config, models, export_dirs)
    parts = inside.split(os.sep)
    if len(parts) != 4 or parts[0] != "stages":
        raise CheckpointError(f"{path}: expected a run dir or a checkpoint dir <run>/stages/<stage>/<model>/v<N>")
    stage, model = parts[1], parts[2]
    if model not in models:
        raise CheckpointError(f"{path}: model '{model}' is not in the run's models ({', '.join(models)})")
    pipeline = manifest.data.get("pipeline", [])
    until = pipeline[pipeline.index(stage) + 1] if stage in pipeline and pipeline.index(stage) + 1 < len(pipeline) \
        else "compare"
    exported = {model: path if stage == "export" else None}
    return RunSource(label, manifest, config, [model], exported, until)


def _self_and_parents(path, levels):
    yield path
    for _ in range(levels):
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent
        yield path


def compare_sources(sources, cfg, reference=0, log=print):
    """Rows for every model of one or more runs: manifest rows plus exported models measured side by side.

    Models exported by several runs are timed in one interleaved loop; every run is evaluated on the Eval split
    of the reference run's model config. Deltas are against the reference run's baseline rows.

    Args:
        sources: list of RunSource (labels must differ when there are several).
        cfg: CompareConfig (``threads`` None: the reference run's Global.threads).
        reference: index of the reference run in ``sources``.
        log: progress lines.

    Returns:
        (rows, notes)
    """
    from compress.tasks import make_task

    ref = sources[reference]
    settings = MeasureSettings.from_config(cfg, ref.config.Global.threads, ref.config.Global.show_progress)
    rows, notes, variants_by_model = [], [], {}
    models = list(dict.fromkeys(m for source in sources for m in source.models))
    for model in models:
        owner = ref if model in ref.models else next(s for s in sources if model in s.models)
        model_cfg = owner.config.models[model]
        task = make_task(model_cfg, settings.show_progress)
        variants, facts = [], {}
        for source in sources:
            if model not in source.models:
                continue
            rows += manifest_rows(source.manifest, model, task.main_metric, source.until_stage, source.label)
            facts[source.label] = model_facts_from_manifest(source.manifest, model, source.until_stage)
            export_dir = source.export_dirs.get(model)
            if export_dir:
                variants += discover_variants(export_dir, cfg.backends, source.label, model_cfg.task,
                                              baseline_folders(source.manifest, model, export_dir))
            else:
                notes.append(f"{source.label or 'run'} {model}: nothing exported; manifest rows only")
        variants = drop_unavailable(variants, settings.threads, notes)
        variants_by_model[model] = (model_cfg, variants)
        rows += measure_variants(model, variants, task, settings, model_cfg.Input.max_batch_size,
                                 lambda v, facts=facts: facts[v.run](v), log,
                                 reference=run_fidelity_reference(owner, model, model_cfg))
    if cfg.e2e:
        rows += _e2e_for(variants_by_model, cfg, settings, notes, log)
    reference_label = ref.label if len(sources) > 1 else None
    return finish_rows(rows, reference_label), notes


def run_fidelity_reference(source, model, model_cfg):
    """The fidelity reference a run's baseline stage stored for ``model``; None without one (no Fidelity split,
    or a run made before fidelity was measured)."""
    from compress.fidelity import REFERENCE_FILE, FidelityReference

    folder = checkpoint_dir(source.manifest, "baseline", model) if model_cfg.Fidelity is not None else None
    path = os.path.join(folder, REFERENCE_FILE) if folder else None
    return FidelityReference.load(path) if path and os.path.exists(path) else None


def _e2e_for(variants_by_model, cfg, settings, notes, log):
    by_task = {}
    for name, (model_cfg, variants) in variants_by_model.items():
        by_task.setdefault(model_cfg.task, (model_cfg, variants))
    if "det" not in by_task or "rec" not in by_task:
        notes.append("end-to-end A/B skipped: it needs exported det and rec models")
        return []
    det_cfg, det_variants = by_task["det"]
    _, rec_variants = by_task["rec"]
    keep = [b for b in cfg.backends if b == "paddle_cpu"] or list(cfg.backends)
    rows = e2e_rows([v for v in det_variants if v.backend in keep], [v for v in rec_variants if v.backend in keep],
                    det_cfg, settings, cfg.e2e_limit, log)
    if not rows:
        notes.append("end-to-end A/B skipped: no baseline det+rec pair of exported models with deploy.yml")
    return rows


# --------------------------------------------------------------------------------------------- the stage

@register_stage
class CompareStage(Stage):
    """A/B of every compressed variant against the baseline: metric, size, latency, throughput, memory."""

    name = "compare"
    section = "Compare"
    config_cls = CompareConfig
    allowed_after = ("export", "quant", "finetune", "prune", "eval", "baseline")
    summary = "A/B report of compressed vs baseline models (metric, size, latency, memory), quality gate"

    def run(self, model, cfg, ctx):
        settings = MeasureSettings.from_config(cfg, ctx.global_cfg.threads, ctx.global_cfg.show_progress)
        notes = []
        rows = finish_rows(self._model_rows(ctx, cfg, settings, notes))
        e2e = self._e2e(ctx, cfg, settings, notes) if cfg.e2e and self._is_last_model(ctx) else None
        atomic_write_json(os.path.join(ctx.out_dir, ROWS_FILE), {"rows": rows + (e2e or [])})
        all_rows = finish_rows(self._other_models_rows(ctx, keep_e2e=e2e is None) + rows + (e2e or []))
        failures, message = gate_summary(rows, cfg)
        write_reports(all_rows, [ctx.out_dir, ctx.run_dir], self._info(settings), "PP-OCR compression A/B report",
                      self._images(ctx), gate=run_gate(all_rows, cfg), notes=notes)
        if self._is_last_model(ctx) or failures:
            print(summary_text(all_rows), flush=True)
        return StageResult(model=model, metrics=self._metrics(rows, ctx.task.main_metric), passed=not failures,
                           message=message, metadata={"rows": len(rows)})

    def _model_rows(self, ctx, cfg, settings, notes):
        """Manifest rows of this model, plus its exported models measured now."""
        rows = manifest_rows(ctx.manifest, ctx.model_name, ctx.task.main_metric)
        export_dir = checkpoint_dir(ctx.manifest, "export", ctx.model_name)
        if export_dir is None:
            notes.append(f"{ctx.model_name}: no export checkpoint in this run; rows come from the manifest only")
            return rows
        variants = discover_variants(export_dir, cfg.backends, task=ctx.task.task,
                                     baseline_names=baseline_folders(ctx.manifest, ctx.model_name, export_dir))
        variants = drop_unavailable(variants, settings.threads, notes)
        return rows + measure_variants(ctx.model_name, variants, ctx.task, settings,
                                       ctx.model_cfg.Input.max_batch_size,
                                       model_facts_from_manifest(ctx.manifest, ctx.model_name),
                                       reference=fidelity_reference(ctx))

    def _is_last_model(self, ctx):
        models = ctx.manifest.data.get("models") or [ctx.model_name]
        return ctx.model_name == models[-1]

    def _other_models_rows(self, ctx, keep_e2e):
        """Rows the other models' latest compare checkpoints recorded (their e2e rows only with ``keep_e2e``)."""
        rows = []
        for other in ctx.manifest.data.get("models", []):
            if other == ctx.model_name:
                continue
            folder = checkpoint_dir(ctx.manifest, self.name, other)
            if folder is not None:
                rows += [r for r in read_rows(folder) if keep_e2e or r["model"] != "e2e"]
        return rows

    def _e2e(self, ctx, cfg, settings, notes):
        try:
            run_cfg = load_run_config(ctx.run_dir)
        except CheckpointError as exc:
            notes.append(f"end-to-end A/B skipped: {exc}")
            return []
        variants_by_model = {}
        for name, model_cfg in run_cfg.models.items():
            export_dir = checkpoint_dir(ctx.manifest, "export", name)
            if export_dir is not None:
                found = discover_variants(export_dir, cfg.backends, task=model_cfg.task,
                                          baseline_names=baseline_folders(ctx.manifest, name, export_dir))
                variants_by_model[name] = (model_cfg, drop_unavailable(found, settings.threads, []))
        return _e2e_for(variants_by_model, cfg, settings, notes, print)

    def _images(self, ctx):
        """The sensitivity stage's curves (``sensitivity.png``) per model, for the HTML report."""
        images = {}
        for model_name in ctx.manifest.data.get("models", []):
            entry = ctx.manifest.entry("sensitivity", model_name)
            if entry is None or entry.get("status") != DONE:
                continue
            path = os.path.join(ctx.manifest.abs_dir(entry), "sensitivity.png")
            if os.path.exists(path):
                with open(path, "rb") as handle:
                    images[model_name] = [(f"{model_name}: pruning sensitivity (sensitivity stage)", handle.read())]
        return images

    def _info(self, settings):
        from compress.timing import machine_info
        info = machine_info()
        info.update(threads=settings.threads, warmup=settings.warmup, repeats=settings.repeats,
                    batch=settings.batch)
        return info

    def _metrics(self, rows, main):
        gated = [r for r in rows if r["gated"] and r.get("metric") is not None]
        metrics = {"rows": len(rows)}
        if gated:
            worst = min(gated, key=lambda r: r.get("metric_diff") or 0.0)
            metrics[main] = worst["metric"]
            metrics["worst_variant"] = f"{worst.get('variant')}@{worst.get('backend')}"
            metrics["max_drop_pt"] = round(-(worst.get("metric_diff_pt") or 0.0), 3)
        for r in rows:
            if r["source"] == "measured" and r.get("latency_ms_p50") is not None:
                metrics[f"latency_ms_p50[{r['variant']}@{r['backend']}]"] = round(r["latency_ms_p50"], 3)
        return metrics


