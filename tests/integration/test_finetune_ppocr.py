"""The finetune stage on the real PP-OCRv4 recogniser: a few steps on the demo data, resumable, gate checked."""
import compress  # noqa: F401  (imports zlib before paddle)

import json
import os
import textwrap

import numpy as np
import paddle
import pytest

import finetune.stage  # noqa: F401  (registers the stage)
from compress.config import load_config
from compress.runner import Runner

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REC_CONFIG = os.path.join(ROOT, "configs", "models", "ppocrv4_rec.yml")

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def two_threads():
    paddle.base.core.set_num_threads(2)


def write_pipeline(tmp_path, demo_data):
    rec = os.path.join(demo_data, "rec")
    text = textwrap.dedent(f"""
        Global: {{run_dir: {tmp_path / 'run'}, show_progress: false, seed: 0}}
        Models: {{rec: {REC_CONFIG}}}
        Pipeline: [baseline, finetune]
        Baseline: {{eval_limit: 32}}
        Finetune: {{max_steps: 3, warmup_steps: 1, batch_size: 8, eval_limit: 16, save_every: 2, max_metric_drop: 5.0,
                    select_by: fidelity, max_fidelity_drop: 50}}
    """)
    path = tmp_path / "pipeline.yml"
    path.write_text(text)
    overrides = [f"Models.rec.Train.data_dir={rec}", f"Models.rec.Train.label_file={rec}/train.txt",
                 "Models.rec.Train.limit=64", f"Models.rec.Eval.data_dir={rec}",
                 f"Models.rec.Eval.label_file={rec}/eval.txt", "Models.rec.Eval.limit=32",
                 f"Models.rec.Calibration.data_dir={rec}", f"Models.rec.Calibration.label_file={rec}/calib.txt",
                 f"Models.rec.Fidelity.data_dir={rec}/eval", "Models.rec.Fidelity.limit=48",
                 "Models.rec.Fidelity.stage_limit=24"]
    return str(path), overrides


def test_finetune_real_rec_model_few_steps(demo_data, tmp_path):
    path, overrides = write_pipeline(tmp_path, demo_data)
    cfg = load_config(path, overrides, stage_sections={"Baseline", "Finetune"})
    lines = []
    manifest = Runner(cfg, log=lines.append).run()

    baseline = manifest.entry("baseline", "rec")["metrics"]
    entry = manifest.entry("finetune", "rec")
    metrics = entry["metrics"]
    assert entry["status"] == "done", entry["message"]
    assert metrics["steps"] == 3 and np.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    assert 0.0 <= metrics["acc"] <= 1.0 and "norm_edit_dis" in metrics
    # the best step is chosen by agreement with the baseline on Calibration lines; the input model (here the
    # baseline itself, which agrees exactly) is evaluated first and kept unless beaten
    assert metrics["select_start_fidelity"] == 1.0 and metrics["select_fidelity_lines"] == 16
    assert metrics["select_fidelity"] == 1.0 and metrics["best_step"] == 0
    assert metrics["fidelity"] == 1.0 and metrics["fidelity_lines_all"] == 24  # Fidelity.stage_limit of its 48 images
    assert metrics["acc"] == pytest.approx(baseline["acc"])  # the whole (32-line) Eval split, reported apart
    assert metrics["acc"] > 0.3  # real weights read the demo text; a broken load scores ~0
    assert metrics["seconds_per_step"] > 0
    progress = json.load(open(os.path.join(cfg.Global.run_dir, "work", "finetune", "rec", entry["config_hash"],
                                           "progress.json")))
    assert progress["step"] == 3
