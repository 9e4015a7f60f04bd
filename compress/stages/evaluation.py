"""Stages ``baseline`` (load the trained model, evaluate, record its size) and ``eval`` (re-evaluate the head), and
the fidelity measurement every stage shares: agreement with the baseline's own outputs on the Fidelity split
(:mod:`compress.fidelity`), against the reference the baseline stage stores in its checkpoint."""
import os
from dataclasses import dataclass
from typing import Optional

from compress.errors import CheckpointError
from compress.fidelity import REFERENCE_FILE, FidelityReference, agreement_of, compute_reference, measure_fidelity
from compress.measure import count_flops, count_params
from compress.stages.base import Stage, StageResult, register_stage
from compress.tasks import dygraph_predictor


def model_facts(model, ctx):
    """Params and FLOPs of a dygraph model at the config's example input shape."""
    shape = [1] + list(ctx.model_cfg.Input.example_shape)
    return {"params": count_params(model), "flops": count_flops(model, shape)}


def fidelity_reference(ctx):
    """The baseline's :class:`~compress.fidelity.FidelityReference` for this model; None without a Fidelity split.

    Raises:
        CheckpointError: the baseline checkpoint holds no reference (re-run it).
    """
    if ctx.model_cfg.Fidelity is None:
        return None
    path = os.path.join(ctx.stage_dir("baseline"), REFERENCE_FILE)
    if not os.path.exists(path):
        raise CheckpointError(f"model '{ctx.model_name}': the baseline checkpoint has no {REFERENCE_FILE}; re-run "
                              f"it with --rollback-to baseline")
    return FidelityReference.load(path)


def fidelity_metrics(ctx, predict, desc=None):
    """Agreement of ``predict`` with the baseline on the Fidelity split, on its ``stage_limit`` images spread over
    it (empty dict without a Fidelity split)."""
    reference = fidelity_reference(ctx)
    if reference is None:
        return {}
    return measure_fidelity(ctx.task, predict, reference, desc=desc or f"fidelity {ctx.model_name}",
                            limit=ctx.model_cfg.Fidelity.stage_limit)


@dataclass(frozen=True)
class BaselineConfig:
    """``Baseline`` section."""

    eval_limit: Optional[int] = None  # evaluate on the first N eval samples (null: the Eval split's own limit)


@register_stage
class BaselineStage(Stage):
    """Loads the user's trained model (shipped PP-OCRv4 weights, an inference model or a training checkpoint)."""

    name = "baseline"
    section = "Baseline"
    config_cls = BaselineConfig
    allowed_after = None
    summary = "load the trained model, evaluate it, record params / FLOPs / size"

    def run(self, model, cfg, ctx):
        from compress.models import build_model
        model_cfg = ctx.model_cfg
        model = build_model(dict(model_cfg.Architecture), _weights_dict(model_cfg.Weights), model_cfg.base_dir)
        metrics = ctx.task.evaluate(dygraph_predictor(model), limit=cfg.eval_limit,
                                    desc=f"baseline {ctx.model_name}")
        metrics.update(model_facts(model, ctx))
        message = ""
        reference = compute_reference(ctx.task, dygraph_predictor(model))
        if reference is not None:
            reference.save(os.path.join(ctx.out_dir, REFERENCE_FILE))
            metrics.update(agreement_of(reference, reference.outputs))
            message = f"fidelity reference: {len(reference.images)} {_unit(ctx.task.task)}"
        return StageResult(model=model, metrics=metrics, weights_changed=True, message=message)


def _unit(task):
    return "pages" if task == "det" else "lines"


def _weights_dict(weights):
    return {k: v for k, v in vars(weights).items() if v not in (None, False)}


@dataclass(frozen=True)
class EvalConfig:
    """``Evaluate`` section."""

    limit: Optional[int] = None
    split: str = "eval"

    def validate(self, where):
        from compress.errors import ConfigError
        if self.split not in ("eval", "calibration"):
            raise ConfigError(f"{where}.split: {self.split!r} is not allowed; use one of: eval, calibration "
                              f"(the training split is never used for evaluation)")


@register_stage
class EvalStage(Stage):
    """Re-evaluates the current model (e.g. on a larger eval subset than the one used during compression)."""

    name = "eval"
    section = "Evaluate"
    config_cls = EvalConfig
    allowed_after = ("baseline", "sensitivity", "prune", "finetune", "quant", "export")
    summary = "evaluate the current model"

    def run(self, model, cfg, ctx):
        metrics = ctx.task.evaluate(dygraph_predictor(model), split=cfg.split, limit=cfg.limit,
                                    desc=f"eval {ctx.model_name}")
        metrics.update(model_facts(model, ctx))
        metrics.update(fidelity_metrics(ctx, dygraph_predictor(model)))
        return StageResult(model=model, metrics=metrics)
