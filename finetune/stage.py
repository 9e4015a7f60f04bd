"""Stage ``finetune``: short low-learning-rate recovery training after pruning, with an accuracy gate.

Trains the incoming model on the model config's ``Train`` split (and unlabelled images) with PP-OCR's own loss and
distillation from the baseline, evaluates on the selection split (Calibration by default, never the Eval split the
stage reports) every ``eval_every`` steps, keeps the best weights, then measures them on the whole Eval split and
the Fidelity split. Its gate fails when the main metric is more than ``max_metric_drop`` points below the baseline's or the
agreement with the baseline fell more than ``max_fidelity_drop`` points. Progress is saved under the stage's work
directory, so a killed fine-tune continues where it stopped when the pipeline is run again.
"""
from dataclasses import dataclass, replace
from typing import ClassVar, Literal, Optional

from compress.config import IN_POINTS
from compress.errors import ConfigError, InputError
from compress.fidelity import subset_indices, validate_fidelity_limits
from compress.stages.base import Stage, StageResult, register_stage
from finetune.data import (UnlabeledDataset, UnlabeledStream, dataset_loader, label_free_transforms,
                           make_train_loader, unlabeled_records)
from finetune.trainer import (DistillConfig, OptimizerConfig, TaskEvaluator, TaskTrainConfig,  # noqa: F401
                              TeacherDistillation, TrainConfig, Trainer, UnlabeledConfig, build_task_loss,
                              copy_weights)

# Weight decay of PaddleOCR's PP-OCRv4 training configs (Optimizer.regularizer: L2), used when none is set.
DEFAULT_WEIGHT_DECAY = {"det": 5e-6, "rec": 3e-5}


@dataclass(frozen=True)
class FinetuneConfig(TaskTrainConfig):
    """``Finetune`` section: the :class:`~finetune.trainer.TaskTrainConfig` keys plus the gate."""

    max_metric_drop: Optional[float] = 1.0  # gate: best metric >= baseline - this many points; null: no gate
    # gate: agreement with the baseline on the Fidelity split may drop at most this many points, overall and for
    # the worst script (rec); null: not gated
    max_fidelity_drop: Optional[float] = None
    max_script_fidelity_drop: Optional[float] = None
    on_gate_fail: Literal["stop", "continue"] = "stop"

    RENAMED_KEYS: ClassVar[dict] = {"max_drop": ("max_metric_drop", IN_POINTS)}

    def validate(self, where):
        super().validate(where)
        if self.max_metric_drop is not None and self.max_metric_drop < 0:
            raise ConfigError(f"{where}.max_metric_drop: must be >= 0 points or null, got {self.max_metric_drop}")
        validate_fidelity_limits(self, where)


def load_teacher(ctx):
    """The distillation teacher: ``ctx.extras["teacher"]`` if given, else the baseline rebuilt from its checkpoint."""
    teacher = ctx.extras.get("teacher")
    if teacher is not None:
        return teacher
    return ctx.baseline_model("teacher")


def nothing_to_recover(ctx):
    """True when a prune stage ran before this one but removed nothing, and no stage but ``baseline`` saved
    weights: the model is the baseline itself. (A pipeline without prune may fine-tune the baseline on purpose.)"""
    from compress.checkpoint import DONE, WEIGHTS_FILE

    pipeline = ctx.manifest.data.get("pipeline", [])
    saved = ctx.manifest.weight_stages(ctx.model_name, pipeline[ctx.stage_index], WEIGHTS_FILE)
    prune = ctx.manifest.entry("prune", ctx.model_name) or {}
    return saved == ["baseline"] and prune.get("status") == DONE and "prune" in pipeline[:ctx.stage_index]


def gate_message(main, best, baseline, max_drop_pt):
    """None when ``best`` is within ``max_drop_pt`` points of ``baseline``, else the one-line reason and what to
    change."""
    if max_drop_pt is None or baseline is None or 100.0 * (baseline - best) <= max_drop_pt + 1e-9:
        return None
    return (f"{main} {best:.4f} is {100.0 * (baseline - best):.2f} points below the baseline's {baseline:.4f}, more "
            f"than Finetune.max_metric_drop {max_drop_pt:g}: raise Finetune.epochs or lower Prune ratios")


def build_task_trainer(model, cfg, ctx, make_teacher, work_dir, section="Finetune"):
    """A :class:`~finetune.trainer.Trainer` for ``model`` on the model config's ``Train`` split.

    Uses the task's PP-OCR loss, PaddleOCR's weight decay when none is set, selection of the best step on
    ``cfg.select_split`` (its first ``cfg.eval_limit`` samples; by the labelled metric, or by agreement with the
    teacher when ``cfg.select_by`` is ``fidelity``; ``unlabeled``: agreement on the images held out of
    ``cfg.unlabeled``) and distillation from ``make_teacher()`` when
    ``cfg.distill.enabled``.

    Args:
        model: the dygraph model to train in place.
        cfg: a :class:`~finetune.trainer.TaskTrainConfig`.
        ctx: the stage context (task, model config, seed).
        make_teacher: zero-argument callable returning the frozen teacher (called only for distillation).
        work_dir: folder for progress saves (resume); None disables them.
        section: the config key path named in error messages (e.g. ``Quant.qat``).

    Raises:
        InputError: when the model config has no ``Train`` section.
    """
    split = ctx.model_cfg.Train
    if split is None:
        raise InputError(f"{ctx.model_cfg.source_file}: Train: section missing; {section} needs data_dir, "
                         f"label_file and transforms of a training split")
    task = ctx.task
    if cfg.select_split == "calibration" and ctx.model_cfg.Calibration is None:
        raise InputError(f"{ctx.model_cfg.source_file}: Calibration: section missing; {section}.select_split: "
                         f"calibration chooses the best step on it: add a Calibration split, or set select_split: "
                         f"eval (which tunes on the split the stage reports)")
    if cfg.optimizer.weight_decay is None:
        cfg = replace(cfg, optimizer=replace(cfg.optimizer, weight_decay=DEFAULT_WEIGHT_DECAY.get(task.task)))
    seed = ctx.global_cfg.seed
    batch_size = cfg.batch_size or split.batch_size
    unlabeled, holdout = unlabeled_dataset(cfg.unlabeled, split, ctx, seed, f"{section}.unlabeled")
    if unlabeled is not None and cfg.unlabeled.mode == "only":
        loader = dataset_loader(unlabeled, batch_size, seed=seed, num_workers=cfg.num_workers)
    else:
        loader = make_train_loader(task, split, batch_size, seed=seed, num_workers=cfg.num_workers)
    distill, teacher = None, None
    if cfg.distill.enabled or cfg.select_by == "fidelity":
        teacher = make_teacher()
    if cfg.distill.enabled:
        distill = TeacherDistillation(teacher, task.task, cfg.distill, threads=ctx.global_cfg.threads,
                                      fast_log_softmax=cfg.fast_cpu_ops)
    desc = f"{section.lower()} select {ctx.model_name}"
    if cfg.select_split == "unlabeled":
        samples = task.preprocess_images([path for path, _ in holdout], where=f"{section}.unlabeled.holdout",
                                         source=cfg.unlabeled.label_file or cfg.unlabeled.data_dir)
        fidelity = ctx.model_cfg.Fidelity
        evaluator = TaskEvaluator(task, desc=desc, split="unlabeled", reference=teacher, samples=samples,
                                  min_score=fidelity.min_score if fidelity is not None else None,
                                  fast_ops=cfg.fast_cpu_ops)
    else:
        evaluator = TaskEvaluator(task, cfg.eval_limit, desc=desc, split=cfg.select_split,
                                  reference=teacher if cfg.select_by == "fidelity" else None,
                                  fast_ops=cfg.fast_cpu_ops)
    trainer = Trainer(model, build_task_loss(task.task, cfg.loss, where=f"{section}.loss"), loader, cfg,
                      evaluator, work_dir, distill, seed=seed)
    if unlabeled is not None and cfg.unlabeled.mode == "mix":
        trainer.unlabeled = UnlabeledStream(unlabeled, max(int(round(batch_size * cfg.unlabeled.ratio)), 1), seed)
    trainer.show_progress = ctx.global_cfg.show_progress
    trainer.section = section
    return trainer


def selection_set(cfg):
    """What the best step is chosen on, for messages: ``64 calibration samples``, ``512 held-out unlabeled
    images``."""
    if cfg.select_split == "unlabeled":
        return f"{cfg.unlabeled.holdout} held-out unlabeled images"
    return f"{cfg.eval_limit or 'all'} {cfg.select_split} samples"


def unlabeled_dataset(ucfg, split, ctx, seed, where):
    """The :class:`~finetune.data.UnlabeledDataset` of an ``unlabeled`` section (None when it names no images) and
    the records held out of it (``ucfg.holdout`` of them, spread evenly over the list; empty without holdout);
    paths are relative to the model config, transforms default to the Train ones without their label operators."""
    if not ucfg.enabled:
        return None, []
    train, holdout = unlabeled_split(ucfg, ctx, where)
    transforms = ucfg.transforms if ucfg.transforms is not None else label_free_transforms(split.transforms)
    return UnlabeledDataset(ctx.task, train, transforms, seed=seed, where=where), holdout


def unlabeled_split(ucfg, ctx, where):
    """The records of an enabled ``unlabeled`` section: (trained on, held out for selection)."""
    data_dir = ctx.model_cfg.path(ucfg.data_dir) if ucfg.data_dir else None
    label_file = ctx.model_cfg.path(ucfg.label_file) if ucfg.label_file else None
    records = unlabeled_records(data_dir, label_file, ucfg.limit, where)
    held = set(subset_indices(len(records), ucfg.holdout)) if ucfg.holdout else set()
    if held and len(held) >= len(records):
        raise InputError(f"{where}.holdout: {ucfg.holdout} of {len(records)} images leaves none to train on; lower "
                         f"holdout or add images")
    return [record for i, record in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


@register_stage
class FinetuneStage(Stage):
    """Recovers accuracy lost by pruning with a short low-LR training run (optionally distilled from baseline)."""

    name = "finetune"
    section = "Finetune"
    config_cls = FinetuneConfig
    allowed_after = ("prune", "baseline", "eval")
    summary = "low-learning-rate recovery training with early stopping and an accuracy gate"

    def run(self, model, cfg, ctx):
        if nothing_to_recover(ctx):
            return StageResult(model=model, message="skipped: the prune stage removed nothing, the model is the "
                                                    "baseline")
        trainer = build_task_trainer(model, cfg, ctx, lambda: load_teacher(ctx), ctx.work_dir or None)
        input_weights = copy_weights(model)
        try:
            result = trainer.fit()
        except BaseException:
            model.set_state_dict(input_weights)  # the runner may continue with the input model in memory
            raise
        return self._stage_result(model, cfg, ctx, result, input_weights)

    def dry_run(self, model, cfg, ctx):
        """What ``run`` would do: samples, batches, steps, schedule and gate (nothing is trained)."""
        import paddle

        split = ctx.model_cfg.Train
        if split is None:
            return "no Train section: the stage would fail; add a training split to the model config"
        if cfg.unlabeled.enabled and cfg.unlabeled.mode == "only":
            samples = len(unlabeled_split(cfg.unlabeled, ctx, "Finetune.unlabeled")[0])
            what = "unlabelled training images (the Train split is not read)"
        else:
            samples = len(ctx.task.read_labels(split)[:split.limit])
            what = "training samples"
        batch = cfg.batch_size or split.batch_size
        world = paddle.distributed.get_world_size()
        per_epoch = max(-(-samples // (batch * world)), 1)
        steps = cfg.max_steps or cfg.epochs * per_epoch
        gates = ([f"{ctx.task.main_metric} >= baseline - {cfg.max_metric_drop:g} pt"] if cfg.max_metric_drop is not None else []) + (
            [f"fidelity >= 1 - {cfg.max_fidelity_drop:g} pt"] if cfg.max_fidelity_drop is not None else [])
        selected = "agreement with the baseline" if cfg.select_by == "fidelity" else ctx.task.main_metric
        return (f"  {samples} {what}, batch {batch} x {world} process(es), {per_epoch} steps/epoch, "
                f"{steps} steps; lr {cfg.lr:g} (warm-up {cfg.warmup_steps}, cosine); best step by {selected} every "
                f"{cfg.eval_every or per_epoch} steps on {selection_set(cfg)}; "
                f"gate: {', '.join(gates) or 'none'}")

    @staticmethod
    def _stage_result(model, cfg, ctx, result, input_weights):
        """Metrics of the best weights on the whole Eval split and the Fidelity split (the selection split's are
        kept as ``select_*``), and the gates."""
        from compress.fidelity import fidelity_gate, summary
        from compress.stages.evaluation import measure_model

        main = ctx.task.main_metric
        metrics = {f"select_{k}": v for k, v in result.best_metrics.items()}
        metrics.update({f"select_start_{k}": v for k, v in result.start_metrics.items()
                        if k in (main, "fidelity")})
        metrics.update(measure_model(ctx, model, f"finetuned {ctx.model_name}"))
        best = metrics.get(main)
        metrics.update(steps=result.steps, best_step=result.best_step, train_loss=round(result.train_loss, 6),
                       seconds_per_step=round(result.seconds_per_step, 4))
        message = f"best at step {result.best_step}/{result.steps} on {selection_set(cfg)}"
        if result.stopped_early:
            message += " (early stop)"
        if result.resumed_from:
            message += f", resumed at step {result.resumed_from}"
        if "fidelity" in metrics:
            message = f"{summary(metrics)}  {message}"
        failures = [gate_message(main, best, ctx.baseline_metrics().get(main), cfg.max_metric_drop) if best is not None
                    else None,
                    fidelity_gate(metrics, cfg.max_fidelity_drop, cfg.max_script_fidelity_drop,
                                  setting="Finetune.max_fidelity_drop")]
        failure = "; ".join(f for f in failures if f)
        curve = {"history": result.history}  # the selection metric at every evaluation: the recovery curve
        if failure:
            model.set_state_dict(input_weights)
            return StageResult(model=model, metrics=metrics, passed=False, message=f"{failure} ({message})",
                               metadata=curve)
        return StageResult(model=model, metrics=metrics, weights_changed=True, message=message, metadata=curve)
