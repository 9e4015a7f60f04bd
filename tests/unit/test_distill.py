"""Label-free distillation and the fast training path, on tiny nets: unlabeled images, feature mimicking,
resume, and the fast path's equality with the slow one."""
import compress  # noqa: F401  (imports zlib before paddle)

import contextlib
import json
import os

import cv2
import numpy as np
import paddle
import pytest

from compress.errors import ConfigError, InputError
from compress.config import parse_section
from finetune.data import (UnlabeledDataset, UnlabeledStream, dataset_loader, label_free_transforms,
                           make_train_loader, start_epoch, unlabeled_records)
from finetune.fast_ops import fast_cpu_ops
from finetune.stage import FinetuneConfig
from finetune.trainer import (PROGRESS_FILE, DistillConfig, TeacherDistillation, TrainConfig, Trainer,
                              build_task_loss)
from tests.unit.test_finetune import (FailingLoss, WeightNormEvaluator, demo_dir, det_task,  # noqa: F401
                                      one_thread, tiny_det_model)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """A folder of unlabeled images of assorted sizes, plus a label file whose labels are junk."""
    folder = tmp_path_factory.mktemp("unlabeled")
    rng = np.random.default_rng(0)
    names = []
    for i, (h, w) in enumerate([(120, 90), (64, 128), (100, 100), (80, 150), (96, 96)]):
        name = f"img_{i}.{'png' if i % 2 else 'jpg'}"
        cv2.imwrite(str(folder / name), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        names.append(name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "labels.txt").write_text("".join(f"{n}\tnot json at all\n" for n in names))
    return str(folder)


def unlabeled_stream(demo_dir, image_folder, batch_size=2):
    task = det_task(demo_dir)
    transforms = label_free_transforms(task.cfg.Train.transforms)
    dataset = UnlabeledDataset(task, unlabeled_records(image_folder), transforms, seed=0)
    return UnlabeledStream(dataset, batch_size, seed=0)


def distill_trainer(demo_dir, image_folder, work_dir=None, loss=None, **config):
    """A tiny det student distilled from a tiny teacher without labels, plus unlabeled images in every batch."""
    task = det_task(demo_dir)
    model, teacher = tiny_det_model(seed=0), tiny_det_model(seed=1)
    distill_cfg = DistillConfig(enabled=True, features=("neck",), runtime="dygraph")
    cfg = TrainConfig(**{"max_steps": 6, "lr": 1e-2, "warmup_steps": 1, "eval_at_start": False,
                         "label_loss_weight": 0.0, "distill": distill_cfg, **config})
    loader = make_train_loader(task, task.cfg.Train, seed=0)
    distill = TeacherDistillation(teacher, "det", distill_cfg)
    trainer = Trainer(model, loss or build_task_loss("det"), loader, cfg, WeightNormEvaluator(), work_dir, distill)
    trainer.unlabeled = unlabeled_stream(demo_dir, image_folder)
    trainer.show_progress = False
    return trainer


def test_unlabeled_images_load_from_a_folder_or_a_label_file_without_labels(demo_dir, image_folder):
    records = unlabeled_records(image_folder)
    assert [os.path.basename(p) for p, _ in records] == [f"img_{i}.{'png' if i % 2 else 'jpg'}" for i in range(5)]
    assert unlabeled_records(image_folder, os.path.join(image_folder, "labels.txt")) == records
    stream = unlabeled_stream(demo_dir, image_folder, batch_size=2)
    images = stream.images(0)
    assert images.shape == (2, 3, 96, 96) and images.dtype == np.float32  # resized to the Train crop size
    assert np.array_equal(images, stream.images(0))  # a pure function of the step
    assert not np.array_equal(images, stream.images(1))
    # only-mode loader: batches of images alone
    loader = dataset_loader(stream.dataset, 2)
    start_epoch(loader, 0)
    assert [list(t.shape) for t in next(iter(loader))] == [[2, 3, 96, 96]]
    empty = os.path.join(image_folder, "empty")
    os.makedirs(empty, exist_ok=True)
    with pytest.raises(InputError, match="no images"):
        unlabeled_records(empty)


def test_distillation_without_labels_lowers_the_distillation_loss(demo_dir, image_folder):
    trainer = distill_trainer(demo_dir, image_folder, max_steps=12, patience=None)
    images = paddle.to_tensor(trainer.unlabeled.images(100))  # images no step trains on

    def distill_loss():
        trainer.model.train()
        paddle.seed(0)
        with paddle.no_grad():
            return float(trainer.distill(trainer.model(images), images))

    before = distill_loss()
    terms_before = {k: float(v) for k, v in trainer.distill.last_terms.items()}
    assert set(terms_before) == {"distill", "features"} and min(terms_before.values()) > 0
    result = trainer.fit()
    assert result.steps == 12
    assert distill_loss() < 0.8 * before


def test_label_free_run_killed_midway_resumes_bit_identically(demo_dir, image_folder, tmp_path):
    reference = distill_trainer(demo_dir, image_folder, str(tmp_path / "ref"), save_every=2, eval_every=3)
    reference.fit()
    expected = {k: v.numpy() for k, v in reference.model.state_dict().items()}

    work = str(tmp_path / "killed")
    # the loss is not used with label_loss_weight 0; the kill comes from the distillation
    killed = distill_trainer(demo_dir, image_folder, work, save_every=2, eval_every=3)
    calls = {"n": 0}
    original = killed.distill.__class__.__call__

    def dies_at_step_5(self, student_out, images):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated kill")
        return original(self, student_out, images)

    killed.distill.__class__ = type("KilledDistill", (TeacherDistillation,), {"__call__": dies_at_step_5})
    with pytest.raises(RuntimeError, match="simulated kill"):
        killed.fit()
    assert json.load(open(os.path.join(work, PROGRESS_FILE)))["step"] == 4

    resumed = distill_trainer(demo_dir, image_folder, work, save_every=2, eval_every=3)
    result = resumed.fit()
    assert result.resumed_from == 4 and result.steps == 6
    for name, value in resumed.model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), expected[name], err_msg=name)


def test_fast_path_trains_the_same_weights_as_the_slow_path(demo_dir):
    """fast_cpu_ops + the Paddle Inference teacher against plain dygraph: same gradients, same losses and weights
    over a few steps."""
    task = det_task(demo_dir)
    runs = {}
    for fast in (False, True):
        model, teacher = tiny_det_model(seed=0), tiny_det_model(seed=1)
        distill_cfg = DistillConfig(enabled=True, runtime="inference" if fast else "dygraph")
        cfg = TrainConfig(max_steps=4, lr=1e-3, warmup_steps=0, eval_at_start=False, distill=distill_cfg,
                          fast_cpu_ops=fast)
        loader = make_train_loader(task, task.cfg.Train, seed=0)
        distill = TeacherDistillation(teacher, "det", distill_cfg)
        trainer = Trainer(model, build_task_loss("det"), loader, cfg, None, None, distill)
        trainer.show_progress = False
        start_epoch(loader, 0)
        batch = next(iter(loader))
        with fast_cpu_ops(model) if fast else contextlib.nullcontext():
            model.train()
            paddle.seed(0)
            predicts = model(batch[0])
            (build_task_loss("det")(predicts, batch)["loss"] + distill(predicts, batch[0])).backward()
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
        model.clear_gradients()
        losses = []
        original = trainer._train_step
        trainer._train_step = lambda b: losses.append(original(b)) or losses[-1]
        trainer.fit()
        runs[fast] = grads, losses, {k: v.numpy() for k, v in model.state_dict().items()}
    (slow_grads, slow_losses, slow_weights), (fast_grads, fast_losses, fast_weights) = runs[False], runs[True]
    assert slow_grads.keys() == fast_grads.keys()
    scale = max(float(np.abs(g).max()) for g in slow_grads.values())
    for name, grad in slow_grads.items():  # some gradients are rounding noise around 0 (biases before a BN)
        np.testing.assert_allclose(fast_grads[name], grad, rtol=2e-3, atol=1e-6 * scale, err_msg=name)
    np.testing.assert_allclose([l for l, _ in fast_losses], [l for l, _ in slow_losses], rtol=1e-4)
    # Adam's first steps are about lr * sign(gradient): a weight whose gradient is rounding noise around 0 (biases
    # followed by a BN, e.g. the DB head's convs: |gradient| ~1e-8) may step either way, up to 2 x lr per step; those are
    # compared over all elements, every other weight one by one
    diffs = np.concatenate([np.abs(fast_weights[k] - w).ravel() for k, w in slow_weights.items()])
    assert np.quantile(diffs, 0.99) < 1e-4
    noise = {k for k, g in slow_grads.items() if np.abs(g).max() < 1e-6 * scale}
    assert noise <= {k for k in slow_grads if k.endswith(".bias")}
    signal = np.concatenate([np.abs(fast_weights[k] - w).ravel() for k, w in slow_weights.items() if k not in noise])
    assert signal.max() < 1.5 * cfg.lr  # measured 7.8e-4 (4.2e-4 with Paddle's depth-wise kernels); 4 steps


def test_fast_cpu_ops_switch_conv_biases_and_affine_blocks_and_restore_them():
    conv = paddle.nn.Conv2D(3, 4, 3, padding=1)
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype("float32"))
    reference = conv(x).numpy()
    with fast_cpu_ops(conv) as switched:
        assert switched == 1 and "forward" in conv.__dict__
        np.testing.assert_allclose(conv(x).numpy(), reference, rtol=1e-6, atol=1e-6)
    assert "forward" not in conv.__dict__


def test_fast_log_softmax_gives_paddles_values_and_gradients_in_the_rec_kl():
    from finetune.fast_ops import log_softmax
    from finetune.trainer import _sequence_distance
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((3, 6, 97)).astype("float32") * 8  # peaked rows, as a trained CTC head gives
    teacher = paddle.nn.functional.softmax(paddle.to_tensor(rng.standard_normal((3, 6, 97)).astype("float32") * 4))
    results = {}
    for fast in (False, True):
        logits = paddle.to_tensor(raw, stop_gradient=False)
        loss = _sequence_distance(logits, teacher, "kl", temperature=2.0, fast_log_softmax=fast)
        loss.backward()
        results[fast] = float(loss), logits.grad.numpy()
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-5) and results[True][0] > 0.1
    np.testing.assert_allclose(results[True][1], results[False][1], rtol=1e-4, atol=1e-8)
    x = paddle.to_tensor(raw)
    np.testing.assert_allclose(log_softmax(x, axis=1).numpy(), paddle.nn.functional.log_softmax(x, axis=1).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_distill_config_keys_are_checked():
    cfg = parse_section(FinetuneConfig, {"label_loss_weight": 0, "distill": {
        "enabled": True, "features": ["backbone", "neck"], "feature_weight": 0.5, "temperature": 2.0},
        "unlabeled": {"data_dir": "x", "ratio": 0.5}}, "Finetune")
    assert cfg.distill.features == ("backbone", "neck") and cfg.unlabeled.enabled
    with pytest.raises(ConfigError, match="did you mean 'features'"):
        parse_section(FinetuneConfig, {"distill": {"featurs": ["neck"]}}, "Finetune")
    with pytest.raises(ConfigError, match="did you mean 'ratio'"):
        parse_section(FinetuneConfig, {"unlabeled": {"data_dir": "x", "ration": 1}}, "Finetune")
    with pytest.raises(ConfigError, match="use one of: backbone, neck"):
        parse_section(FinetuneConfig, {"distill": {"features": ["head"]}}, "Finetune")
    with pytest.raises(ConfigError, match="nothing to learn"):
        parse_section(FinetuneConfig, {"label_loss_weight": 0}, "Finetune")
    with pytest.raises(ConfigError, match="label_loss_weight: 0"):
        parse_section(FinetuneConfig, {"distill": {"enabled": True}, "unlabeled": {"data_dir": "x", "mode": "only"}},
                      "Finetune")


def test_temperature_softens_and_keeps_kl_zero_for_equal_distributions():
    from finetune.trainer import _sequence_distance
    rng = np.random.default_rng(0)
    logits = paddle.to_tensor(rng.standard_normal((2, 5, 7)).astype("float32") * 3)
    prob = paddle.nn.functional.softmax(logits, axis=-1)
    other = paddle.nn.functional.softmax(paddle.flip(logits, [2]), axis=-1)
    assert abs(float(_sequence_distance(logits, prob, "kl", temperature=3.0))) < 1e-4
    t1 = float(_sequence_distance(logits, other, "kl"))
    t3 = float(_sequence_distance(logits, other, "kl", temperature=3.0))
    assert 0 < t3 and t3 != pytest.approx(t1)
