"""Refitting neck and head after a pruned backbone (compress/pruning/refit.py) on tiny PP-OCR-shaped nets."""
import compress  # noqa: F401  (imports zlib before paddle)

import copy

import numpy as np
import paddle
import pytest

from compress.errors import ConfigError
from compress.pruning.refit import refit_after_backbone


class _RecHead(paddle.nn.Layer):
    """CTCHead's contract: logits in training mode, their softmax in eval mode."""

    def __init__(self, channels, classes):
        super().__init__()
        self.fc = paddle.nn.Linear(channels, classes)

    def forward(self, x):
        logits = self.fc(x.squeeze(2).transpose([0, 2, 1]))
        return logits if self.training else paddle.nn.functional.softmax(logits, axis=-1)


class _DetHead(paddle.nn.Layer):
    def __init__(self, channels):
        super().__init__()
        self.conv = paddle.nn.Conv2D(channels, 1, 1)

    def forward(self, x):
        return {"maps": paddle.nn.functional.sigmoid(self.conv(x))}


class _Toy(paddle.nn.Layer):
    def __init__(self, task):
        super().__init__()
        self.backbone = paddle.nn.Sequential(paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.ReLU())
        self.use_neck = True
        self.neck = paddle.nn.Sequential(paddle.nn.Conv2D(8, 8, 1), paddle.nn.BatchNorm2D(8), paddle.nn.ReLU())
        self.head = _RecHead(8, 11) if task == "rec" else _DetHead(8)

    def forward(self, x):
        return self.head(self.neck(self.backbone(x)))


def _weights(layer):
    return {k: v.numpy().copy() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize("task", ["rec", "det"])
def test_refit_brings_neck_and_head_back_to_the_teacher_and_leaves_the_backbone(task):
    paddle.seed(0)
    teacher = _Toy(task)
    teacher.eval()
    student = copy.deepcopy(teacher)
    rng = np.random.default_rng(0)
    for param in student.neck.parameters():  # what pruning left of the features, as the neck sees them
        param.set_value(param.numpy() + rng.normal(0, 0.5, param.shape).astype("float32"))
    shape = (4, 3, 1, 16) if task == "rec" else (2, 3, 8, 8)
    batches = [rng.standard_normal(shape).astype("float32") for _ in range(4)]
    teacher_before, backbone_before = _weights(teacher), _weights(student.backbone)
    bn_before = student.neck[1]._mean.numpy().copy()

    report = refit_after_backbone(student, teacher, task, batches, epochs=40, lr=1e-2)

    assert report.layers == ["neck", "head"] and report.steps == 160 and report.samples == sum(len(b) for b in batches)
    assert report.loss_before > 0.01 and report.loss_after < 0.2 * report.loss_before
    for name, value in _weights(student.backbone).items():
        np.testing.assert_array_equal(value, backbone_before[name], err_msg=name)
    for name, value in _weights(teacher).items():
        np.testing.assert_array_equal(value, teacher_before[name], err_msg=name)
    np.testing.assert_array_equal(student.neck[1]._mean.numpy(), bn_before)  # statistics frozen (eval mode)
    assert not student.training and not student.head.training


def test_refit_needs_a_backbone_and_a_head():
    with pytest.raises(ConfigError, match="Prune.refit_epochs: the model has no backbone / head"):
        refit_after_backbone(paddle.nn.Linear(2, 2), paddle.nn.Linear(2, 2), "rec", [], epochs=1)
