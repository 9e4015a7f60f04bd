"""compress.models on tiny ppocr architectures: checkpoints, inference dirs, re-parameterisation, config errors."""
import compress  # noqa: F401  (imports zlib before paddle)

import shutil
import warnings

import numpy as np
import paddle
import pytest

from compress import models
from compress.errors import CheckpointError, ConfigError, InputError

TINY_REC = {
    "model_type": "rec",
    "algorithm": "SVTR_LCNet",
    "Transform": None,
    "Backbone": {"name": "PPLCNetV3", "scale": 0.25},
    "Neck": {"name": "SequenceEncoder", "encoder_type": "reshape"},
    "Head": {"name": "CTCHead", "out_channels": 5},
}
TINY_DET = {
    "model_type": "det",
    "algorithm": "DB",
    "Transform": None,
    "Backbone": {"name": "MobileNetV3", "scale": 0.35, "model_name": "small"},
    "Neck": {"name": "DBFPN", "out_channels": 16},
    "Head": {"name": "DBHead", "k": 50},
}
REC_INPUT_SHAPE = (2, 3, 48, 64)
DET_INPUT_SHAPE = (1, 3, 64, 64)


@pytest.fixture(autouse=True)
def one_thread():
    paddle.base.core.set_num_threads(1)
    paddle.seed(0)


def _randomised(model, seed, input_shape):
    """Give every tensor values a fresh build would not have: noisy weights, BN statistics of a random batch."""
    rng = np.random.RandomState(seed)
    for tensor in model.state_dict().values():
        current = tensor.numpy()
        noise = rng.standard_normal(current.shape).astype("float32") * (0.1 * np.abs(current).mean() + 0.01)
        tensor.set_value(current + noise)
    _set_bn_statistics_from_batch(model, rng.standard_normal(input_shape).astype("float32"))
    return model


def _set_bn_statistics_from_batch(model, batch):
    # Fresh statistics (mean 0, variance 1) let activations grow layer after layer until the softmax saturates,
    # and then the outputs no longer show whether the weights were loaded.
    norms = [layer for layer in model.sublayers() if hasattr(layer, "_momentum") and hasattr(layer, "_variance")]
    momentums = [norm._momentum for norm in norms]
    was_training = model.training
    for norm in norms:
        norm._momentum = 0.0
    model.train()
    with paddle.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nn.BatchNorm notes that training tracks statistics
        model(paddle.to_tensor(batch))
    for norm, momentum in zip(norms, momentums):
        norm._momentum = momentum
    model.train() if was_training else model.eval()


def _run(model, shape, seed=1):
    image = np.random.RandomState(seed).standard_normal(shape).astype("float32")
    with paddle.no_grad():
        out = model(paddle.to_tensor(image))
    return (out["maps"] if isinstance(out, dict) else out).numpy()


def _export(model, shape, prefix):
    """Write a Paddle inference model as PaddleOCR's export does (jit.save of the eval, fused model)."""
    spec = [paddle.static.InputSpec([None, *shape[1:]], "float32")]
    paddle.jit.save(paddle.jit.to_static(model, input_spec=spec, full_graph=True), str(prefix))


@pytest.fixture(scope="module")
def tiny_det_export(tmp_path_factory):
    """An exported tiny det model (random weights) and its outputs, shared because exporting takes seconds."""
    paddle.base.core.set_num_threads(1)
    source = _randomised(models.build_model(TINY_DET, {"random": True}), 5, DET_INPUT_SHAPE)
    expected = _run(source, DET_INPUT_SHAPE)
    model_dir = tmp_path_factory.mktemp("tiny_det_infer")
    _export(source, DET_INPUT_SHAPE, model_dir / "inference")
    return model_dir, expected


@pytest.mark.parametrize("fused_before_saving", [False, True], ids=["paddleocr_training", "fused"])
def test_checkpoint_round_trip_reproduces_outputs(tmp_path, fused_before_saving):
    source = _randomised(models.build_architecture(TINY_REC), 3, REC_INPUT_SHAPE)
    if fused_before_saving:
        models.reparameterize(source)
    path = tmp_path / "best_accuracy.pdparams"
    paddle.save(source.state_dict(), str(path))
    models.reparameterize(source)
    source.eval()

    loaded = models.build_model(TINY_REC, {"checkpoint": str(path)})

    expected = _run(source, REC_INPUT_SHAPE)
    assert expected.std(axis=1).mean() > 1e-3, "degenerate test model: its output does not depend on the input"
    assert not loaded.training
    np.testing.assert_array_equal(_run(loaded, REC_INPUT_SHAPE), expected)


def test_checkpoint_path_without_suffix_is_accepted(tmp_path):
    paddle.save(models.build_architecture(TINY_REC).state_dict(), str(tmp_path / "best_accuracy.pdparams"))
    model = models.build_model(TINY_REC, {"checkpoint": "best_accuracy"}, base_dir=str(tmp_path))
    assert _run(model, REC_INPUT_SHAPE).shape[-1] == 5


def test_checkpoint_with_other_shapes_raises_checkpoint_error(tmp_path):
    path = tmp_path / "best_accuracy.pdparams"
    paddle.save(models.build_architecture(TINY_REC).state_dict(), str(path))
    seven_classes = dict(TINY_REC, Head={"name": "CTCHead", "out_channels": 7})

    with pytest.raises(CheckpointError, match=r"head\.fc\.weight .*Architecture"):
        models.build_model(seven_classes, {"checkpoint": str(path)})


def test_checkpoint_with_missing_names_raises_checkpoint_error(tmp_path):
    state = models.build_architecture(TINY_REC).state_dict()
    del state["head.fc.bias"]
    path = tmp_path / "partial.pdparams"
    paddle.save(state, str(path))

    with pytest.raises(CheckpointError, match=r"1 model tensors missing \(head\.fc\.bias\)"):
        models.load_training_checkpoint(models.build_architecture(TINY_REC), str(path))


def test_unfused_checkpoint_into_fused_model_says_what_to_do(tmp_path):
    path = tmp_path / "best_accuracy.pdparams"
    paddle.save(models.build_architecture(TINY_REC).state_dict(), str(path))
    fused = models.build_architecture(TINY_REC)
    models.reparameterize(fused)

    with pytest.raises(CheckpointError, match="before calling"):
        models.load_training_checkpoint(fused, str(path))


def test_corrupt_checkpoint_raises_checkpoint_error(tmp_path):
    path = tmp_path / "broken.pdparams"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pdparams"):
        models.load_training_checkpoint(models.build_architecture(TINY_REC), str(path))


def test_missing_checkpoint_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="nowhere.pdparams"):
        models.build_model(TINY_REC, {"checkpoint": str(tmp_path / "nowhere.pdparams")})


def test_reparameterize_fuses_once_and_keeps_outputs():
    model = _randomised(models.build_architecture(TINY_REC), 4, REC_INPUT_SHAPE)
    model.eval()
    before = _run(model, REC_INPUT_SHAPE)

    assert models.reparameterize(model) == 28
    assert models.reparameterize(model) == 0
    names = list(model.state_dict())
    assert not [name for name in names if ".conv_kxk." in name or ".identity." in name or ".conv_1x1." in name]
    assert any(".reparam_conv." in name for name in names)
    np.testing.assert_allclose(_run(model, REC_INPUT_SHAPE), before, atol=1e-4)


def test_inference_dir_round_trip_leaves_only_threshold_branch_unfilled(tiny_det_export):
    model_dir, expected = tiny_det_export
    model = models.build_architecture(TINY_DET)
    models.reparameterize(model)
    report = models.load_rapidocr_weights(model, str(model_dir))
    model.eval()

    assert report.missing and all(name.startswith("head.thresh.") for name in report.missing)
    assert report.matched + len(report.missing) == len(model.state_dict())
    np.testing.assert_allclose(_run(model, DET_INPUT_SHAPE), expected, atol=1e-6)


def test_inference_dir_of_other_architecture_raises_checkpoint_error(tiny_det_export):
    model_dir, _ = tiny_det_export
    with pytest.raises(CheckpointError, match="no place in the model.*Architecture"):
        models.build_model(TINY_REC, {"inference_dir": str(model_dir)})


def test_inference_dir_without_names_file_raises_input_error(tiny_det_export, tmp_path):
    model_dir = shutil.copytree(tiny_det_export[0], tmp_path / "copy")
    (model_dir / "inference.pdiparams.info").unlink()

    with pytest.raises(InputError, match=r"inference\.pdiparams\.info"):
        models.build_model(TINY_DET, {"inference_dir": str(model_dir)})


def test_unknown_rapidocr_model_lists_the_shipped_ones():
    with pytest.raises(InputError, match="ch_PP-OCRv4_det_infer"):
        models.build_model(TINY_DET, {"rapidocr": "no_such_model_infer"})


@pytest.mark.parametrize("section, bad, where", [
    ("Backbone", {"name": "NoSuchNet"}, "Architecture.Backbone"),
    ("Head", {"name": "CTCHead"}, "Architecture.Head"),  # out_channels missing
    ("Neck", {"encoder_type": "reshape"}, "Architecture.Neck"),  # name missing
])
def test_bad_architecture_raises_config_error_naming_the_section(section, bad, where):
    with pytest.raises(ConfigError, match=where):
        models.build_architecture(dict(TINY_REC, **{section: bad}))


@pytest.mark.parametrize("weights", [
    {},
    {"random": True, "checkpoint": "a.pdparams"},
    {"randm": True},
    {"random": "yes"},
    {"checkpoint": 3},
])
def test_bad_weights_section_raises_config_error(weights):
    with pytest.raises(ConfigError, match="Weights"):
        models.build_model(TINY_REC, weights)
