"""Stages ``baseline`` (load the trained model, evaluate, record its size) and ``eval`` (re-evaluate the head), and
the fidelity measurement every stage shares: agreement with the baseline's own outputs on the Fidelity split
(:mod:`compress.fidelity`), against the reference the baseline stage stores in its checkpoint."""
import contextlib
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

from compress.fidelity import REFERENCE_FILE, agreement_of, baseline_reference, compute_reference, measure_fidelity
from compress.measure import count_flops, count_params
from compress.stages.base import Stage, StageResult, register_stage


def model_facts(model, ctx):
    """Params and FLOPs of a dygraph model at the config's example input shape."""
    shape = [1] + list(ctx.model_cfg.Input.example_shape)
    return {"params": count_params(model), "flops": count_flops(model, shape)}


def fidelity_reference(ctx):
    """The baseline's :class:`~compress.fidelity.FidelityReference` for this model; None without a Fidelity split.

    Raises:
        CheckpointError: the baseline checkpoint holds no reference (re-run it).
    """
    return baseline_reference(ctx.manifest, ctx.model_name, ctx.model_cfg)


def fidelity_metrics(ctx, predict, desc=None, whole_split=False):
    """Agreement of ``predict`` with the baseline on the Fidelity split, on its ``stage_limit`` images spread over
    it, or all of them with ``whole_split`` (empty dict without a Fidelity split). ``predict`` may be a dygraph
    model: it is then run as a Paddle Inference predictor (:func:`inference_predict`)."""
    reference = fidelity_reference(ctx)
    if reference is None:
        return {}
    with inference_predict(predict, ctx) as run:
        return measure_fidelity(ctx.task, run, reference, desc=desc or f"fidelity {ctx.model_name}",
                                limit=None if whole_split else ctx.model_cfg.Fidelity.stage_limit)


def measure_model(ctx, model, desc, limit=None, split="eval"):
    """The labelled metrics of a dygraph model on ``split`` plus its fidelity to the baseline, both through one
    Paddle Inference export of it (:func:`inference_predict`)."""
    with inference_predict(model, ctx) as run:
        metrics = ctx.task.evaluate(run, split=split, limit=limit, desc=desc)
        metrics.update(fidelity_metrics(ctx, run))
    return metrics


@contextlib.contextmanager
def inference_predict(model, ctx):
    """``predict(images) -> output`` for a dygraph model through Paddle Inference (oneDNN, the deploy config's
    passes), which runs PP-OCRv4 rec about 6x faster than dygraph on CPU; anything that is not a ``paddle.nn.Layer``
    (already a predict callable) is passed through. The temporary export is removed afterwards.

    A copy of the model is exported: ``paddle.jit.save`` leaves its layers converted, and PaddleSlim's dependency
    trace of the same model object afterwards finds far fewer prunable convs (PP-OCRv4 rec: 6 instead of 20).
    """
    import copy

    import paddle

    if not isinstance(model, paddle.nn.Layer):
        yield model
        return
    from export.backends import REFERENCE_BACKEND
    from export.deploy import DeploySettings, build_deploy_config
    from export.exporter import export_inference_model
    from export.predictor import create_predictor

    model_cfg = ctx.model_cfg
    with tempfile.TemporaryDirectory(prefix="fidelity-") as folder:
        export_inference_model(copy.deepcopy(model), folder, model_cfg.Input, model_cfg.task)
        deploy = build_deploy_config(model_cfg.task, model_cfg.Input, REFERENCE_BACKEND, "fp32",
                                     DeploySettings(threads=ctx.global_cfg.threads))
        predictor = create_predictor(folder, deploy)
        name = predictor.input_names[0]
        yield lambda images: predictor.run({name: images})[0]


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
        with inference_predict(model, ctx) as run:
            metrics = ctx.task.evaluate(run, limit=cfg.eval_limit, desc=f"baseline {ctx.model_name}")
            reference = compute_reference(ctx.task, run)
        metrics.update(model_facts(model, ctx))
        message = ""
        if reference is not None:
            reference.save(os.path.join(ctx.out_dir, REFERENCE_FILE))
            metrics.update(agreement_of(reference, reference.outputs, min_score=ctx.model_cfg.Fidelity.min_score))
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
        metrics = measure_model(ctx, model, f"eval {ctx.model_name}", limit=cfg.limit, split=cfg.split)
        metrics.update(model_facts(model, ctx))
        return StageResult(model=model, metrics=metrics)
