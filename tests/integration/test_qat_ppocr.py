"""``Quant.method: qat`` on the real PP-OCRv4 recogniser: a few fake-quant steps through the stage, then the INT8
models judged by Paddle oneDNN INT8 and ONNX Runtime, the float model left as it was."""
import compress  # noqa: F401  (imports zlib before paddle)

import json
import os
import textwrap

import pytest

import compress.stages  # noqa: F401  (registers the stages)
from compress.config import load_config
from compress.runner import Runner
from export.backends.onnx_runtime import ONNX_INT8_DIR
from export.backends.paddle_inference import PADDLE_INT8_DIR
from export.predictor import find_model_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REC_CONFIG = os.path.join(ROOT, "configs", "models", "ppocrv4_rec.yml")

pytestmark = pytest.mark.integration


def test_qat_real_rec_model_writes_and_evaluates_int8_models(demo_data, tmp_path):
    rec = os.path.join(demo_data, "rec")
    path = tmp_path / "pipeline.yml"
    path.write_text(textwrap.dedent(f"""
        Global: {{run_dir: {tmp_path / 'run'}, show_progress: false, seed: 0}}
        Models: {{rec: {REC_CONFIG}}}
        Pipeline: [baseline, quant]
        Baseline: {{eval_limit: 32}}
        Quant:
          method: qat
          eval_limit: 32
          calibration_limit: 16
          on_gate_fail: continue
          qat: {{max_steps: 2, warmup_steps: 1, batch_size: 8, eval_limit: 16}}
    """))
    overrides = [f"Models.rec.{split}.{key}={value}" for split, name in (("Train", "train"), ("Eval", "eval"),
                                                                          ("Calibration", "calib"))
                 for key, value in (("data_dir", rec), ("label_file", os.path.join(rec, f"{name}.txt")))]
    overrides += [f"Models.rec.Fidelity.data_dir={rec}/fidelity", "Models.rec.Fidelity.limit=16"]
    cfg = load_config(str(path), overrides, stage_sections={"Baseline", "Quant"})
    manifest = Runner(cfg, log=lambda line: None).run()

    entry = manifest.entry("quant", "rec")
    baseline = manifest.entry("baseline", "rec")
    folder = os.path.join(cfg.Global.run_dir, entry["dir"])
    metadata = json.load(open(os.path.join(folder, "quant.json")))
    assert metadata["method"] == "qat" and metadata == entry["metadata"]
    qat = metadata["qat"]
    assert qat["steps"] == 2 and qat["quantized_layers"] == 38  # every Conv2D of PP-OCRv4 rec
    assert qat["folded"]["affines"] == 28 and qat["folded"]["max_abs_diff"] < 1e-4
    assert 0.3 < qat["fake_quant_metric"] <= 1.0  # real weights, a working fake-quant model

    paddle_int8 = metadata["backends"]["paddle_cpu"]
    onnx_int8 = metadata["backends"]["onnxruntime"]
    files = find_model_files(os.path.join(folder, PADDLE_INT8_DIR))
    assert files.params_file and paddle_int8["int8_bytes"] < 0.7 * paddle_int8["float_bytes"]  # int8 conv weights
    assert os.path.isfile(os.path.join(folder, ONNX_INT8_DIR, onnx_int8["files"]["int8"]))
    # conv weights stored as int8 (the neck's and head's MatMul weights stay float: 0.556 of the float file)
    assert onnx_int8["int8_weights"] == 38 and onnx_int8["weight_bits"] in (7, 8)
    assert onnx_int8["int8_bytes"] < 0.6 * onnx_int8["float_bytes"]
    for result in (paddle_int8, onnx_int8):
        # the float model through the same backend scores what the dygraph baseline scored on the same lines
        assert result["float_metric"] == pytest.approx(baseline["metrics"]["acc"], abs=1e-6)
        assert 0.3 < result["int8_metric"] <= 1.0
        assert result["passed"] == (result["float_metric"] - result["int8_metric"] <= 0.01)
    if not paddle_int8["passed"]:  # the same QDQ model run as float ops separates quantization from oneDNN error
        assert 0.3 < paddle_int8["qdq_float_ops_metric"] <= 1.0
    assert entry["status"] == ("done" if metadata["passed_backends"] else "failed")
    # the quant stage keeps the float model: no weights of its own, the head stays the baseline's weights
    assert "model.pdparams" not in entry["files"]
