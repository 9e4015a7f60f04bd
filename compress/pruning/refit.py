"""Refitting the layers after a pruned backbone to the unpruned model's outputs, by distillation on unlabelled images.

Reconstruction (:mod:`compress.pruning.reconstruction`) re-solves each layer linearly; what it cannot restore of
the backbone's features reaches the neck and head, which were trained on the unpruned features. With the pruned
backbone frozen, its outputs on the reconstruction images are computed once; the neck and head (rec: the SVTR neck
and the CTC head, 8% of rec's FLOPs) are then trained with Adam to reproduce the unpruned model's outputs on the
same images: rec the per-frame CTC distributions (KL(teacher || student), as the fine-tune stage distils), det the
probability map (binary KL). No labels; the backbone's weights do not change; BatchNorms keep their statistics
(eval mode). Each step costs a forward and backward pass of the neck and head only.

Measured on rec pruned by 35% of its FLOPs (the reconstruction recipe of README "Measured on this project's
machine", 256 unlabelled lines, ``-o Prune.per_model.rec.refit_epochs=8``): agreement with the baseline on the
3,000 Fidelity lines 0.6972 -> 0.7490 (latin 0.557 -> 0.614, cjk 0.775 -> 0.833), demo Eval acc 0.6367 -> 0.6900,
refit 62 s on 2 cores.
"""
import dataclasses
import time

import numpy as np
import paddle
from tqdm import tqdm

from compress.errors import ConfigError
from finetune.fast_ops import fast_cpu_ops


@dataclasses.dataclass
class RefitReport:
    """What :func:`refit_after_backbone` did: mean distillation loss over the images before / after, steps, time."""

    layers: list
    epochs: int
    steps: int
    loss_before: float
    loss_after: float
    seconds: float
    samples: int

    def summary(self):
        return (f"{'+'.join(self.layers)} refitted to the unpruned outputs ({self.epochs} epochs), distillation loss "
                f"{self.loss_before:.4f} -> {self.loss_after:.4f} in {self.seconds:.0f}s")

    def to_json(self):
        return dataclasses.asdict(self)


def _tail_layers(model):
    """The trainable layers after the backbone, by PP-OCR's BaseModel attributes."""
    if not isinstance(getattr(model, "backbone", None), paddle.nn.Layer) or \
            not isinstance(getattr(model, "head", None), paddle.nn.Layer):
        raise ConfigError("Prune.refit_epochs: the model has no backbone / head layers to refit after; set "
                          "Prune.refit_epochs: 0")
    names = (["neck"] if getattr(model, "use_neck", False) else []) + ["head"]
    return names, [getattr(model, name) for name in names]


def _probability_map(out):
    """DBHead's eval output is ``{"maps": [N, 1, H, W]}``; its first channel is the probability map."""
    return out["maps"][:, :1] if isinstance(out, dict) else out


def _tail_output(model, features, task):
    """rec: the CTC head's logits (its training-mode output); det: the probability map (eval mode)."""
    x = model.neck(features) if getattr(model, "use_neck", False) else features
    if task != "rec":
        return _probability_map(model.head(x))
    head = model.head
    head.training = True  # CTCHead applies its softmax only in eval mode; it has no dropout or BatchNorm
    try:
        return head(x)
    finally:
        head.training = False


def _distance(output, target, task):
    from finetune.trainer import _map_distance, _sequence_distance
    if task == "rec":
        return _sequence_distance(output, target, "kl")
    return _map_distance(output, target, "kl")


def refit_after_backbone(model, teacher, task, batches, epochs, lr=3e-4, seed=0, show_progress=False):
    """Train ``model``'s neck and head (in place) to reproduce ``teacher``'s outputs on ``batches``.

    Args:
        model: the pruned (and reconstructed) PP-OCR model; its backbone is not changed.
        teacher: the unpruned model.
        task: "det" or "rec".
        batches: list of NCHW float arrays (unlabelled images, e.g. the reconstruction images).
        epochs: passes over the batches (shuffled each epoch).
        lr: Adam's learning rate.
        seed: seed of the batch order.

    Returns:
        A :class:`RefitReport`.
    """
    started = time.time()
    with fast_cpu_ops(model), fast_cpu_ops(teacher):  # the same values to float rounding, faster on CPU
        names, layers = _tail_layers(model)
        model.eval()
        teacher.eval()
        features, targets = [], []
        with paddle.no_grad():
            for images in tqdm(batches, desc="refit: features", disable=not show_progress, leave=False):
                tensor = paddle.to_tensor(images)
                features.append(model.backbone(tensor))
                targets.append(_probability_map(teacher(tensor)))  # rec: its eval output, the softmax

        def mean_loss():
            with paddle.no_grad():
                return float(np.mean([float(_distance(_tail_output(model, f, task), t, task))
                                      for f, t in zip(features, targets)]))

        before = mean_loss()
        params = [p for layer in layers for p in layer.parameters() if not p.stop_gradient]
        optimizer = paddle.optimizer.Adam(learning_rate=lr, parameters=params)
        rng = np.random.default_rng(seed)
        order = [int(i) for _ in range(epochs) for i in rng.permutation(len(features))]
        for index in tqdm(order, desc="refit", disable=not show_progress, leave=False):
            loss = _distance(_tail_output(model, features[index], task), targets[index], task)
            loss.backward()
            optimizer.step()
            optimizer.clear_grad()
        after = mean_loss()
    return RefitReport(layers=names, epochs=epochs, steps=len(order), loss_before=round(before, 6),
                       loss_after=round(after, 6), seconds=round(time.time() - started, 1),
                       samples=sum(len(b) for b in batches))
