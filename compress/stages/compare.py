"""Stage ``compare`` (run-level: once per run, over every model): A/B of the compressed models against the baseline,
with reports and a quality gate.

For each model the stage gathers one row per finished stage of the run, from the manifest (metric, params, FLOPs,
weights size), and one row per exported model and backend, measured now (:mod:`compress.compare.measure`: main
metric on the Eval split through the real predictor, fidelity to the baseline, size, latency p50/p90/p99,
throughput, peak RSS); then compares every row with its baseline row (``compress.report``), each model against its
own limits (``per_model``). It also runs the end-to-end OCR A/B (:mod:`compress.compare.e2e`) and writes the reports
into the run directory as well as into its checkpoint. The variants come from the export checkpoint
(:mod:`compress.compare.variants`).
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import os
from dataclasses import dataclass
from typing import List, Optional

from compress.backoff import describe, load_attempts
from compress.checkpoint import DONE, atomic_write_json
from compress.compare.delivery import DELIVERED, choose, summary_line, write_delivered
from compress.compare.e2e import e2e_for
from compress.compare.measure import MeasureSettings, measure_variants
from compress.compare.rows import ROWS_FILE, finish_rows, gate_limits, gate_summary, manifest_rows, \
    model_facts_from_manifest
from compress.compare.variants import baseline_folders, discover_variants, drop_unavailable
from compress.errors import ConfigError
from compress.fidelity import baseline_reference, validate_fidelity_limits
from compress.report import summary_text, write_reports
from compress.stages.base import Stage, StageResult, register_stage
from export.backends import get_backend



@dataclass(frozen=True)
class CompareConfig:
    """``Compare`` section."""

    threads: Optional[int] = None  # CPU threads for every measured model (null: Global.threads)
    warmup: int = 3  # untimed runs per model before timing
    repeats: int = 20  # interleaved timed runs per model (medians / percentiles over these)
    # untimed calls of the same model right before each timed one: it then finds its own runtime's threads awake and
    # its weights in cache, as a deployment does (benchmarks/bench_timing_fairness.py: interleaved p50 1.07-1.19x of
    # alone with 1, 1.12-1.23x without; an idle pause instead made it worse, up to 1.83x)
    settle_calls: int = 1
    pause_ms: float = 0.0  # idle time before every timed run
    batch: int = 8  # throughput batch (capped by the model's Input.max_batch_size)
    eval_limit: Optional[int] = None  # evaluate exported models on the first N eval samples (null: the Eval limit)
    backends: List[str] = ("paddle_cpu", "onnxruntime")
    max_metric_drop: Optional[float] = 1.0  # gate: largest allowed main-metric drop in points (null: no gate)
    # gate: largest allowed loss of agreement with the baseline on the Fidelity split, in points, overall and for
    # the worst script (rec); null: not gated
    max_fidelity_drop: Optional[float] = None
    max_script_fidelity_drop: Optional[float] = None
    e2e: bool = True  # end-to-end det+rec OCR A/B on the det eval pages
    e2e_limit: Optional[int] = None  # pages for the end-to-end A/B (null: all det eval pages)
    rss: bool = True  # measure peak RSS in a fresh process per exported model

    def validate(self, where):
        for key, low in (("threads", 1), ("warmup", 0), ("repeats", 1), ("batch", 1), ("eval_limit", 1),
                         ("e2e_limit", 1), ("pause_ms", 0), ("settle_calls", 0)):
            value = getattr(self, key)
            if value is not None and value < low:
                raise ConfigError(f"{where}.{key}: must be >= {low}, got {value}")
        for backend in self.backends:
            get_backend(backend, f"{where}.backends")
        validate_fidelity_limits(self, where)
        if self.max_metric_drop is not None and self.max_metric_drop < 0:
            raise ConfigError(f"{where}.max_metric_drop: must be >= 0 points (or null for no gate), "
                              f"got {self.max_metric_drop}")



# --------------------------------------------------------------------------------------------- the stage

@register_stage
class CompareStage(Stage):
    """A/B of every compressed variant of every model against the baseline: metric, fidelity, size, latency,
    throughput, memory; once per run."""

    name = "compare"
    section = "Compare"
    config_cls = CompareConfig
    scope = "run"
    allowed_after = ("export", "quant", "finetune", "prune", "eval", "baseline")
    summary = "A/B report of compressed vs baseline models (metric, size, latency, memory), quality gate"

    def run_all(self, cfgs, ctx):
        """Measure every model, choose and write what is delivered, report. The gate fails for a model whose
        compressed variants all miss its limits (its baseline is delivered); a failing variant beside a passing one
        is only not chosen. Without measured variants, the model's last stage row is gated."""
        first = cfgs[ctx.models[0]]
        notes, rows, failing, messages, variants_by_model, choices, missed = [], [], [], [], {}, [], []
        for name in ctx.models:
            cfg = cfgs[name]
            settings = MeasureSettings.from_config(cfg, ctx.global_cfg.threads, ctx.global_cfg.show_progress)
            model_rows, variants = self._model_rows(name, ctx, cfg, settings, notes)
            model_rows = finish_rows(model_rows)
            keys, message = gate_summary(model_rows, cfg)  # each model's own limits (per_model)
            choice = choose(name, model_rows, cfg)
            if choice is None or (choice.tried and not choice.compressed_passed):
                missed.append(name)
                failing += keys
                messages += [message] if message else []
            if choice is not None:
                choices.append(choice)
            rows += model_rows
            variants_by_model[name] = (ctx.model_cfgs[name], variants)
        notes += [f"back-off {describe(attempt)}" for attempt in load_attempts(ctx.run_dir)]
        settings = MeasureSettings.from_config(first, ctx.global_cfg.threads, ctx.global_cfg.show_progress)
        if first.e2e:
            rows += e2e_for(variants_by_model, first, settings, notes, print)
        rows = finish_rows(rows)
        for choice in choices:
            variant = next(v for v in variants_by_model[choice.model][1]
                           if v.name == choice.chosen["variant"] and v.backend == choice.chosen["backend"])
            write_delivered(choice, variant, rows, ctx.out_dir, self._card_extras(choice.model, cfgs, ctx, settings))
        delivered = summary_line(choices, rows) if choices else ""
        atomic_write_json(os.path.join(ctx.out_dir, ROWS_FILE), {"rows": rows})
        gate = {"limits": {name: gate_limits(cfgs[name]) for name in ctx.models}, "passed": not failing,
                "failing": failing, "message": " | ".join(messages), "delivered": delivered}
        write_reports(rows, [ctx.out_dir, ctx.run_dir], self._info(settings), "PP-OCR compression A/B report",
                      self._images(ctx), gate=gate, notes=notes + ([delivered] if delivered else []))
        print(summary_text(rows), flush=True)
        if delivered:
            print(delivered, flush=True)
        # what was delivered first: the run's summary line shows the first metrics
        metrics = {f"{c.model}/delivered": f"{c.chosen['stage']}/{c.chosen['variant']}@{c.chosen['backend']}"
                   for c in choices}
        metrics.update(self._metrics(rows, ctx))
        message = " | ".join(messages)
        return StageResult(model=None, metrics=metrics, passed=not failing,
                           message=message + (f"; {delivered}" if message and delivered else ""),
                           metadata={"rows": len(rows), "delivered": delivered, "failing_models": missed},
                           publish={DELIVERED: DELIVERED} if choices else {})

    def _card_extras(self, name, cfgs, ctx, settings):
        """Model-card fields besides the rows: gates, threads, eval resolution, the stage chain and its rollbacks."""
        cfg = cfgs[name]
        chain = []
        for stage in ctx.manifest.data.get("pipeline", []):
            entry = ctx.manifest.entry(stage, name)
            if entry is not None and entry.get("status") == "done":
                chain.append({"stage": stage, "dir": entry["dir"],
                              "rollback": f"python tools/run.py -c {ctx.config_file or '<pipeline config>'} "
                                          f"--rollback-to {stage}"})
        return {"gates": {"Compare.max_metric_drop": cfg.max_metric_drop,
                          "Compare.max_fidelity_drop": cfg.max_fidelity_drop,
                          "Compare.max_script_fidelity_drop": cfg.max_script_fidelity_drop},
                "threads": settings.threads, "eval_samples": len(ctx.tasks[name].samples("eval", cfg.eval_limit)),
                "chain": chain}

    def _model_rows(self, name, ctx, cfg, settings, notes):
        """Manifest rows of one model, plus its exported models measured now; and those variants."""
        task = ctx.tasks[name]
        rows = manifest_rows(ctx.manifest, name, task.main_metric)
        export_dir = ctx.manifest.checkpoint_dir("export", name)
        if export_dir is None:
            notes.append(f"{name}: no export checkpoint in this run; rows come from the manifest only")
            return rows, []
        variants = discover_variants(export_dir, cfg.backends, task=task.task,
                                     baseline_names=baseline_folders(ctx.manifest, name, export_dir))
        variants = drop_unavailable(variants, settings.threads, notes)
        rows += measure_variants(name, variants, task, settings, ctx.model_cfgs[name].Input.max_batch_size,
                                 model_facts_from_manifest(ctx.manifest, name),
                                 reference=baseline_reference(ctx.manifest, name, ctx.model_cfgs[name]))
        return rows, variants

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

    def _metrics(self, rows, ctx):
        """Per model: the worst gated row's metric and drop, and every measured variant's p50."""
        metrics = {"rows": len(rows)}
        for name in ctx.models:
            gated = [r for r in rows if r["model"] == name and r["gated"] and r.get("metric") is not None]
            if gated:
                worst = min(gated, key=lambda r: r.get("metric_diff") or 0.0)
                metrics[f"{name}/{ctx.tasks[name].main_metric}"] = worst["metric"]
                metrics[f"{name}/worst_variant"] = f"{worst.get('variant')}@{worst.get('backend')}"
                metrics[f"{name}/max_drop_pt"] = round(-(worst.get("metric_diff_pt") or 0.0), 3)
        for r in rows:
            if r["source"] == "measured" and r.get("latency_ms_p50") is not None:
                metrics[f"latency_ms_p50[{r['model']}/{r['variant']}@{r['backend']}]"] = round(r["latency_ms_p50"], 3)
        return metrics
