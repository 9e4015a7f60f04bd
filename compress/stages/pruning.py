"""Stages ``sensitivity`` (per-layer pruning sensitivity) and ``prune`` (structured filter pruning).

The work is done by ``compress.pruning`` on top of PaddleSlim's dependency analysis; these classes connect it
to the runner: which data is used to measure the metric, where progress is saved, what is recorded so that
``restore`` can rebuild a pruned model from the kept channel indices alone.
"""
import copy
import json
import os
import time
from dataclasses import dataclass
from typing import ClassVar, List, Literal, Optional

from compress.checkpoint import atomic_write_json, atomic_write_text
from compress.config import IN_POINTS
from compress.errors import CheckpointError, ConfigError
from compress.measure import count_flops, count_params
from compress.fidelity import summary as fidelity_summary
from compress.stages.base import Stage, StageResult, register_stage
from compress.stages.evaluation import measure_model
from compress.tasks import dygraph_predictor
from finetune.fast_ops import fast_cpu_ops

DEFAULT_SKIP = ("head.*",)


def _check_criterion(name, where):
    from compress.pruning.criteria import criterion_names
    if name not in criterion_names():
        raise ConfigError(f"{where}.criterion: {name!r} is not allowed; use one of: {', '.join(criterion_names())}")


def _check_round_to(value, where):
    if value < 1:
        raise ConfigError(f"{where}.round_to: must be >= 1, got {value}")


@dataclass(frozen=True)
class SensitivityConfig:
    """``Sensitivity`` section."""

    criterion: str = "l1_norm"
    ratios: List[float] = (0.2, 0.4, 0.6)  # each layer is pruned alone at each ratio
    skip: List[str] = DEFAULT_SKIP  # fnmatch globs of conv weights / layers left out (the first conv always is)
    split: Literal["calibration", "eval"] = "calibration"  # labelled data the metric loss is measured on
    limit: Optional[int] = 8  # samples of that split per evaluation
    # metric: the task's main metric on the split's labels; output: 1 - the relative L2 distance of the model's
    # outputs (det probability map, rec character probabilities) to the unpruned model's on the split's images,
    # labels unused: a continuous loss that tells apart layers the metric of a few samples cannot
    measure: Literal["metric", "output"] = "metric"
    round_to: int = 8
    top_k: int = 5  # most sensitive layers labelled in the plot
    compensate: bool = True  # bias compensation of the removed channels' means, as the prune stage applies it
    stats_limit: Optional[int] = 16  # Calibration samples the activation statistics are measured on
    # re-solve each pruned conv's consumers by least squares from the unpruned input Gram matrices (measured on
    # the stats_limit samples), so the losses are those left after reconstruction, as the prune stage does it
    reconstruct: bool = False
    reconstruct_damp: float = 0.01

    def validate(self, where):
        _check_criterion(self.criterion, where)
        _check_round_to(self.round_to, where)
        _check_stats_limit(self.stats_limit, where)
        _check_damp(self.reconstruct_damp, where)
        if not self.ratios or any(not 0.0 < r < 1.0 for r in self.ratios):
            raise ConfigError(f"{where}.ratios: each ratio must be in (0, 1), got {list(self.ratios)}")


def _check_stats_limit(value, where):
    if value is not None and value < 1:
        raise ConfigError(f"{where}.stats_limit: must be >= 1 or null (the whole Calibration split), got {value}")


def _check_damp(value, where):
    if not value >= 0.0:
        raise ConfigError(f"{where}.reconstruct_damp: must be >= 0 (relative ridge damping), got {value}")


def activation_stats(model, cfg, ctx):
    """Activation statistics of ``model`` on the Calibration split when the criterion, compensation or the
    sensitivity analysis's reconstruction needs them (input Gram matrices only for ``obs`` and the latter)."""
    from compress.pruning.compensation import measure_activation_stats
    from compress.pruning.criteria import needs_grams, needs_stats
    grams = needs_grams(cfg.criterion) or (isinstance(cfg, SensitivityConfig) and cfg.reconstruct)
    if not (cfg.compensate or needs_stats(cfg.criterion) or grams):
        return None
    return measure_activation_stats(model, ctx.task.input_batches("calibration", limit=cfg.stats_limit),
                                    grams=grams)


def output_fidelity_fn(model, batches):
    """``fidelity(candidate) -> 1 - mean relative L2 distance`` of a candidate's outputs to ``model``'s on
    ``batches`` (per sample ``||y - y_ref|| / ||y_ref||``); the reference outputs are computed here, once."""
    import numpy as np

    def outputs(candidate):
        predict = dygraph_predictor(candidate)
        with fast_cpu_ops(candidate):
            return [predict(batch).reshape(len(batch), -1) for batch in batches]

    reference = outputs(model)
    norms = [np.linalg.norm(ref, axis=1) + 1e-12 for ref in reference]

    def fidelity(candidate):
        errors = [np.linalg.norm(out - ref, axis=1) / norm
                  for out, ref, norm in zip(outputs(candidate), reference, norms)]
        return float(1.0 - np.concatenate(errors).mean())

    return fidelity


def _trace(model, ctx):
    from compress.pruning.trace import trace_model
    return trace_model(model, [ctx.task.example_input()])


@register_stage
class SensitivityStage(Stage):
    """Prunes each prunable conv alone at each ratio of the grid and measures the metric; resumable."""

    name = "sensitivity"
    section = "Sensitivity"
    config_cls = SensitivityConfig
    allowed_after = ("baseline", "eval", "finetune")
    summary = "metric loss of each conv pruned alone, per ratio"

    def _layers(self, model, cfg, trace):
        from compress.pruning.selection import prunable_layers
        return prunable_layers(model, tuple(cfg.skip), trace=trace, round_to=cfg.round_to)

    def run(self, model, cfg, ctx):
        from compress.pruning.sensitivity import analyze_sensitivity, plot_sensitivity, rank_layers
        trace = _trace(model, ctx)
        layers = self._layers(model, cfg, trace)
        task = ctx.task
        main = task.main_metric

        if cfg.measure == "output":
            main = "output_fidelity"
            eval_fn = output_fidelity_fn(model, list(task.input_batches(cfg.split, limit=cfg.limit)))
        else:
            def eval_fn(candidate):
                with fast_cpu_ops(candidate):  # the same values to float rounding, faster on CPU
                    return task.evaluate(dygraph_predictor(candidate), split=cfg.split, limit=cfg.limit,
                                         desc="sensitivity eval")[main]

        os.makedirs(ctx.work_dir, exist_ok=True)
        task.show_progress, shown = False, task.show_progress  # one bar for the whole analysis, not per eval
        try:
            sens = analyze_sensitivity(model, None, layers, cfg.ratios, cfg.criterion, eval_fn,
                                       os.path.join(ctx.work_dir, "sensitivity_state.json"), show_progress=shown,
                                       trace=trace, round_to=cfg.round_to, stats=activation_stats(model, cfg, ctx),
                                       compensate=cfg.compensate,
                                       reconstruct_damp=cfg.reconstruct_damp if cfg.reconstruct else None,
                                       settings_tag={"split": cfg.split, "limit": cfg.limit, "metric": main,
                                                     "stats_limit": cfg.stats_limit})
        finally:
            task.show_progress = shown
        baseline = next(iter(sens.values()))[0.0] if sens else None
        ranked = rank_layers(sens, baseline)
        save_sensitivity(sens, os.path.join(ctx.out_dir, "sensitivity.json"))
        plot_sensitivity(sens, os.path.join(ctx.out_dir, "sensitivity.png"), top_k=cfg.top_k, baseline=baseline)
        atomic_write_text(os.path.join(ctx.out_dir, "sensitivity.md"), ranked_table(sens, ranked, baseline, main))
        top = ranked[:cfg.top_k]
        return StageResult(model=model,
                           metrics={f"{main}_unpruned": baseline, "layers": len(layers),
                                    "evaluations": len(layers) * len(cfg.ratios)},
                           metadata={"most_sensitive": top},
                           message=f"most sensitive: {', '.join(_short(n) for n in top[:3])}")

    def dry_run(self, model, cfg, ctx):
        layers = self._layers(model, cfg, _trace(model, ctx))
        return (f"  {len(layers)} prunable convs x {len(cfg.ratios)} ratios = {len(layers) * len(cfg.ratios)} "
                f"evaluations on {cfg.limit or 'all'} {cfg.split} samples with criterion {cfg.criterion}"
                f"{', consumers reconstructed' if cfg.reconstruct else ''}")


def _short(name):
    return name.replace(".reparam_conv", "").rsplit(".weight", 1)[0]


def save_sensitivity(sens, path):
    atomic_write_json(path, {layer: {f"{r:g}": m for r, m in sorted(curve.items())} for layer, curve in sens.items()})


def load_sensitivity(path):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return {layer: {float(r): m for r, m in curve.items()} for layer, curve in data.items()}


def ranked_table(sens, ranked, baseline, metric):
    ratios = sorted({r for curve in sens.values() for r in curve if r > 0})
    lines = [f"# Pruning sensitivity ({metric} loss in points, unpruned {metric} = {baseline:.4f})", "",
             "| rank | layer | " + " | ".join(f"{r:g}" for r in ratios) + " |",
             "|---|---|" + "---|" * len(ratios)]
    for rank, layer in enumerate(ranked, 1):
        cells = " | ".join(f"{(baseline - sens[layer][r]) * 100:+.1f}" for r in ratios)
        lines.append(f"| {rank} | `{_short(layer)}` | {cells} |")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PruneConfig:
    """``Prune`` section."""

    criterion: str = "l1_norm"  # l1_norm | bn_scale | fpgm | activation | obs
    mode: Literal["flops_target", "latency_target", "loss_budget", "uniform"] = "flops_target"
    flops_target: float = 0.4  # flops_target: fraction of FLOPs to remove, ratios chosen from the sensitivity
    # latency_target: fraction of the latency measured on latency_backend (per layer, compress.pruning.latency)
    # to remove, ratios chosen from the sensitivity by loss per millisecond saved
    latency_target: float = 0.2
    latency_backend: str = "openvino"
    latency_precision: Literal["fp32", "int8"] = "int8"  # int8: the NNCF model the quant stage would make
    latency_repeats: int = 20
    # loss_budget: per layer, the largest ratio whose main-metric loss stays within this many points
    max_metric_drop: float = 1.0
    ratio: float = 0.3  # uniform: the same ratio for every prunable conv
    skip: List[str] = DEFAULT_SKIP
    round_to: int = 8  # kept channel counts are multiples of this (INT8 kernels like 8)
    compensate: bool = True  # fold the removed channels' mean contribution into the next layers' biases
    stats_limit: Optional[int] = 16  # Calibration samples the activation statistics are measured on
    # after slicing, re-solve the layers that lost inputs by ridge least squares to the unpruned model's outputs
    # on Calibration samples (compress.pruning.reconstruction); their weights are saved with the checkpoint
    reconstruct: bool = False
    reconstruct_limit: Optional[int] = 64  # images (det: pages, rec: text lines); null: all
    # a folder of unlabelled images to reconstruct on (paths relative to the project root); null: the Calibration
    # split
    reconstruct_images: Optional[str] = None
    reconstruct_damp: float = 0.01  # ridge damping relative to the mean diagonal of X^T X
    reconstruct_layers: Literal["pruned_inputs", "all"] = "pruned_inputs"  # all: every dense layer downstream
    reconstruct_rows: int = 4096  # output positions sampled per batch and layer
    stats_correction: bool = False  # match each re-solved layer's output mean / std to the unpruned model's
    # then train the neck and head (backbone frozen) for this many epochs over the reconstruction images to the
    # unpruned model's outputs (compress.pruning.refit); 0: off
    refit_epochs: int = 0
    refit_lr: float = 3e-4

    RENAMED_KEYS: ClassVar[dict] = {"max_loss": ("max_metric_drop", IN_POINTS)}

    def validate(self, where):
        _check_criterion(self.criterion, where)
        _check_round_to(self.round_to, where)
        _check_stats_limit(self.stats_limit, where)
        _check_damp(self.reconstruct_damp, where)
        if self.reconstruct_limit is not None and self.reconstruct_limit < 1:
            raise ConfigError(f"{where}.reconstruct_limit: must be >= 1 or null (the whole Calibration split), "
                              f"got {self.reconstruct_limit}")
        if self.reconstruct_rows < 1:
            raise ConfigError(f"{where}.reconstruct_rows: must be >= 1, got {self.reconstruct_rows}")
        if self.refit_epochs < 0:
            raise ConfigError(f"{where}.refit_epochs: must be >= 0 (0: no refit), got {self.refit_epochs}")
        if not self.refit_lr > 0.0:
            raise ConfigError(f"{where}.refit_lr: must be > 0, got {self.refit_lr}")
        if not 0.0 < self.flops_target < 1.0:
            raise ConfigError(f"{where}.flops_target: must be in (0, 1), got {self.flops_target}")
        if not 0.0 < self.latency_target < 1.0:
            raise ConfigError(f"{where}.latency_target: must be in (0, 1), got {self.latency_target}")
        if self.mode == "latency_target":
            from compress.pruning.latency import LATENCY_BACKENDS
            if self.latency_backend not in LATENCY_BACKENDS:
                raise ConfigError(f"{where}.latency_backend: {self.latency_backend!r} has no per-layer profiling "
                                  f"here; use {', '.join(LATENCY_BACKENDS)}")
        if self.latency_repeats < 1:
            raise ConfigError(f"{where}.latency_repeats: must be >= 1, got {self.latency_repeats}")
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"{where}.ratio: must be in [0, 1), got {self.ratio}")

    def pipeline_requires(self):
        return () if self.mode == "uniform" else ("sensitivity",)

    def inert_keys(self):
        """Keys this config's ``mode`` does not read (a back-off step that sets only those changes nothing)."""
        latency = {"latency_target", "latency_backend", "latency_precision", "latency_repeats"}
        used = {"uniform": {"ratio"}, "flops_target": {"flops_target"}, "latency_target": latency,
                "loss_budget": {"max_metric_drop"}}[self.mode]
        return ({"ratio", "flops_target", "max_metric_drop"} | latency) - used


def _reconstruction_batches(cfg, ctx):
    """The images reconstruction and refit fit on: ``reconstruct_images`` or the Calibration split."""
    if cfg.reconstruct_images:
        return list(ctx.task.image_batches(cfg.reconstruct_images, limit=cfg.reconstruct_limit))
    return list(ctx.task.input_batches("calibration", limit=cfg.reconstruct_limit))


@register_stage
class PruneStage(Stage):
    """Removes whole conv filters; records the kept channel indices so ``restore`` needs no data or search."""

    name = "prune"
    section = "Prune"
    config_cls = PruneConfig
    allowed_after = ("baseline", "sensitivity", "eval", "finetune")
    summary = "structured filter pruning"

    @staticmethod
    def latency_table(model, cfg, ctx):
        """The per-layer latency of ``model`` on ``Prune.latency_backend`` (:mod:`compress.pruning.latency`),
        measured once per weights and settings in the run's ``work/latency/<model>/``."""
        from compress.pruning.latency import cached_latency_table
        calibration = None
        if cfg.latency_precision == "int8":
            name = ctx.model_cfg.Input.name
            calibration = [{name: batch} for batch in ctx.task.input_batches("calibration", limit=cfg.stats_limit)]
        return cached_latency_table(os.path.join(ctx.run_dir, "work", "latency", ctx.model_name), model,
                                    ctx.model_cfg, write=not ctx.dry_run, backend=cfg.latency_backend,
                                    precision=cfg.latency_precision,
                                    threads=ctx.global_cfg.threads, repeats=cfg.latency_repeats,
                                    calibration=calibration)

    def plan(self, model, cfg, ctx, stats=None, trace=None, latency_table=None):
        """The pruning plan for ``model`` (nothing is changed)."""
        from compress.pruning.criteria import bind_criterion
        from compress.pruning.plan import make_plan
        from compress.pruning.selection import prunable_layers
        from compress.pruning.sensitivity import ratios_for_flops_target, ratios_from_loss_budget
        trace = trace or _trace(model, ctx)
        criterion = bind_criterion(cfg.criterion, stats if stats is not None else activation_stats(model, cfg, ctx))
        if cfg.mode == "uniform":
            layers = prunable_layers(model, tuple(cfg.skip), trace=trace, round_to=cfg.round_to)
            return make_plan(model, None, {layer: cfg.ratio for layer in layers}, criterion,
                             round_to=cfg.round_to, trace=trace)
        sens_path = os.path.join(ctx.stage_dir("sensitivity"), "sensitivity.json")
        sens = load_sensitivity(sens_path)
        skipped = _skipped(sens, cfg.skip)
        sens = {k: v for k, v in sens.items() if k not in skipped}
        if not sens:
            raise ConfigError(f"Prune.skip: every analysed layer is skipped ({', '.join(cfg.skip)}); loosen it")
        if cfg.mode == "flops_target":
            _, plan, _ = ratios_for_flops_target(sens, None, cfg.flops_target, None, model, trace,
                                                 criterion=criterion, round_to=cfg.round_to)
            return plan
        if cfg.mode == "latency_target":
            from compress.pruning.latency import ratios_for_latency_target
            table = latency_table if latency_table is not None else self.latency_table(model, cfg, ctx)
            _, plan, _ = ratios_for_latency_target(sens, cfg.latency_target, table, model, trace,
                                                   criterion=criterion, round_to=cfg.round_to)
            return plan
        ratios = {k: v for k, v in ratios_from_loss_budget(sens, None, cfg.max_metric_drop / 100.0).items() if v > 0}
        return make_plan(model, None, ratios, criterion, round_to=cfg.round_to, trace=trace)

    def run(self, model, cfg, ctx):
        from compress.pruning.compensation import add_deltas, plan_compensation
        from compress.pruning.plan import apply_plan, format_plan
        started = time.time()
        trace, stats = _trace(model, ctx), activation_stats(model, cfg, ctx)
        table = self.latency_table(model, cfg, ctx) if cfg.mode == "latency_target" else None
        plan = self.plan(model, cfg, ctx, stats=stats, trace=trace, latency_table=table)
        if not plan.tensors:  # e.g. mode uniform with ratio 0: the model stays as it is, weights not saved again
            atomic_write_text(os.path.join(ctx.out_dir, "plan.json"), plan.to_json())
            return StageResult(model=model, metadata={"plan": json.loads(plan.to_json())},
                               metrics={"flops_reduction": 0.0, "params_reduction": 0.0},
                               message="nothing pruned: the plan removes no channel")
        compensation = plan_compensation(model, plan, stats, trace) if cfg.compensate else None
        plan_seconds = time.time() - started
        corrects = cfg.reconstruct or cfg.stats_correction
        teacher = copy.deepcopy(model) if corrects or cfg.refit_epochs else None
        if compensation is not None:
            add_deltas(model, compensation.deltas)
        apply_plan(model, plan)
        batches = _reconstruction_batches(cfg, ctx) if teacher is not None else None
        reconstruction = self._reconstruct(model, teacher, plan, batches, cfg, ctx, trace) if corrects else None
        refit = None
        if cfg.refit_epochs:
            from compress.pruning.refit import refit_after_backbone
            refit = refit_after_backbone(model, teacher, ctx.task.task, batches, cfg.refit_epochs, cfg.refit_lr,
                                         seed=ctx.global_cfg.seed, show_progress=ctx.task.show_progress)
        del teacher, batches
        model.eval()
        atomic_write_text(os.path.join(ctx.out_dir, "plan.json"), plan.to_json())
        atomic_write_text(os.path.join(ctx.out_dir, "plan.txt"), format_plan(plan) + "\n")
        metrics = measure_model(ctx, model, f"pruned {ctx.model_name}")
        shape = [1] + list(ctx.model_cfg.Input.example_shape)
        metrics.update(params=count_params(model), flops=count_flops(model, shape),
                       plan_flops_before=plan.flops_before, plan_flops_after=plan.flops_after,
                       flops_reduction=round(plan.flops_reduction, 4),
                       params_reduction=round(plan.params_reduction, 4), plan_seconds=round(plan_seconds, 1))
        pruned = sum(1 for d in plan.decisions if d.status == "pruned")
        metadata = {"plan": json.loads(plan.to_json())}
        if table is not None:
            from compress.pruning.latency import latency_reduction
            metadata["latency_table"] = table.to_json()
            metrics["latency_reduction_estimated"] = round(latency_reduction(table, plan), 4)
        if compensation is not None:
            metadata["compensation"] = {"layers": compensation.layers, "skipped": compensation.skipped,
                                        "calibration_samples": stats.samples}
        latency = (f"{table.backend} {table.precision} latency -{metrics['latency_reduction_estimated']:.0%} "
                   f"(estimated from its per-layer times), " if table is not None else "")
        message = (f"FLOPs -{plan.flops_reduction:.0%}, params -{plan.params_reduction:.0%}, {latency}"
                   f"{pruned} convs pruned ({cfg.criterion}{', bias-compensated' if compensation is not None else ''})")
        if reconstruction is not None:
            metadata["reconstruction"] = reconstruction.to_json()
            metrics["reconstruct_seconds"] = round(reconstruction.seconds, 1)
            what = "reconstructed" if cfg.reconstruct else "statistics-corrected"
            message += f", {what}: {reconstruction.summary()} in {reconstruction.seconds:.0f}s"
        if refit is not None:
            metadata["refit"] = refit.to_json()
            metrics["refit_seconds"] = refit.seconds
            message += f", {refit.summary()}"
        if "fidelity" in metrics:
            message += f"; {fidelity_summary(metrics)}"
        return StageResult(model=model, metrics=metrics, metadata=metadata, weights_changed=True, message=message)

    @staticmethod
    def _reconstruct(model, teacher, plan, batches, cfg, ctx, trace):
        from compress.pruning.reconstruction import ReconstructionConfig, reconstruct
        config = ReconstructionConfig(damp=cfg.reconstruct_damp, layers=cfg.reconstruct_layers,
                                      max_rows=cfg.reconstruct_rows, stats_correction=cfg.stats_correction,
                                      solve=cfg.reconstruct)
        return reconstruct(model, teacher, plan, batches, config, trace=trace, show_progress=ctx.task.show_progress)

    def restore(self, model, cfg, metadata):
        from compress.pruning.plan import PrunePlan, apply_plan
        if "plan" not in metadata:
            raise CheckpointError("prune checkpoint has no recorded plan; re-run the prune stage")
        apply_plan(model, PrunePlan.from_json(json.dumps(metadata["plan"])))
        return model

    def dry_run(self, model, cfg, ctx):
        from compress.pruning.plan import format_plan
        if cfg.mode != "latency_target":
            return format_plan(self.plan(model, cfg, ctx))
        from compress.pruning.latency import latency_reduction
        table = self.latency_table(model, cfg, ctx)
        plan = self.plan(model, cfg, ctx, latency_table=table)
        return (f"{format_plan(plan)}\nlatency: {table.summary()}; the plan removes an estimated "
                f"{latency_reduction(table, plan):.1%}")


def _skipped(sens, patterns):
    import fnmatch
    return {layer for layer in sens for p in patterns
            if fnmatch.fnmatchcase(layer, p) or fnmatch.fnmatchcase(layer.rsplit(".", 1)[0], p)}
