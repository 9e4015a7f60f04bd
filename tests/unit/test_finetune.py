"""finetune: data pipeline, trainer (loss, resume, NaN guard, distillation) and the stage's gate, on tiny nets."""
import compress  # noqa: F401  (imports zlib before paddle)

import json
import os
import random
import textwrap
import threading

import numpy as np
import paddle
import pytest
import yaml

from compress.config import ModelConfig, load_config, parse_section
from compress.data.demo import DemoCounts, generate_demo_data
from compress.errors import CheckpointError, GateError, InputError
from compress.models import batch_norm_layers, build_model
from compress.tasks import make_task
import finetune.stage  # noqa: F401  (registers the stage)
from finetune.data import EpochBatchSampler, TransformDataset, make_train_loader, start_epoch
from finetune.stage import FinetuneConfig, gate_message
from finetune.trainer import (PROGRESS_FILE, DistillConfig, TeacherDistillation, TrainConfig, Trainer,
                              TrainingError, _map_distance, _sequence_distance, build_task_loss)
from tests.helpers.dummy_stages import TINY_DET_ARCH

DET_TRAIN_TRANSFORMS = [
    {"DecodeImage": {"img_mode": "BGR", "channel_first": False}},
    {"DetLabelEncode": None},
    {"IaaAugment": {"augmenter_args": [{"type": "Affine", "args": {"rotate": [-10, 10]}}]}},
    {"EastRandomCropData": {"size": [96, 96], "max_tries": 20, "keep_ratio": True}},
    {"MakeBorderMap": {"shrink_ratio": 0.4, "thresh_min": 0.3, "thresh_max": 0.7}},
    {"MakeShrinkMap": {"shrink_ratio": 0.4, "min_text_size": 2}},
    {"NormalizeImage": {"scale": "1./255.", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                        "order": "hwc"}},
    {"ToCHWImage": None},
    {"KeepKeys": {"keep_keys": ["image", "threshold_map", "threshold_mask", "shrink_map", "shrink_mask"]}},
]
DET_EVAL_TRANSFORMS = [
    {"DecodeImage": {"img_mode": "BGR", "channel_first": False}},
    {"DetLabelEncode": None},
    {"DetResizeForTest": {"limit_side_len": 96, "limit_type": "max"}},
    {"NormalizeImage": {"scale": "1./255.", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                        "order": "hwc"}},
    {"ToCHWImage": None},
    {"KeepKeys": {"keep_keys": ["image", "shape", "polys", "ignore_tags"]}},
]


@pytest.fixture(autouse=True)
def one_thread():
    paddle.base.core.set_num_threads(1)
    paddle.seed(0)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    counts = DemoCounts(det_train=4, det_eval=2, det_calib=0, rec_train=0, rec_eval=0, rec_calib=0,
                        det_fidelity=0, det_unlabeled=0, rec_fidelity=0, rec_unlabeled=0)
    generate_demo_data(out, seed=0, counts=counts, show_progress=False)
    return str(out)


def det_model_section(demo_dir, batch_size=2):
    det = os.path.join(demo_dir, "det")
    return {
        "Global": {"task": "det"}, "Architecture": TINY_DET_ARCH, "Weights": {"random": True},
        "PostProcess": {"name": "DBPostProcess", "thresh": 0.3, "box_thresh": 0.6},
        "Metric": {"name": "DetMetric", "main_indicator": "hmean"},
        "Train": {"data_dir": det, "label_file": os.path.join(det, "train.txt"), "batch_size": batch_size,
                  "transforms": DET_TRAIN_TRANSFORMS},
        "Eval": {"data_dir": det, "label_file": os.path.join(det, "eval.txt"), "transforms": DET_EVAL_TRANSFORMS},
        "Input": {"example_shape": [3, 64, 64]},
    }


def det_task(demo_dir):
    cfg = parse_section(ModelConfig, dict(det_model_section(demo_dir), base_dir=demo_dir), "test")
    return make_task(cfg, show_progress=False)


def tiny_det_model(seed=0):
    paddle.seed(seed)
    return build_model(dict(TINY_DET_ARCH), {"random": True})


class WeightNormEvaluator:
    """A cheap deterministic 'metric' of the weights, so best-weight tracking can be tested without inference."""

    main_metric = "score"

    def __call__(self, model):
        first = next(iter(model.parameters()))
        return {"score": -float(paddle.abs(first).mean())}


class FailingLoss:
    """Wraps a loss: returns ``value`` (or raises) on the ``at``-th call."""

    def __init__(self, loss, at, value=None):
        self.loss, self.at, self.value, self.calls = loss, at, value, 0

    def __call__(self, predicts, batch):
        self.calls += 1
        out = self.loss(predicts, batch)
        if self.calls == self.at:
            if self.value is None:
                raise RuntimeError("simulated kill")
            out["loss"] = out["loss"] * 0 + self.value
        return out


def make_trainer(demo_dir, work_dir=None, loss=None, evaluator=None, **config):
    task = det_task(demo_dir)
    model = tiny_det_model()
    loader = make_train_loader(task, task.cfg.Train, seed=0)
    cfg = TrainConfig(**{"max_steps": 6, "lr": 1e-3, "warmup_steps": 1, "eval_at_start": False, **config})
    trainer = Trainer(model, loss or build_task_loss("det"), loader, cfg, evaluator, work_dir, seed=0)
    trainer.show_progress = False
    return trainer


# ------------------------------------------------------------------------------------------------ data


def test_augmentation_is_fixed_per_epoch_and_changes_between_epochs(demo_dir):
    task = det_task(demo_dir)
    dataset = TransformDataset(task, task.cfg.Train, seed=3)
    state_before = (random.getstate(), np.random.get_state()[1].copy())
    first = dataset[1][0]
    assert np.array_equal(first, dataset[1][0])  # same (seed, epoch, index): same augmentation
    dataset.set_epoch(1)
    assert not np.array_equal(first, dataset[1][0])  # a new epoch draws a new augmentation
    assert first.shape == (3, 96, 96)
    # the global generators are left as they were
    assert random.getstate() == state_before[0] and np.array_equal(np.random.get_state()[1], state_before[1])


def test_augmentation_is_the_same_when_two_threads_transform_at_once(demo_dir):
    """Paddle's DataLoader reads batches in a thread while training draws unlabeled images in another: the seeded
    global generators must not leak between them (they did, and a resumed distillation run diverged)."""
    task = det_task(demo_dir)
    dataset = TransformDataset(task, task.cfg.Train, seed=3)
    serial = [dataset[i][0] for i in range(len(dataset))]
    other = TransformDataset(task, task.cfg.Train, seed=4)
    results, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            other[0]
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(10):
            results += [dataset[i][0] for i in range(len(dataset))]
    finally:
        stop.set()
        thread.join()
    assert all(np.array_equal(image, serial[k % len(serial)]) for k, image in enumerate(results))


def test_sampler_shuffles_by_seed_and_epoch_resumes_mid_epoch_and_shards(demo_dir):
    dataset = list(range(10))
    sampler = EpochBatchSampler(dataset, 3, seed=1, num_replicas=1, rank=0)
    epoch0 = list(sampler)
    assert sorted(i for b in epoch0 for i in b) == dataset and len(epoch0) == len(sampler) == 4
    sampler.set_epoch(0, start_batch=2)
    assert list(sampler) == epoch0[2:]
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    assert list(EpochBatchSampler(dataset, 3, seed=2, num_replicas=1, rank=0)) != epoch0
    ranks = [[i for b in EpochBatchSampler(dataset, 3, seed=1, num_replicas=2, rank=r) for i in b] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5 and sorted(ranks[0] + ranks[1]) == dataset


def test_loader_batches_have_the_keep_keys_shapes(demo_dir):
    task = det_task(demo_dir)
    loader = make_train_loader(task, task.cfg.Train, batch_size=2, seed=0)
    assert start_epoch(loader, 0)
    batch = next(iter(loader))
    assert [list(t.shape) for t in batch] == [[2, 3, 96, 96]] + [[2, 96, 96]] * 4


# ------------------------------------------------------------------------------------------------ trainer


def test_loss_decreases_in_a_few_steps(demo_dir):
    trainer = make_trainer(demo_dir, max_steps=10, lr=1e-2)
    start_epoch(trainer.loader, 0)
    batch = next(iter(trainer.loader))

    def loss_on_batch():
        trainer.model.train()
        with paddle.no_grad():
            return float(trainer.loss_fn(trainer.model(batch[0]), batch)["loss"])

    before = loss_on_batch()
    result = trainer.fit()
    assert result.steps == 10 and np.isfinite(result.train_loss)
    assert loss_on_batch() < 0.95 * before


def _batch_norm_state(model):
    norms = [layer for _, layer in batch_norm_layers(model)]
    return norms, {name: value.numpy().copy() for name, value in model.state_dict().items()
                   if any(name.endswith(key) for key in ("_mean", "_variance"))}


@pytest.mark.parametrize("mode", ["train", "frozen"])
def test_frozen_batch_norm_keeps_running_statistics_and_trains_scale_and_shift(demo_dir, mode):
    trainer = make_trainer(demo_dir, max_steps=3, lr=1e-2, batch_norm=mode)
    norms, stats_before = _batch_norm_state(trainer.model)
    scales_before = [layer.weight.numpy().copy() for layer in norms]
    assert len(norms) >= 5 and len(stats_before) == 2 * len(norms)
    trainer.fit()
    _, stats_after = _batch_norm_state(trainer.model)
    unchanged = [np.array_equal(stats_before[name], stats_after[name]) for name in stats_before]
    assert all(unchanged) if mode == "frozen" else not any(unchanged)
    assert not any(np.array_equal(before, layer.weight.numpy()) for before, layer in zip(scales_before, norms))


def test_resume_after_kill_continues_and_matches_uninterrupted_run(demo_dir, tmp_path):
    reference = make_trainer(demo_dir, str(tmp_path / "ref"), evaluator=WeightNormEvaluator(), save_every=2,
                             eval_every=3)
    reference.fit()
    expected = {k: v.numpy() for k, v in reference.model.state_dict().items()}

    work = str(tmp_path / "killed")
    killed = make_trainer(demo_dir, work, loss=FailingLoss(build_task_loss("det"), at=5),
                          evaluator=WeightNormEvaluator(), save_every=2, eval_every=3)
    with pytest.raises(RuntimeError, match="simulated kill"):
        killed.fit()
    assert json.load(open(os.path.join(work, PROGRESS_FILE)))["step"] == 4

    resumed = make_trainer(demo_dir, work, evaluator=WeightNormEvaluator(), save_every=2, eval_every=3)
    result = resumed.fit()
    assert result.resumed_from == 4 and result.steps == 6
    assert [h["step"] for h in result.history] == [3, 6]
    for name, value in resumed.model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), expected[name], err_msg=name)


def test_nan_loss_stops_with_training_error_and_saves_nothing_for_that_step(demo_dir, tmp_path):
    work = str(tmp_path / "work")
    trainer = make_trainer(demo_dir, work, loss=FailingLoss(build_task_loss("det"), at=3, value=float("inf")),
                           save_every=2)
    with pytest.raises(TrainingError, match=r"step 3: the loss is inf .*lower Finetune.lr"):
        trainer.fit()
    assert json.load(open(os.path.join(work, PROGRESS_FILE)))["step"] == 2


def test_resume_refuses_progress_of_another_schedule(demo_dir, tmp_path):
    work = str(tmp_path / "work")
    make_trainer(demo_dir, work, max_steps=2).fit()
    with pytest.raises(CheckpointError, match="another model or schedule"):
        make_trainer(demo_dir, work, max_steps=4).fit()


def test_early_stopping_keeps_the_best_weights(demo_dir):
    class Declining(WeightNormEvaluator):
        scores = iter([0.5, 0.9, 0.4, 0.3, 0.2, 0.1])

        def __call__(self, model):
            return {"score": next(self.scores)}

    trainer = make_trainer(demo_dir, evaluator=Declining(), eval_every=1, patience=2, eval_at_start=True)
    snapshots = {}
    original = trainer._evaluate

    def evaluate_and_remember():
        snapshots[trainer.state["step"]] = {k: v.numpy().copy() for k, v in trainer.model.state_dict().items()}
        original()

    trainer._evaluate = evaluate_and_remember
    result = trainer.fit()
    assert result.best_step == 1 and result.stopped_early and result.steps == 3
    assert result.start_metrics == {"score": 0.5}
    for name, value in trainer.model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), snapshots[1][name])


def test_distillation_distances_are_zero_for_equal_outputs_and_positive_otherwise():
    rng = np.random.default_rng(0)
    prob = paddle.to_tensor(rng.uniform(0.05, 0.95, (2, 1, 8, 8)).astype("float32"))
    other = paddle.to_tensor(rng.uniform(0.05, 0.95, (2, 1, 8, 8)).astype("float32"))
    logits = paddle.to_tensor(rng.standard_normal((2, 5, 7)).astype("float32"))
    softmax = paddle.nn.functional.softmax(logits, axis=-1)
    for kind in ("kl", "l2"):
        assert abs(float(_map_distance(prob, prob, kind))) < 1e-6 < float(_map_distance(prob, other, kind))
        assert abs(float(_sequence_distance(logits, softmax, kind))) < 1e-5
        assert float(_sequence_distance(logits, paddle.flip(softmax, [2]), kind)) > 1e-3


def test_distillation_adds_a_teacher_term_to_the_det_loss(demo_dir):
    teacher = tiny_det_model(seed=1)
    trainer = make_trainer(demo_dir, max_steps=1)
    trainer.distill = TeacherDistillation(teacher, "det", DistillConfig(weight=10.0, runtime="dygraph"))
    batch = next(iter(trainer.loader))
    trainer.model.train()
    predicts = trainer.model(batch[0])
    term = float(trainer.distill(predicts, batch[0]))
    assert term > 0 and all(p.stop_gradient for p in teacher.parameters())
    # the Paddle Inference teacher gives the same term as the dygraph one
    inference = TeacherDistillation(teacher, "det", DistillConfig(weight=10.0, runtime="inference"))
    assert float(inference(predicts, batch[0])) == pytest.approx(term, rel=1e-4)
    assert np.isfinite(trainer.fit().first_loss)


# ------------------------------------------------------------------------------------------------ stage


def write_pipeline(tmp_path, demo_dir, finetune):
    text = textwrap.dedent(f"""
        Global: {{run_dir: {tmp_path / 'run'}, show_progress: false}}
        Models:
          det: {yaml.safe_dump(det_model_section(demo_dir), default_flow_style=True, width=10**6).strip()}
        Pipeline: [baseline, finetune]
        Finetune: {yaml.safe_dump(finetune, default_flow_style=True).strip()}
    """)
    path = tmp_path / "pipeline.yml"
    path.write_text(text)
    return str(path)


def run_pipeline(tmp_path, demo_dir, baseline_metric=None, monkeypatch=None, **finetune):
    from compress.runner import Runner, StageContext
    # the tiny data set has no Calibration split: the best step is chosen on Eval here
    settings = {"max_steps": 2, "warmup_steps": 1, "eval_every": 2, "select_split": "eval", **finetune}
    cfg = load_config(write_pipeline(tmp_path, demo_dir, settings), stage_sections={"Baseline", "Finetune"})
    if baseline_metric is not None:
        monkeypatch.setattr(StageContext, "baseline_metrics", lambda self: {"hmean": baseline_metric})
    lines = []
    runner = Runner(cfg, log=lines.append)
    return runner, lines


def test_stage_passes_gate_and_saves_weights(demo_dir, tmp_path):
    runner, lines = run_pipeline(tmp_path, demo_dir, max_metric_drop=100.0)
    manifest = runner.run()
    entry = manifest.entry("finetune", "det")
    assert entry["status"] == "done" and "model.pdparams" in entry["files"]
    assert entry["metrics"]["steps"] == 2 and "hmean" in entry["metrics"] and "seconds_per_step" in entry["metrics"]
    assert "best at step" in lines[-1]
    with open(os.path.join(manifest.abs_dir(entry), "stage.json")) as handle:
        history = json.load(handle)["metadata"]["history"]  # the recovery curve: step 0 and every eval_every
    assert [h["step"] for h in history] == [0, 2] and all("hmean" in h for h in history)


def test_stage_gate_failure_stops_with_message(demo_dir, tmp_path, monkeypatch):
    runner, _ = run_pipeline(tmp_path, demo_dir, baseline_metric=0.9, monkeypatch=monkeypatch, max_metric_drop=1.0)
    with pytest.raises(GateError, match=r"hmean 0\.\d+ is \d+\.\d\d points below the baseline's 0\.9000, more than "
                                        r"Finetune.max_metric_drop 1: raise Finetune.epochs or lower Prune ratios"):
        runner.run()
    from compress.checkpoint import Manifest
    manifest = Manifest.load(runner.run_dir)
    assert manifest.entry("finetune", "det")["status"] == "failed"
    assert "model.pdparams" not in manifest.entry("finetune", "det")["files"]


def test_stage_gate_failure_can_continue_from_the_input_model(demo_dir, tmp_path, monkeypatch):
    runner, lines = run_pipeline(tmp_path, demo_dir, baseline_metric=0.9, monkeypatch=monkeypatch,
                                 on_gate_fail="continue")
    manifest = runner.run()
    assert manifest.entry("finetune", "det")["status"] == "failed"
    assert "GATE FAILED" in lines[-1]


def test_stage_nan_loss_leaves_head_on_previous_stage(demo_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(finetune.stage, "build_task_loss",
                        lambda task, overrides=None, where="Finetune.loss": FailingLoss(
                            build_task_loss(task, overrides, where), at=1, value=float("nan")))
    runner, _ = run_pipeline(tmp_path, demo_dir, max_metric_drop=100.0)
    with pytest.raises(TrainingError, match="step 1"):
        runner.run()
    from compress.checkpoint import Manifest
    manifest = Manifest.load(runner.run_dir)
    assert manifest.head == "baseline" and manifest.entry("finetune", "det") is None


def test_config_rejects_unknown_keys_and_bad_values(demo_dir, tmp_path):
    from compress.errors import ConfigError
    with pytest.raises(ConfigError, match="did you mean 'max_metric_drop'"):
        parse_section(FinetuneConfig, {"max_metric_dorp": 0.1}, "Finetune")
    with pytest.raises(ConfigError, match=r"^Finetune.max_drop was renamed: use Finetune.max_metric_drop \(in points "
                                          r"of the main metric: 0.01 -> 1.0\)$"):
        parse_section(FinetuneConfig, {"max_drop": 0.01}, "Finetune")
    with pytest.raises(ConfigError, match="use one of: stop, continue"):
        parse_section(FinetuneConfig, {"on_gate_fail": "ignore"}, "Finetune")
    with pytest.raises(ConfigError, match="use one of: kl, l2"):
        parse_section(FinetuneConfig, {"distill": {"enabled": True, "kind": "mse"}}, "Finetune")


def test_gate_message():
    assert gate_message("hmean", 0.775, 0.78, 1.0) is None
    assert gate_message("hmean", 0.77, 0.78, 1.0) is None  # exactly at the limit
    assert gate_message("hmean", 0.71, 0.78, 1.0) == (
        "hmean 0.7100 is 7.00 points below the baseline's 0.7800, more than Finetune.max_metric_drop 1: raise "
        "Finetune.epochs or lower Prune ratios")
    assert gate_message("hmean", 0.1, 0.78, None) is None


def test_dry_run_describes_the_schedule_without_training(demo_dir):
    from types import SimpleNamespace
    task = det_task(demo_dir)
    ctx = SimpleNamespace(model_cfg=task.cfg, task=task)
    cfg = parse_section(FinetuneConfig, {"epochs": 3, "eval_limit": 2}, "Finetune")
    text = finetune.stage.FinetuneStage().dry_run(None, cfg, ctx)
    assert "4 training samples, batch 2 x 1 process(es), 2 steps/epoch, 6 steps" in text
    assert "gate: hmean >= baseline - 1 pt" in text


def test_loss_section_is_checked_against_the_ppocr_loss():
    from compress.errors import ConfigError
    assert type(build_task_loss("det", {"alpha": 3})).__name__ == "DBLoss"
    assert type(build_task_loss("rec", {"use_focal_loss": True})).__name__ == "CTCLoss"
    with pytest.raises(ConfigError, match=r"Finetune.loss.alhpa: unknown key; did you mean 'alpha'"):
        build_task_loss("det", {"alhpa": 3})
    with pytest.raises(ConfigError, match="Finetune.loss"):
        build_task_loss("det", {"name": "NoSuchLoss"})


def test_selection_on_a_missing_calibration_split_is_a_one_line_error(demo_dir, tmp_path):
    runner, _ = run_pipeline(tmp_path, demo_dir, select_split="calibration")
    with pytest.raises(InputError, match=r"Calibration: section missing; Finetune\.select_split: calibration"):
        runner.run()


def test_selection_on_held_out_unlabeled_images(demo_dir, tmp_path):
    """select_split: unlabeled measures agreement with the baseline on images held out of the unlabelled set, and
    those images never reach training."""
    images = os.path.join(demo_dir, "det", "train")  # the tiny set's 4 pages, used without their labels
    unlabeled = {"data_dir": images, "ratio": 0.5, "holdout": 2}
    runner, lines = run_pipeline(tmp_path, demo_dir, max_metric_drop=None, select_split="unlabeled",
                                 select_by="fidelity", distill={"enabled": True}, unlabeled=unlabeled)
    manifest = runner.run()
    metrics = manifest.entry("finetune", "det")["metrics"]
    assert metrics["select_start_fidelity"] == 1.0  # step 0 is the baseline itself: it agrees with itself
    assert 0.0 <= metrics["select_fidelity"] <= 1.0 and "select_hmean" not in metrics
    assert "on 2 held-out unlabeled images" in lines[-1]

    from types import SimpleNamespace
    task = det_task(demo_dir)
    ctx = SimpleNamespace(model_cfg=task.cfg, task=task)
    ucfg = parse_section(FinetuneConfig, {"select_split": "unlabeled", "select_by": "fidelity",
                                          "unlabeled": unlabeled}, "Finetune").unlabeled
    dataset, held = finetune.stage.unlabeled_dataset(ucfg, task.cfg.Train, ctx, 0, "Finetune.unlabeled")
    trained = {path for path, _ in dataset.records}
    names = sorted(os.listdir(images))
    assert [os.path.basename(p) for p, _ in held] == [names[0], names[-1]]  # spread over the list
    assert len(trained) == len(names) - 2 and not trained & {p for p, _ in held}


def test_unlabeled_selection_settings_are_checked():
    from compress.errors import ConfigError
    with pytest.raises(ConfigError, match=r"Finetune.select_split: unlabeled chooses the best step on images held "
                                          r"out of Finetune.unlabeled; set Finetune.unlabeled.data_dir and "
                                          r"Finetune.unlabeled.holdout"):
        parse_section(FinetuneConfig, {"select_split": "unlabeled", "select_by": "fidelity"}, "Finetune")
    with pytest.raises(ConfigError, match=r"unlabeled images have no labels; set Finetune.select_by: fidelity"):
        parse_section(FinetuneConfig, {"select_split": "unlabeled", "unlabeled": {"data_dir": "x", "holdout": 4}},
                      "Finetune")
    with pytest.raises(ConfigError, match=r"Finetune.unlabeled.holdout: 4 images would be kept out of training for "
                                          r"nothing; set Finetune.select_split: unlabeled"):
        parse_section(FinetuneConfig, {"unlabeled": {"data_dir": "x", "holdout": 4}}, "Finetune")
    with pytest.raises(ConfigError, match=r"Finetune.unlabeled.holdout: must be >= 0"):
        parse_section(FinetuneConfig, {"unlabeled": {"data_dir": "x", "holdout": -1}}, "Finetune")


class _Outputs(paddle.nn.Layer):
    """A 'model' whose output rows are fixed: (text id, confidence) per line."""

    def __init__(self, rows):
        super().__init__()
        self.rows = np.asarray(rows, dtype="float32")

    def forward(self, x):
        return paddle.to_tensor(self.rows[:x.shape[0]])


def test_unlabeled_rec_selection_counts_the_lines_the_teacher_reads_confidently():
    from types import SimpleNamespace
    from compress.tasks import Task
    from finetune.trainer import TaskEvaluator
    task = SimpleNamespace(task="rec", main_metric="acc", show_progress=False,
                           cfg=SimpleNamespace(Eval=SimpleNamespace(batch_size=16)),
                           post_process=lambda raw: [(str(int(row[0])), float(row[1])) for row in raw])
    task.stack_batches = lambda samples, batch_size=None: Task.stack_batches(task, samples, batch_size)
    samples = [(np.zeros((1, 4, 4), dtype="float32"),) for _ in range(3)]
    teacher = _Outputs([[0, 0.99], [1, 0.50], [2, 0.97]])
    student = _Outputs([[0, 0.90], [1, 0.90], [7, 0.90]])
    metrics = TaskEvaluator(task, split="unlabeled", reference=teacher, samples=samples, min_score=0.95)(student)
    assert metrics["fidelity"] == 0.5 and metrics["fidelity_lines"] == 2  # lines 0 and 2; line 2 differs
    assert metrics["fidelity_all"] == pytest.approx(2 / 3) and "acc" not in metrics
    # no line read confidently: every line counts, so selection still has a metric
    metrics = TaskEvaluator(task, split="unlabeled", reference=teacher, samples=samples, min_score=0.999)(student)
    assert metrics["fidelity"] == pytest.approx(2 / 3) and metrics["fidelity_lines"] == 3
    with pytest.raises(ValueError, match="reference model"):
        TaskEvaluator(task, split="unlabeled", samples=samples)


def test_dry_run_counts_the_unlabelled_images_an_unlabelled_only_run_trains_on(demo_dir):
    from types import SimpleNamespace
    task = det_task(demo_dir)
    ctx = SimpleNamespace(model_cfg=task.cfg, task=task)
    cfg = parse_section(FinetuneConfig, {"epochs": 1, "label_loss_weight": 0, "distill": {"enabled": True},
                                         "select_split": "unlabeled", "select_by": "fidelity",
                                         "unlabeled": {"data_dir": os.path.join(demo_dir, "det", "eval"),
                                                       "mode": "only", "holdout": 1}}, "Finetune")
    text = finetune.stage.FinetuneStage().dry_run(None, cfg, ctx)
    assert "1 unlabelled training images (the Train split is not read), batch 2 x 1 process(es), 1 steps/epoch" in text
    assert "on 1 held-out unlabeled images" in text
