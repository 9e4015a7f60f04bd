"""The dygraph PP-OCRv4 models built from configs/models/*.yml reproduce the shipped inference models."""
import compress  # noqa: F401  (imports zlib before paddle)

import os

import cv2
import numpy as np
import paddle
import pytest
import yaml

from compress import models
from compress.ppocr_compat import ensure_ppocr, rapidocr_root

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "models")
MAX_ABS_DIFF = 1e-3
SHIPPED_TENSORS = 234  # parameters and BN statistics in each shipped .pdiparams

TEXT_LINES = ("PP-OCRv4 compression 2026", "Invoice No. 4711  total 93.50", "hello world ABCDEFG 0123")


@pytest.fixture(autouse=True)
def one_thread():
    paddle.base.core.set_num_threads(1)


def _config(task):
    with open(os.path.join(CONFIG_DIR, f"ppocrv4_{task}.yml"), encoding="utf-8") as config_file:
        return yaml.safe_load(config_file)


def _page_image():
    """A 640x640 page with a few printed lines, normalised as PP-OCR's det preprocessing does."""
    page = np.full((640, 640, 3), 235, np.uint8)
    page += np.random.RandomState(0).randint(0, 20, page.shape, dtype=np.uint8)
    for row, text in enumerate(TEXT_LINES):
        cv2.putText(page, text, (30, 120 + 150 * row), cv2.FONT_HERSHEY_SIMPLEX, 1.1, (20, 20, 20), 2, cv2.LINE_AA)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    return _to_batch((page / 255.0 - mean) / std)


LINE_TEXT = "total 93.50"


def _line_image():
    """A 48x320 text line, normalised as PP-OCR's rec preprocessing does."""
    line = np.full((48, 320, 3), 240, np.uint8)
    cv2.putText(line, LINE_TEXT, (6, 34), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (10, 10, 10), 2, cv2.LINE_AA)
    return _to_batch((line / 255.0 - 0.5) / 0.5)


def _to_batch(image_hwc):
    return image_hwc.transpose(2, 0, 1)[None].astype("float32")


def _shipped_predictor(task):
    """The shipped inference model in plain FP32 (no oneDNN, no graph fusion) for a like-for-like comparison."""
    model_dir = os.path.join(rapidocr_root(), "models", f"ch_PP-OCRv4_{task}_infer")
    config = paddle.inference.Config(os.path.join(model_dir, "inference.pdmodel"),
                                      os.path.join(model_dir, "inference.pdiparams"))
    config.disable_mkldnn()
    config.switch_ir_optim(False)
    config.set_cpu_math_library_num_threads(1)
    config.disable_glog_info()
    return paddle.inference.create_predictor(config)


def _run_predictor(predictor, batch):
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(batch.shape)
    handle.copy_from_cpu(batch)
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def _run_dygraph(model, batch):
    with paddle.no_grad():
        out = model(paddle.to_tensor(batch))
    return (out["maps"] if isinstance(out, dict) else out).numpy()


@pytest.mark.parametrize("task, make_batch", [("det", _page_image), ("rec", _line_image)])
def test_dygraph_model_matches_shipped_inference_model(task, make_batch):
    config = _config(task)
    model = models.build_model(config["Architecture"], config["Weights"], base_dir=CONFIG_DIR)
    batch = make_batch()

    expected = _run_predictor(_shipped_predictor(task), batch)
    actual = _run_dygraph(model, batch)

    assert actual.shape == expected.shape
    max_abs_diff = float(np.abs(actual - expected).max())
    print(f"{task}: max abs diff {max_abs_diff:.2e} over {expected.size} values")
    assert max_abs_diff <= MAX_ABS_DIFF
    if task == "det":
        assert expected.max() > 0.9, "the shrink map finds no text: the comparison would be on background only"
    else:
        assert (expected.argmax(axis=-1) != 0).sum() >= 5, "the recogniser reads (almost) nothing"


@pytest.mark.parametrize("task, not_shipped_prefix", [("det", "head.thresh."), ("rec", None)])
def test_shipped_weights_fill_every_inference_tensor(task, not_shipped_prefix):
    config = _config(task)
    model = models.build_architecture(config["Architecture"])
    assert models.reparameterize(model) == 28
    report = models.load_rapidocr_weights(model, os.path.join(rapidocr_root(), "models", config["Weights"]["rapidocr"]))

    assert report.matched == SHIPPED_TENSORS
    if not_shipped_prefix is None:
        assert report.missing == ()
    else:
        assert report.missing and all(name.startswith(not_shipped_prefix) for name in report.missing)


def test_dygraph_recogniser_reads_the_rendered_line():
    ensure_ppocr()
    from ppocr.postprocess.rec_postprocess import CTCLabelDecode

    config = _config("rec")
    model = models.build_model(config["Architecture"], config["Weights"], base_dir=CONFIG_DIR)
    decode = CTCLabelDecode(os.path.join(rapidocr_root(), "ch_ppocr_rec", "ppocr_keys_v1.txt"), use_space_char=True)

    [(text, confidence)] = decode(_run_dygraph(model, _line_image()))

    assert text == LINE_TEXT
    assert confidence > 0.8


@pytest.mark.parametrize("task, shape", [("det", (1, 3, 160, 160)), ("rec", (1, 3, 48, 160))])
def test_every_parameter_gets_a_gradient_in_training_mode(task, shape):
    """Fine-tuning must reach the whole model (PaddleOCR's use_guide would cut the rec backbone off the CTC loss)."""
    config = _config(task)
    model = models.build_model(config["Architecture"], config["Weights"], base_dir=CONFIG_DIR)
    model.train()

    out = model(paddle.to_tensor(np.random.RandomState(0).rand(*shape).astype("float32")))
    (out["maps"] if isinstance(out, dict) else out).mean().backward()

    trainable = [(name, param) for name, param in model.named_parameters() if not param.stop_gradient]
    without_gradient = [name for name, param in trainable if param.grad is None]
    assert without_gradient == []
