"""Report rows from the run manifest (one per finished stage), the gate over rows, and reading the rows and the
config a run wrote."""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import os

from compress.checkpoint import DONE, WEIGHTS_FILE
from compress.errors import CheckpointError
from compress.report import apply_deltas, assign_references, gate_failures, gate_message, new_row, row_key

ROWS_FILE = "rows.json"
GATE_LIMITS = ("max_metric_drop", "max_fidelity_drop", "max_script_fidelity_drop")


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
    path = os.path.join(manifest.abs_dir(entry), WEIGHTS_FILE)
    return os.path.getsize(path) if WEIGHTS_FILE in entry.get("files", {}) and os.path.exists(path) else None


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


def gate_limits(cfg):
    """The gate limits of a :class:`CompareConfig`, as the reports store them for each model."""
    return {key: getattr(cfg, key) for key in GATE_LIMITS}


def run_gate(rows, cfg, metric_setting="Compare.max_metric_drop"):
    """The gate summary stored in the reports when every model has the limits of ``cfg``: ``limits`` (model ->
    :func:`gate_limits`, for the models with gated rows), passed, message, failing row keys."""
    keys, message = gate_summary(rows, cfg, metric_setting)
    models = dict.fromkeys(r["model"] for r in rows if r["gated"])
    return {"limits": {model: gate_limits(cfg) for model in models}, "passed": not keys, "message": message,
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
