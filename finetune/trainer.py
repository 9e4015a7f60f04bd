"""A small, resumable trainer for short low-learning-rate recovery training of PP-OCR models.

Used by the ``finetune`` stage (recovery after pruning) and reusable by quantization-aware training. It trains a
dygraph model with PP-OCR's own loss (``ppocr.losses.build_loss``: DBLoss for det, CTCLoss for rec), Adam with a
linear warm-up into a cosine decay, optional distillation from a frozen teacher, periodic evaluation with early
stopping on the main metric, and keeps the best weights.

Progress is saved every ``save_every`` steps into ``work_dir`` (model, optimizer, schedule, step, epoch, best
weights) through a temporary directory and an atomically replaced pointer file, so a killed run continues from its
last save. Randomness is a function of (seed, epoch, step): the shuffle order and augmentation come from
:mod:`finetune.data`, dropout is re-seeded every step, so a resumed run repeats the uninterrupted one.
"""
import contextlib
import json
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

import numpy as np
import paddle
from tqdm import tqdm

from compress.checkpoint import atomic_write_json, sha256_file
from compress.errors import CheckpointError, CompressError, ConfigError
from compress.models import batch_norm_layers
from finetune.data import item_seed, start_epoch

logger = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
PROGRESS_FORMAT = 1
_OPTIMIZER_NAMES = "ft_"  # unique-name namespace of optimizer accumulators (makes their names predictable)
_LOSS_WINDOW = 20  # steps averaged into the reported train_loss


class TrainingError(CompressError):
    """Training diverged (NaN / inf loss) or cannot continue; the message names the step and what to change."""


# ------------------------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam / AdamW settings (PaddleOCR's PP-OCRv4 configs: Adam, beta1 0.9, beta2 0.999, L2 decay)."""

    name: Literal["Adam", "AdamW"] = "Adam"
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: Optional[float] = None  # L2 coefficient (AdamW: decoupled decay); null: no decay
    clip_norm: Optional[float] = None  # clip gradients to this global norm; null: no clipping

    def validate(self, where):
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{where}.{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError(f"{where}.weight_decay: must be >= 0, got {self.weight_decay}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ConfigError(f"{where}.clip_norm: must be > 0 or null, got {self.clip_norm}")


@dataclass(frozen=True)
class DistillConfig:
    """Distillation from the frozen baseline (teacher): det on the probability maps, rec on the per-frame CTC
    distributions, optionally plus feature mimicking of the backbone / neck outputs (which pruning keeps)."""

    enabled: bool = False
    kind: Literal["kl", "l2"] = "kl"  # det: binary KL (BCE up to a constant) / MSE; rec: KL / squared error per frame
    weight: float = 1.0  # weight of the output term
    temperature: float = 1.0  # rec: softens both distributions (KL scaled by T^2); det: unused
    features: List[Literal["backbone", "neck"]] = ()  # outputs mimicked (MSE, per-channel normalised by the teacher)
    feature_weight: float = 1.0  # weight of the feature term (features listed)
    runtime: Literal["inference", "dygraph"] = "inference"  # teacher run by Paddle Inference (oneDNN) or dygraph

    def validate(self, where):
        for key in ("weight", "feature_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key}: must be >= 0, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ConfigError(f"{where}.temperature: must be > 0, got {self.temperature}")
        if len(set(self.features)) != len(self.features):
            raise ConfigError(f"{where}.features: lists a layer twice: {list(self.features)}")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of :class:`Trainer` (the ``Finetune`` section extends it)."""

    epochs: int = 5
    max_steps: Optional[int] = None  # when set, train exactly this many steps (epochs is ignored)
    lr: float = 1e-4  # about 1/10 of PP-OCRv4's training LR (0.001 for det and rec)
    warmup_steps: int = 20  # linear warm-up from 0, then cosine decay to 0 at the last step
    optimizer: OptimizerConfig = OptimizerConfig()
    eval_every: Optional[int] = None  # steps between evaluations; null: once per epoch
    eval_limit: Optional[int] = None  # evaluate on the first N samples of the Eval split; null: all of it
    eval_at_start: bool = True  # evaluate the input model first: it is the best model until beaten
    patience: Optional[int] = 3  # stop after this many evaluations without improvement; null: never
    save_every: Optional[int] = None  # steps between progress saves; null: at every evaluation
    distill: DistillConfig = DistillConfig()
    label_loss_weight: float = 1.0  # weight of PP-OCR's loss on the labels; 0: learn from the teacher alone
    fast_cpu_ops: bool = True  # faster formulations of conv biases / affine blocks (finetune.fast_ops)
    # train: BatchNorm layers normalise by each batch and update their running statistics (PP-OCR's training);
    # frozen: they keep normalising by the running statistics of the input model, only their scale / shift train
    batch_norm: Literal["train", "frozen"] = "train"

    def validate(self, where):
        if self.epochs < 1:
            raise ConfigError(f"{where}.epochs: must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"{where}.lr: must be > 0, got {self.lr}")
        for key in ("max_steps", "eval_every", "eval_limit", "patience", "save_every"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{where}.{key}: must be >= 1 or null, got {value}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{where}.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.label_loss_weight < 0:
            raise ConfigError(f"{where}.label_loss_weight: must be >= 0, got {self.label_loss_weight}")
        if self.label_loss_weight == 0 and not self.distill.enabled:
            raise ConfigError(f"{where}.label_loss_weight: 0 leaves nothing to learn from; set "
                              f"{where}.distill.enabled: true or a label_loss_weight > 0")


@dataclass(frozen=True)
class UnlabeledConfig:
    """Images without labels for distillation: a folder of images, or a label file whose labels are ignored."""

    data_dir: Optional[str] = None  # the folder (every image in it) or the root of label_file's image paths
    label_file: Optional[str] = None  # PaddleOCR label file: only the image path column is read
    ratio: float = 1.0  # mix: unlabeled images per Train image in each batch
    mode: Literal["mix", "only"] = "mix"  # only: batches of unlabeled images alone (the Train split is not read)
    transforms: Optional[List[Any]] = None  # null: the Train transforms without their label operators
    limit: Optional[int] = None
    # `holdout` images spread evenly over the list (sorted by name; after `limit`) are kept out of training: with
    # select_split: unlabeled the best step is chosen by agreement with the baseline on them
    holdout: int = 0

    @property
    def enabled(self):
        return self.data_dir is not None or self.label_file is not None

    def validate(self, where):
        if self.ratio <= 0:
            raise ConfigError(f"{where}.ratio: must be > 0, got {self.ratio}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"{where}.limit: must be >= 1 or null, got {self.limit}")
        if self.holdout < 0:
            raise ConfigError(f"{where}.holdout: must be >= 0, got {self.holdout}")
        if self.mode == "only" and not self.enabled:
            raise ConfigError(f"{where}.mode: only needs {where}.data_dir or {where}.label_file")


@dataclass(frozen=True)
class TaskTrainConfig(TrainConfig):
    """The :class:`TrainConfig` keys plus the data and loss of a training run on the model
    config's ``Train`` split (shared by ``Finetune`` and ``Quant.qat``)."""

    batch_size: Optional[int] = None  # per process; null: the Train split's batch_size
    num_workers: int = 0  # DataLoader worker processes
    loss: Dict[str, Any] = field(default_factory=dict)  # ppocr loss keys; default DBLoss (det) / CTCLoss (rec)
    unlabeled: UnlabeledConfig = UnlabeledConfig()
    # the split the best step is chosen on (its first eval_limit samples): never the Eval split the stage reports,
    # unless asked for; select_by fidelity: agreement with the teacher's (the baseline's) outputs on it;
    # unlabeled: the images held out of `unlabeled` (unlabeled.holdout), by agreement with the teacher only
    select_split: Literal["calibration", "eval", "unlabeled"] = "calibration"
    select_by: Literal["metric", "fidelity"] = "metric"

    def validate(self, where):
        super().validate(where)
        if self.unlabeled.mode == "only" and self.unlabeled.enabled and self.label_loss_weight > 0:
            raise ConfigError(f"{where}.unlabeled.mode: only trains without labels; set {where}.label_loss_weight: 0")
        if self.select_split == "unlabeled":
            if not self.unlabeled.enabled or self.unlabeled.holdout < 1:
                raise ConfigError(f"{where}.select_split: unlabeled chooses the best step on images held out of "
                                  f"{where}.unlabeled; set {where}.unlabeled.data_dir and {where}.unlabeled.holdout "
                                  f"(e.g. 256)")
            if self.select_by != "fidelity":
                raise ConfigError(f"{where}.select_split: unlabeled images have no labels; set {where}.select_by: "
                                  f"fidelity (agreement with the baseline)")
        elif self.unlabeled.holdout and self.unlabeled.enabled:
            raise ConfigError(f"{where}.unlabeled.holdout: {self.unlabeled.holdout} images would be kept out of "
                              f"training for nothing; set {where}.select_split: unlabeled, or holdout: 0")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size: must be >= 1 or null, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError(f"{where}.num_workers: must be >= 0, got {self.num_workers}")


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns; the model passed to the trainer holds the best weights afterwards.

    Attributes:
        best_metrics: evaluation metrics of the best weights (empty without an evaluator).
        best_step: the step the best weights were taken at (0: the input model).
        start_metrics: metrics of the input model (when ``eval_at_start``).
        steps: steps trained in total (including steps before a resume).
        total_steps: the planned number of steps.
        train_loss: mean training loss over the last steps.
        first_loss: loss of the first step.
        seconds_per_step: mean wall time of a training step (forward, loss, backward, update; data loading
            excluded).
        stopped_early: early stopping ended the run.
        resumed_from: the step the run continued from (0: fresh start).
        history: one entry per evaluation: {"step": ..., metrics...}.
    """

    best_metrics: Dict[str, float] = field(default_factory=dict)
    best_step: int = 0
    start_metrics: Dict[str, float] = field(default_factory=dict)
    steps: int = 0
    total_steps: int = 0
    train_loss: float = float("nan")
    first_loss: float = float("nan")
    seconds_per_step: float = float("nan")
    stopped_early: bool = False
    resumed_from: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ helpers


def build_task_loss(task, overrides=None, where="Finetune.loss"):
    """PP-OCR's training loss for a task, with ``overrides`` merged into the PP-OCRv4 defaults.

    Args:
        task: "det" (DBLoss) or "rec" (CTCLoss).
        overrides: keys of the loss section; a different ``name`` replaces the default loss entirely.
        where: the config key path named in errors.

    Returns:
        The ``ppocr.losses`` layer: ``loss(predicts, batch) -> {"loss": tensor, ...}``.

    Raises:
        ConfigError: when ppocr cannot build it.
    """
    from compress.ppocr_compat import ensure_ppocr
    ensure_ppocr()
    from ppocr.losses import build_loss

    defaults = {
        "det": {"name": "DBLoss", "balance_loss": True, "main_loss_type": "DiceLoss", "alpha": 5, "beta": 10,
                "ohem_ratio": 3},
        "rec": {"name": "CTCLoss"},
    }[task]
    overrides = dict(overrides or {})
    section = overrides if overrides.get("name", defaults["name"]) != defaults["name"] else {**defaults, **overrides}
    _check_loss_keys(section, where)
    try:
        return build_loss(dict(section))
    except Exception as exc:  # ppocr reports unknown names with assert, bad arguments with TypeError
        raise ConfigError(f"{where}: ppocr could not build {section!r} ({type(exc).__name__}: {exc}); "
                          f"check the loss name and arguments against PaddleOCR's configs") from None


def _check_loss_keys(section, where):
    """ppocr losses swallow unknown keyword arguments (``**kwargs``): refuse keys their constructor does not name."""
    import inspect

    import ppocr.losses
    from compress.config import unknown_key_error

    loss_cls = getattr(ppocr.losses, str(section.get("name")), None)
    if not inspect.isclass(loss_cls):
        return  # build_loss reports unknown names
    params = inspect.signature(loss_cls.__init__).parameters
    named = {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    for key in section:
        if key != "name" and key not in named:
            raise unknown_key_error(key, sorted(named | {"name"}), where)


class TaskEvaluator:
    """``evaluator(model) -> metrics`` on a split of a task (optionally its first ``limit`` samples).

    Args:
        task: the ``compress.tasks.Task``.
        limit: first samples of the split; None: the split's own limit.
        desc: progress bar label.
        split: "calibration" or "eval" (never "train"), or "unlabeled" with ``samples``.
        reference: a teacher model: the metrics then also hold ``fidelity``, the agreement of the model's decoded
            outputs with the teacher's on the same samples (:mod:`compress.fidelity`; the teacher's are computed
            once), and it becomes the main metric: selection needs no labels.
        samples: preprocessed unlabelled samples (``Task.preprocess_images``) to measure agreement on instead of a
            labelled split's; needs ``reference``; no labelled metric is computed.
        min_score: rec: ``fidelity`` counts the lines the teacher reads with at least this confidence (as
            ``Fidelity.min_score``); ``fidelity_all`` every line.
        fast_ops: the teacher's outputs computed under :func:`finetune.fast_ops.fast_cpu_ops` (the trainer runs
            the student's evaluations under it when ``TrainConfig.fast_cpu_ops``).
    """

    def __init__(self, task, limit=None, desc="finetune eval", split="eval", reference=None, samples=None,
                 min_score=None, fast_ops=False):
        if samples is not None and reference is None:
            raise ValueError("unlabelled samples are measured against a reference model; none given")
        self.task = task
        self.limit = limit
        self.desc = desc
        self.split = split
        self.main_metric = task.main_metric if reference is None else "fidelity"
        self.min_score = min_score
        self.fast_ops = fast_ops
        self._reference = reference
        self._reference_outputs = None
        self._confident = None
        self._samples = samples
        self._batches = None

    def _fidelity_batches(self):
        """The selection images as fidelity batches, stacked once."""
        if self._batches is None:
            if self._samples is not None:
                self._batches = self.task.stack_batches(self._samples)
            else:  # the split's own batches
                self._batches = [stacked for chunk in self.task.batches(self.split, limit=self.limit)
                                 for stacked in self.task.stack_batches(chunk, len(chunk))]
        return self._batches

    def __call__(self, model):
        from compress.fidelity import decode_outputs, det_agreement, rec_agreement
        from compress.tasks import dygraph_predictor

        metrics = {}
        if self._samples is None:
            metrics = self.task.evaluate(dygraph_predictor(model), split=self.split, limit=self.limit, desc=self.desc)
        if self._reference is not None:
            batches = self._fidelity_batches()
            if self._reference_outputs is None:
                from finetune.fast_ops import fast_cpu_ops

                scores = []
                with fast_cpu_ops(self._reference) if self.fast_ops else contextlib.nullcontext():
                    self._reference_outputs = decode_outputs(self.task, dygraph_predictor(self._reference), batches,
                                                             show_progress=False, scores=scores)
                if self.task.task == "rec" and self.min_score is not None:
                    confident = [score >= self.min_score for score in scores]
                    self._confident = confident if any(confident) else None  # none confident: count every line
            outputs = decode_outputs(self.task, dygraph_predictor(model), batches, desc=self.desc,
                                     show_progress=self.task.show_progress and self._samples is not None)
            if self.task.task == "rec":
                metrics.update(rec_agreement(self._reference_outputs, outputs, self._confident))
            else:
                metrics.update(det_agreement(self._reference_outputs, outputs))
        return metrics


class TeacherDistillation:
    """Distillation loss from a frozen teacher, usable without labels.

    Output term, det: the student's shrink map (channel 0 of DBHead's training output) against the teacher's
    probability map, as a per-pixel binary KL divergence (BCE minus the teacher's entropy) or a mean squared error.
    rec: per frame, the student's CTC distribution (softmax of the logits) against the teacher's, as KL(teacher ||
    student) summed over classes, or the squared error summed over classes; averaged over frames. With a temperature
    T both distributions are softened (teacher p^(1/T), renormalised; student softmax(logits / T)) and the KL is
    scaled by T^2 (Hinton et al.), so its gradients keep their size.

    Feature term (``features``: ``backbone`` and/or ``neck``, the outputs of the model's backbone / neck, which
    filter pruning keeps at their channel counts): the squared difference divided by the teacher's per-channel
    variance over the batch (channels: axis 1 of NCHW maps, the last axis of sequences), averaged, so layers of
    different scale weigh alike (MiR-style mimicking of the unpruned teacher).

    The teacher runs in inference mode, either as dygraph under ``no_grad`` or (``runtime="inference"``, faster on
    CPU) as a Paddle Inference predictor built from a ``paddle.jit.save`` of it (oneDNN; outputs equal to dygraph to
    about 1e-5).

    Args:
        teacher: the frozen model (e.g. the baseline); put in eval mode and excluded from gradients.
        task: "det" or "rec".
        config: a :class:`DistillConfig` (``enabled`` is not read).
        threads: CPU threads of the inference predictor.
        fast_log_softmax: rec's KL through :func:`finetune.fast_ops.log_softmax` (False: Paddle's kernel, the
            slow path of ``benchmarks/bench_train_step.py``).
    """

    def __init__(self, teacher, task, config=None, threads=1, fast_log_softmax=True):
        if task not in ("det", "rec"):
            raise ConfigError(f"distill: no distillation for task '{task}'; use det or rec")
        config = config or DistillConfig()
        self.teacher = teacher
        self.task = task
        self.config = config
        self.kind, self.weight, self.temperature = config.kind, config.weight, config.temperature
        self.features = tuple(config.features)
        self.threads = threads
        self.fast_log_softmax = fast_log_softmax
        self.last_terms = {}
        self._student_features = {}
        self._hooks = []
        self._predictor = None
        self._graph = _TeacherGraph(teacher, self.features)
        teacher.eval()
        for param in teacher.parameters():
            param.stop_gradient = True

    def attach(self, student):
        """Capture the student's feature outputs (forward hooks on its ``backbone`` / ``neck``)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for name in self.features:
            layer = getattr(student, name, None)
            if not isinstance(layer, paddle.nn.Layer):
                raise ConfigError(f"distill.features: the student has no '{name}' layer; use "
                                  f"{' / '.join(n for n in ('backbone', 'neck') if hasattr(student, n)) or 'none'}")

            def keep(layer_, inputs, output, name=name):
                self._student_features[name] = output
            self._hooks.append(layer.register_forward_post_hook(keep))

    def teacher_outputs(self, images):
        """The teacher's [output, *features] for a batch (tensors without gradients)."""
        if self.config.runtime == "dygraph":
            with paddle.no_grad():
                return [t.detach() for t in self._graph(images)]
        if self._predictor is None:
            self._predictor = self._build_predictor(images)
        arrays = self._predictor.run({self._predictor.input_names[0]: images.numpy()})
        return [paddle.to_tensor(a) for a in arrays]

    def _build_predictor(self, images):
        import tempfile

        from export.predictor import DeployConfig, create_predictor

        shape = list(images.shape)
        # rec lines keep their height; widths (and det sizes) vary
        spec_shape = [None, shape[1], shape[2] if self.task == "rec" else None, None]
        spec = paddle.static.InputSpec(spec_shape, "float32", "x")
        with tempfile.TemporaryDirectory(prefix="teacher-") as folder:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                paddle.jit.save(self._graph, os.path.join(folder, "teacher"), input_spec=[spec])
            predictor = create_predictor(folder, DeployConfig(threads=self.threads))
        return predictor

    def __call__(self, student_out, images):
        targets = self.teacher_outputs(images)
        if self.task == "det":
            out_term = _map_distance(student_out["maps"][:, :1], targets[0], self.kind)
        else:
            out_term = _sequence_distance(student_out, targets[0], self.kind, temperature=self.temperature,
                                          fast_log_softmax=self.fast_log_softmax)
        loss = self.weight * out_term
        self.last_terms = {"distill": out_term}
        if self.features:
            teacher_feats = targets[1:]
            student_feats = [t for name in self.features for t in _flat(self._student_features.pop(name, None))]
            if len(student_feats) != len(teacher_feats):
                raise TrainingError("distill.features: the student's feature outputs were not captured; call "
                                    "TeacherDistillation.attach(student) before training")
            terms = []
            for index, (s_feat, t_feat) in enumerate(zip(student_feats, teacher_feats)):
                if list(s_feat.shape) != list(t_feat.shape):
                    raise ConfigError(f"distill.features: output {index} of {list(self.features)} has shape "
                                      f"{list(s_feat.shape)} in the student but {list(t_feat.shape)} in the teacher; "
                                      f"mimic a layer whose channels pruning keeps (e.g. neck)")
                terms.append(_feature_distance(s_feat, t_feat))
            feature_term = paddle.add_n(terms) / len(terms)
            self.last_terms["features"] = feature_term
            loss = loss + self.config.feature_weight * feature_term
        return loss


class _TeacherGraph(paddle.nn.Layer):
    """A PP-OCR model's inference output followed by its backbone / neck outputs (flattened), as one list."""

    def __init__(self, model, features):
        super().__init__()
        self.model = model
        self.features = tuple(features)

    def forward(self, x):
        model = self.model
        if not self.features:
            out = model(x)
            return [out["maps"] if isinstance(out, dict) else out]
        feats = []
        if model.use_transform:
            x = model.transform(x)
        x = model.backbone(x)
        if "backbone" in self.features:
            feats += _flat(x)
        if model.use_neck:
            x = model.neck(x)
        if "neck" in self.features:
            feats += _flat(x)
        out = model.head(x)
        return [out["maps"] if isinstance(out, dict) else out] + feats


def _flat(value):
    if value is None:
        return []
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat(v)]
    return [value]


def _feature_distance(student, teacher, eps=1e-6):
    axis = 1 if teacher.ndim == 4 else teacher.ndim - 1
    reduce_axes = [a for a in range(teacher.ndim) if a != axis]
    variance = paddle.var(teacher, axis=reduce_axes, keepdim=True, unbiased=False)
    return paddle.mean(paddle.square(student - teacher) / (variance + eps))


def _map_distance(student_prob, teacher_prob, kind, eps=1e-6):
    if kind == "l2":
        return paddle.mean(paddle.square(student_prob - teacher_prob))
    s = paddle.clip(student_prob, eps, 1 - eps)
    t = paddle.clip(teacher_prob, eps, 1 - eps)
    return paddle.mean(t * paddle.log(t / s) + (1 - t) * paddle.log((1 - t) / (1 - s)))


def _sequence_distance(student_logits, teacher_prob, kind, eps=1e-8, temperature=1.0, fast_log_softmax=True):
    """Per-frame distance of the student's CTC distribution to the teacher's, averaged over (batch, frames).
    ``fast_log_softmax``: :func:`finetune.fast_ops.log_softmax` instead of Paddle's (the same values, far faster on
    CPU)."""
    if isinstance(student_logits, (list, tuple)):
        student_logits = student_logits[-1]
    if temperature != 1.0:
        # softmax(teacher_logits / T) from the teacher's probabilities: p^(1/T), renormalised
        teacher_prob = paddle.nn.functional.softmax(paddle.log(teacher_prob + eps) / temperature, axis=-1)
        student_logits = student_logits / temperature
    if kind == "l2":
        diff = paddle.nn.functional.softmax(student_logits, axis=-1) - teacher_prob
        return paddle.mean(paddle.sum(paddle.square(diff), axis=-1))
    if fast_log_softmax:
        from finetune.fast_ops import log_softmax
        log_student = log_softmax(student_logits, axis=-1)
    else:
        log_student = paddle.nn.functional.log_softmax(student_logits, axis=-1)
    kl = teacher_prob * (paddle.log(teacher_prob + eps) - log_student)
    return paddle.mean(paddle.sum(kl, axis=-1)) * (temperature * temperature)


def build_optimizer(model, config, total_steps):
    """Adam/AdamW with a linear warm-up into a cosine decay over ``total_steps``.

    Returns:
        (optimizer, scheduler); call ``scheduler.step()`` after every optimizer step.
    """
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(config.lr, T_max=max(total_steps - warmup, 1))
    if warmup:
        schedule = paddle.optimizer.lr.LinearWarmup(schedule, warmup_steps=warmup, start_lr=0.0, end_lr=config.lr)
    opt = config.optimizer
    clip = paddle.nn.ClipGradByGlobalNorm(opt.clip_norm) if opt.clip_norm else None
    params = [p for p in model.parameters() if not p.stop_gradient]
    if opt.name == "AdamW":
        optimizer = paddle.optimizer.AdamW(schedule, beta1=opt.beta1, beta2=opt.beta2, parameters=params,
                                           weight_decay=opt.weight_decay or 0.0, grad_clip=clip)
    else:
        decay = paddle.regularizer.L2Decay(opt.weight_decay) if opt.weight_decay else None
        optimizer = paddle.optimizer.Adam(schedule, beta1=opt.beta1, beta2=opt.beta2, parameters=params,
                                          weight_decay=decay, grad_clip=clip)
    return optimizer, schedule


def freeze_batch_norm(model):
    """Put every BatchNorm layer of a training model into inference mode: it normalises by its running statistics
    and leaves them as they are, while its scale and shift still receive gradients (a frozen BatchNorm, as
    detection fine-tuning does with small batches). Returns the number of layers frozen."""
    layers = batch_norm_layers(model)
    for _, layer in layers:
        layer.eval()
    return len(layers)


def copy_weights(model):
    """A numpy copy of ``model.state_dict()`` (parameters and BN statistics), for ``set_state_dict`` later."""
    return {name: value.numpy().copy() for name, value in model.state_dict().items()}


def init_distributed():
    """Initialise the data-parallel environment when launched with several processes; returns the world size."""
    world_size = paddle.distributed.get_world_size()
    if world_size > 1 and not paddle.distributed.is_initialized():
        paddle.distributed.init_parallel_env()
    return world_size


def _is_main_process():
    return paddle.distributed.get_rank() == 0


def _first(predicts, count):
    """The first ``count`` samples of a model output (tensor, or dict / list of tensors)."""
    if isinstance(predicts, dict):
        return {k: _first(v, count) for k, v in predicts.items()}
    if isinstance(predicts, (list, tuple)):
        return type(predicts)(_first(v, count) for v in predicts)
    return predicts[:count] if isinstance(predicts, paddle.Tensor) and predicts.ndim > 0 else predicts


# ------------------------------------------------------------------------------------------------ trainer


class Trainer:
    """Trains ``model`` in place and leaves the best weights in it.

    Args:
        model: the dygraph model (PP-OCR det/rec: training mode gives the loss inputs).
        loss_fn: ``loss_fn(predicts, batch) -> {"loss": tensor, ...}`` (see :func:`build_task_loss`).
        loader: a DataLoader yielding ``[images, labels...]`` (see :func:`finetune.data.make_train_loader`).
        config: a :class:`TrainConfig` (or a dataclass extending it).
        evaluator: ``evaluator(model) -> metrics`` with a ``main_metric`` attribute (higher is better), e.g.
            :class:`TaskEvaluator`; None trains without evaluation and keeps the last weights.
        work_dir: folder for progress saves; None disables saving and resuming.
        distill: ``distill(student_out, images) -> loss tensor`` (e.g. :class:`TeacherDistillation`) or None.
        seed: seed of dropout (the loader holds the data seed).
    """

    def __init__(self, model, loss_fn, loader, config, evaluator=None, work_dir=None, distill=None, seed=0):
        self.model = model
        self.loss_fn = loss_fn
        self.loader = loader
        self.config = config
        self.evaluator = evaluator
        self.work_dir = work_dir
        self.distill = distill
        self.seed = seed
        self.unlabeled = None  # a finetune.data.UnlabeledStream: images appended to every batch (distillation only)
        self.show_progress = True
        self.section = "Finetune"  # the config section named in error messages
        self.steps_per_epoch = len(loader)
        if self.steps_per_epoch < 1:
            raise TrainingError("the training split gives no batches; add samples to the Train label file")
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.eval_every = config.eval_every or self.steps_per_epoch
        self.save_every = config.save_every or self.eval_every
        self.net = paddle.DataParallel(model) if init_distributed() > 1 else model
        if distill is not None and hasattr(distill, "attach"):
            distill.attach(model)
        self.optimizer, self.scheduler = build_optimizer(model, config, self.total_steps)
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_metric": None, "best_step": 0,
                      "best_metrics": {}, "start_metrics": {}, "evals_since_best": 0, "history": [],
                      "losses": [], "first_loss": None, "train_seconds": 0.0, "stopped_early": False}
        self.best_weights = None

    # -------------------------------------------------------------------------------------------- main loop

    def fit(self):
        """Train until ``total_steps``, or until early stopping; resume from ``work_dir`` when a save exists.

        Returns:
            :class:`TrainResult`.

        Raises:
            TrainingError: on a NaN or infinite loss (nothing is saved for that step).
        """
        resumed_from = self._resume()
        state = self.state
        from finetune.fast_ops import fast_cpu_ops
        # evaluations too: the same values to float rounding, 3.4x faster on the pruned rec (batch 16, 2 threads)
        with fast_cpu_ops(self.model) if getattr(self.config, "fast_cpu_ops", False) else contextlib.nullcontext():
            if state["step"] == 0 and not state["history"] and self.evaluator and self.config.eval_at_start:
                self._evaluate()
            bar = tqdm(total=self.total_steps, initial=state["step"], desc=self.section.lower(), leave=False,
                       disable=not (self.show_progress and _is_main_process()))
            try:
                while state["step"] < self.total_steps and not state["stopped_early"]:
                    self._run_epoch(bar)
            finally:
                bar.close()
            if self.evaluator and (not state["history"] or state["history"][-1]["step"] != state["step"]):
                self._evaluate()
        if self.best_weights is not None:
            self.model.set_state_dict(self.best_weights)
        self.model.eval()
        return self._result(resumed_from)

    def _run_epoch(self, bar):
        state = self.state
        exact = start_epoch(self.loader, state["epoch"], state["batch_in_epoch"])
        batches = iter(self.loader)
        if not exact:  # a plain loader: skip the batches trained before the save
            for _ in range(state["batch_in_epoch"]):
                next(batches, None)
        for batch in batches:
            loss, lr = self._train_step(batch)
            state["step"] += 1
            state["batch_in_epoch"] += 1
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if state["step"] % self.eval_every == 0 and self.evaluator:
                self._evaluate()
            if state["step"] % self.save_every == 0 or state["step"] >= self.total_steps or state["stopped_early"]:
                self.save()
            if state["step"] >= self.total_steps or state["stopped_early"]:
                return
        state["epoch"] += 1
        state["batch_in_epoch"] = 0

    def _train_step(self, batch):
        state = self.state
        started = time.time()
        paddle.seed(item_seed(self.seed, "dropout", state["step"], paddle.distributed.get_rank()))
        self.net.train()
        if self.config.batch_norm == "frozen":
            freeze_batch_norm(self.model)
        images = batch[0]
        labelled = images.shape[0]
        if self.unlabeled is not None:
            images = paddle.concat([images, paddle.to_tensor(self.unlabeled.images(state["step"]))])
        predicts = self.net(images)
        loss = None
        label_weight = getattr(self.config, "label_loss_weight", 1.0)
        if label_weight > 0:
            own = self.loss_fn(predicts if self.unlabeled is None else _first(predicts, labelled), batch)["loss"]
            loss = own if label_weight == 1.0 else label_weight * own
        if self.distill is not None:
            term = self.distill(predicts, images)
            loss = term if loss is None else loss + term
        value = self._mean_over_ranks(loss)
        if not math.isfinite(value):
            raise TrainingError(f"{self.section} step {state['step'] + 1}: the loss is {value} (lr "
                                f"{self.optimizer.get_lr():.2e}); lower {self.section}.lr or set "
                                f"{self.section}.optimizer.clip_norm; the stage's checkpoint was not written")
        loss.backward()
        lr = self.optimizer.get_lr()
        with paddle.utils.unique_name.guard(_OPTIMIZER_NAMES):
            self.optimizer.step()
        self.optimizer.clear_grad()
        self.scheduler.step()
        if state["first_loss"] is None:
            state["first_loss"] = value
        state["losses"] = (state["losses"] + [value])[-_LOSS_WINDOW:]
        state["train_seconds"] += time.time() - started
        return value, lr

    def _mean_over_ranks(self, loss):
        """The loss averaged over data-parallel ranks, so that every rank sees a NaN on any rank and stops."""
        if self.net is self.model:
            return float(loss)
        total = loss.detach().clone()
        paddle.distributed.all_reduce(total)
        return float(total) / paddle.distributed.get_world_size()

    def _evaluate(self):
        state = self.state
        metrics = self._distributed_evaluate() if self.net is not self.model else self.evaluator(self.model)
        self.model.train()
        main = self.evaluator.main_metric
        if main not in metrics:
            raise TrainingError(f"the evaluator returned no '{main}' (got {', '.join(metrics)})")
        state["history"].append({"step": state["step"], **metrics})
        if state["step"] == 0:
            state["start_metrics"] = dict(metrics)
        if state["best_metric"] is None or metrics[main] > state["best_metric"]:
            state.update(best_metric=metrics[main], best_step=state["step"], best_metrics=dict(metrics),
                         evals_since_best=0)
            self.best_weights = copy_weights(self.model)
        elif state["step"] > 0:
            state["evals_since_best"] += 1
            if self.config.patience and state["evals_since_best"] >= self.config.patience and \
                    state["step"] < self.total_steps:
                state["stopped_early"] = True

    def _distributed_evaluate(self):
        """Average the BN statistics over ranks (DataParallel syncs gradients only), evaluate on rank 0 and share
        the metrics, so every rank keeps the same best weights and stops at the same step."""
        world_size = paddle.distributed.get_world_size()
        with paddle.no_grad():
            for _, param in self.model.named_parameters():
                if param.stop_gradient and paddle.is_floating_point(param):  # BN running mean / variance
                    paddle.distributed.all_reduce(param)
                    param.set_value(param / world_size)
        shared = [self.evaluator(self.model) if _is_main_process() else None]
        paddle.distributed.broadcast_object_list(shared, src=0)
        return shared[0]

    def _result(self, resumed_from):
        state = self.state
        trained = state["step"] - resumed_from
        losses = state["losses"]
        return TrainResult(
            best_metrics=dict(state["best_metrics"]), best_step=state["best_step"],
            start_metrics=dict(state["start_metrics"]), steps=state["step"], total_steps=self.total_steps,
            train_loss=float(np.mean(losses)) if losses else float("nan"),
            first_loss=state["first_loss"] if state["first_loss"] is not None else float("nan"),
            seconds_per_step=state["train_seconds"] / state["step"] if state["step"] else float("nan"),
            stopped_early=state["stopped_early"], resumed_from=resumed_from, history=list(state["history"]))

    # -------------------------------------------------------------------------------------------- progress saves

    def save(self):
        """Write the progress into ``work_dir`` (rank 0 only): a new ``step-N`` folder, then the pointer file."""
        if not self.work_dir or not _is_main_process():
            return
        step = self.state["step"]
        name = f"step-{step:07d}"
        final = os.path.join(self.work_dir, name)
        tmp = f"{final}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        paddle.save(self.model.state_dict(), os.path.join(tmp, "model.pdparams"))
        paddle.save(self._optimizer_state(), os.path.join(tmp, "optimizer.pdopt"))
        if self.best_weights is not None:
            paddle.save(self.best_weights, os.path.join(tmp, "best.pdparams"))
        state = dict(self.state, scheduler=self.scheduler.state_dict(), total_steps=self.total_steps,
                     parameters=self._parameter_signature())
        atomic_write_json(os.path.join(tmp, "state.json"), state)
        files = {f: sha256_file(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_json(os.path.join(self.work_dir, PROGRESS_FILE),
                          {"format": PROGRESS_FORMAT, "dir": name, "step": step, "files": files})
        # earlier saves are scratch superseded by this one
        for entry in os.listdir(self.work_dir):
            if entry.startswith("step-") and entry != name:
                shutil.rmtree(os.path.join(self.work_dir, entry), ignore_errors=True)

    def _resume(self):
        pointer_path = os.path.join(self.work_dir or "", PROGRESS_FILE)
        if not self.work_dir or not os.path.isfile(pointer_path):
            return 0
        with open(pointer_path, encoding="utf-8") as f:
            pointer = json.load(f)
        folder = os.path.join(self.work_dir, pointer["dir"])
        for name, digest in pointer["files"].items():
            path = os.path.join(folder, name)
            if not os.path.isfile(path) or sha256_file(path) != digest:
                raise CheckpointError(f"{self.section} progress {path} is missing or corrupt; delete {self.work_dir} "
                                      f"to start the training over")
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            saved = json.load(f)
        if saved.pop("parameters") != self._parameter_signature() or saved.pop("total_steps") != self.total_steps:
            raise CheckpointError(f"{self.section} progress in {self.work_dir} belongs to another model or schedule; "
                                  f"delete that folder to start the training over")
        with warnings.catch_warnings():  # LinearWarmup's nested state always triggers Paddle's "unused values"
            warnings.filterwarnings("ignore", message="There are some unused values in state_dict")
            self.scheduler.set_state_dict(saved.pop("scheduler"))
            self.model.set_state_dict(paddle.load(os.path.join(folder, "model.pdparams")))
            self._load_optimizer_state(paddle.load(os.path.join(folder, "optimizer.pdopt")))
        best_path = os.path.join(folder, "best.pdparams")
        self.best_weights = paddle.load(best_path, return_numpy=True) if os.path.isfile(best_path) else None
        self.state.update(saved)
        logger.info("%s resumed at step %d/%d from %s", self.section, self.state["step"], self.total_steps, folder)
        return self.state["step"]

    def _parameter_signature(self):
        return [[name, list(p.shape)] for name, p in self.model.named_parameters()]

    def _optimizer_state(self):
        """Optimizer accumulators keyed by structured parameter names (runtime names differ between processes)."""
        by_runtime = {_OPTIMIZER_NAMES + p.name + "_": name for name, p in self.model.named_parameters()}
        prefixes = sorted(by_runtime, key=len, reverse=True)
        out = {}
        for key, value in self.optimizer.state_dict().items():
            if key == "LR_Scheduler":
                continue
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is None:
                raise TrainingError(f"optimizer state {key!r} matches no parameter; cannot save progress")
            out[f"{by_runtime[prefix]}|{key[len(prefix):]}"] = value
        return out

    def _load_optimizer_state(self, saved):
        runtime = {name: p.name for name, p in self.model.named_parameters()}
        state = {}
        for key, value in saved.items():
            name, _, accumulator = key.partition("|")
            state[_OPTIMIZER_NAMES + runtime[name] + "_" + accumulator] = value
        state["LR_Scheduler"] = self.scheduler.state_dict()
        self.optimizer.set_state_dict(state)
