"""Quantization-aware training (``Quant.method: qat``): config, folding, fake-quant training, export, resume."""
import compress  # noqa: F401  (imports zlib before paddle)

import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest

from compress.config import parse_section
from compress.errors import ConfigError
from compress.quant.onnx_int8 import export_onnx
from compress.quant.qat import calibrate_observers, export_qat_model, fold_conv_affine, prepare_qat
from compress.stages.quant import QuantConfig
from export.predictor import DeployConfig, create_predictor
from finetune.data import make_train_loader
from finetune.trainer import PROGRESS_FILE, Trainer, build_task_loss
from tests.unit.test_finetune import FailingLoss, demo_dir, det_task, tiny_det_model  # noqa: F401  (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def one_thread():
    paddle.base.core.set_num_threads(1)
    paddle.seed(0)


# ------------------------------------------------------------------------------------------------ config


def test_qat_config_accepts_training_and_quant_keys():
    cfg = parse_section(QuantConfig, {"method": "qat", "qat": {
        "max_steps": 5, "lr": 1e-5, "batch_size": 4, "eval_every": 2, "eval_limit": 8, "layers": ["Conv2D", "Linear"],
        "pact": True, "fold": False, "moving_rate": 0.95, "optimizer": {"clip_norm": 1.0},
        "distill": {"enabled": False}}}, "Quant")
    assert cfg.method == "qat" and cfg.qat.max_steps == 5 and cfg.qat.layers == ("Conv2D", "Linear")
    assert cfg.qat.pact and not cfg.qat.fold and cfg.qat.optimizer.clip_norm == 1.0 and not cfg.qat.distill.enabled
    defaults = parse_section(QuantConfig, {"method": "qat"}, "Quant").qat
    assert defaults.layers == ("Conv2D",) and defaults.max_steps == 30 and defaults.fold and defaults.distill.enabled


@pytest.mark.parametrize("qat, message", [
    ({"max_step": 5}, r"Quant\.qat\.max_step: unknown key; did you mean 'max_steps'"),
    ({"lr": "fast"}, r"Quant\.qat\.lr: expected a number"),
    ({"lr": 0}, r"Quant\.qat\.lr: must be > 0"),
    ({"layers": ["Conv3D"]}, r"Quant\.qat\.layers\[0\]: 'Conv3D' is not allowed; use one of: Conv2D, Linear"),
    ({"layers": []}, r"Quant\.qat\.layers: list at least one"),
    ({"layers": ["Conv2D", "Conv2D"]}, r"Quant\.qat\.layers: .* twice"),
    ({"moving_rate": 1.0}, r"Quant\.qat\.moving_rate: must be in \(0, 1\)"),
    ({"pact": "yes"}, r"Quant\.qat\.pact: expected true or false"),
    ({"max_steps": 0}, r"Quant\.qat\.max_steps: must be >= 1"),
    ("fast", r"Quant\.qat: expected a mapping"),
])
def test_qat_config_rejects_bad_keys_in_one_line(qat, message):
    with pytest.raises(ConfigError, match=message) as error:
        parse_section(QuantConfig, {"method": "qat", "qat": qat}, "Quant")
    assert "\n" not in str(error.value)


def test_bad_qat_key_exits_2_with_one_line(tmp_path):
    command = [sys.executable, os.path.join(ROOT, "tools", "run.py"), "-c",
               os.path.join(ROOT, "configs", "ppocr_prune_quant.yml"), "--list", "-o", "Quant.method=qat",
               "Quant.qat.max_step=3", f"Global.run_dir={tmp_path}"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "max_step" in line]
    assert len(lines) == 1 and "did you mean 'max_steps'" in lines[0]


# ------------------------------------------------------------------------------------------------ folding


class AffineBlock(paddle.nn.Layer):
    """PP-LCNetV3's learnable affine block: ``scale * x + bias`` with 1-element parameters (also used by
    tests/unit/test_quant.py)."""

    def __init__(self, scale, bias):
        super().__init__()
        self.scale = self.create_parameter([1], default_initializer=paddle.nn.initializer.Constant(scale))
        self.bias = self.create_parameter([1], default_initializer=paddle.nn.initializer.Constant(bias))

    def forward(self, x):
        return self.scale * x + self.bias


class _ConvNet(paddle.nn.Layer):
    """conv -> BN -> affine -> hardswish -> affine -> 1x1 conv -> BN + ReLU -> transposed conv -> BN."""

    def __init__(self):
        super().__init__()
        self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1, bias_attr=False)
        self.bn = paddle.nn.BatchNorm2D(8)
        self.affine = AffineBlock(1.3, 0.2)
        self.act_affine = AffineBlock(0.8, -0.1)
        self.pointwise = paddle.nn.Conv2D(8, 4, 1)
        self.bn_relu = paddle.nn.BatchNorm(4, act="relu")  # PP-OCR DBHead's style
        self.transposed = paddle.nn.Conv2DTranspose(4, 4, 2, stride=2)
        self.bn_after_transposed = paddle.nn.BatchNorm2D(4)

    def forward(self, x):
        y = self.act_affine(paddle.nn.functional.hardswish(self.affine(self.bn(self.conv(x)))))
        return self.bn_after_transposed(self.transposed(self.bn_relu(self.pointwise(y))))


def _conv_net():
    paddle.seed(1)
    net = _ConvNet()
    with paddle.no_grad():  # non-trivial BN statistics
        for bn in (net.bn, net.bn_relu, net.bn_after_transposed):
            channels = bn._mean.shape[0]
            bn._mean.set_value(np.linspace(-0.5, 0.5, channels).astype("float32"))
            bn._variance.set_value(np.linspace(0.2, 2.0, channels).astype("float32"))
            bn.weight.set_value(np.linspace(0.5, 1.5, channels).astype("float32"))
    net.eval()
    return net


def _example(batch=2, size=16, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype("float32")


def test_fold_merges_bn_and_affine_by_data_flow_and_keeps_outputs():
    net = _conv_net()
    x = _example()
    reference = net(paddle.to_tensor(x)).numpy()
    counts = fold_conv_affine(net, x)
    # conv <- bn <- affine and pointwise <- bn_relu; act_affine follows hardswish, and the BN after Conv2DTranspose
    # has no Conv2D producer
    assert (counts.batch_norms, counts.affines) == (2, 1)
    assert isinstance(net.bn, paddle.nn.Identity) and isinstance(net.affine, paddle.nn.Identity)
    assert isinstance(net.bn_relu, paddle.nn.ReLU)
    assert isinstance(net.act_affine, AffineBlock) and isinstance(net.bn_after_transposed, paddle.nn.BatchNorm2D)
    assert net.conv.bias is not None
    np.testing.assert_allclose(net(paddle.to_tensor(x)).numpy(), reference, rtol=1e-5, atol=1e-5)


def test_prepare_qat_leaves_the_float_model_unchanged():
    net = _conv_net()
    before = {k: v.numpy().copy() for k, v in net.state_dict().items()}
    qat = prepare_qat(net, _example(), layer_types=("Conv2D",))
    assert qat.folded.batch_norms == 2 and qat.quantized_layers == 2  # conv and pointwise
    assert isinstance(net.bn, paddle.nn.BatchNorm2D) and type(net.conv) is paddle.nn.Conv2D
    assert isinstance(net.bn_relu, paddle.nn.BatchNorm)
    after = net.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():
        np.testing.assert_array_equal(after[name].numpy(), value)


def test_calibration_resets_the_observers_scale_bias():
    net = _conv_net()
    x = _example()
    qat = prepare_qat(net, x, layer_types=("Conv2D",), fold=False)
    calibrate_observers(qat.model, [x])
    stem_input = qat.model.conv._layer._fake_quant_input
    # one batch after a reset: the scale is that batch's abs max (no trace of Paddle's initial state = accum = 1)
    np.testing.assert_allclose(float(stem_input._scale.numpy()[0]), float(np.abs(x).max()), rtol=1e-5)


# ------------------------------------------------------------------------------------------------ train + export


def _qat_trainer(demo_dir, work_dir=None, loss=None, max_steps=3, pact=False):  # noqa: F811
    task = det_task(demo_dir)
    model = tiny_det_model()
    model.eval()
    with paddle.no_grad():  # the same function, but a raw head-conv output 1000x its BN output, as in trained nets
        head = model.head.binarize
        head.conv1.weight.set_value(head.conv1.weight * 1000)
        head.conv_bn1._mean.set_value(head.conv_bn1._mean * 1000)
        head.conv_bn1._variance.set_value(head.conv_bn1._variance * 1e6)
    qat = prepare_qat(model, task.example_input(), layer_types=("Conv2D",), pact=pact)
    calibrate_observers(qat.model, list(task.input_batches("eval")))
    cfg = parse_section(QuantConfig, {"method": "qat", "qat": {"max_steps": max_steps, "lr": 1e-3, "warmup_steps": 1,
                                                                "eval_at_start": False, "save_every": 2}},
                        "Quant").qat
    loader = make_train_loader(task, task.cfg.Train, seed=0)
    trainer = Trainer(qat.model, loss or build_task_loss("det"), loader, cfg, None, work_dir, seed=0)
    trainer.show_progress = False
    trainer.section = "Quant.qat"
    return model, qat, trainer


@pytest.mark.parametrize("pact", [False, True])
def test_qat_trains_and_exports_a_model_onednn_int8_runs_like_the_fake_quant_model(demo_dir, tmp_path,  # noqa: F811
                                                                                     pact):
    float_model, qat, trainer = _qat_trainer(demo_dir, pact=pact)
    float_before = {k: v.numpy().copy() for k, v in float_model.state_dict().items()}
    assert qat.folded.batch_norms == 36  # MobileNetV3 and DBHead BNs (paddle.nn.BatchNorm, some with act=relu);
    # DBHead's BN after its Conv2DTranspose stays
    result = trainer.fit()
    assert result.steps == 3 and np.isfinite(result.train_loss)
    for name, value in float_model.state_dict().items():  # training touched the copy only
        np.testing.assert_array_equal(value.numpy(), float_before[name])

    x = det_task(demo_dir).example_input(batch=2)
    qat.model.eval()
    fake_quant = qat.model(paddle.to_tensor(x))["maps"].numpy()
    files = export_qat_model(qat, str(tmp_path / "int8"), [paddle.static.InputSpec([None, 3, None, None],
                                                                                   "float32", "x")])
    assert paddle.in_dynamic_mode()
    assert {"quantize_linear", "dequantize_linear"} <= _op_types(files.model_file)
    if pact:
        assert not [layer for layer in qat.model.sublayers() if type(layer).__name__ == "PACT"]
    int8 = create_predictor(str(tmp_path / "int8"), DeployConfig(precision="int8")).run({"x": x})[0]
    assert np.abs(int8 - fake_quant).mean() < 0.01  # measured 0.0017: oneDNN INT8 reproduces the fake-quant model
    assert not np.allclose(int8, fake_quant, atol=1e-6)  # it really ran INT8 kernels
    if not pact:  # paddle2onnx of the QDQ model runs in ONNX Runtime INT8 like the fake-quant model too
        onnx_file = export_onnx(str(tmp_path / "int8"), str(tmp_path / "int8.onnx"))
        ort_int8 = create_predictor(onnx_file, DeployConfig(backend="onnxruntime")).run({"x": x})[0]
        # measured 0.0028; 0.0125 when DBHead's BN(act=relu) is not folded (paddle2onnx merges it across the QDQ)
        assert np.abs(ort_int8 - fake_quant).mean() < 0.006


def _op_types(model_file):
    from compress.quant.ptq import static_mode

    with static_mode(), paddle.static.scope_guard(paddle.static.Scope()):
        program, _, _ = paddle.static.load_inference_model(
            model_file[:-len(".pdmodel")], paddle.static.Executor(paddle.CPUPlace()))
        return {op.type for op in program.global_block().ops}


def test_qat_resumes_after_a_kill_and_matches_the_uninterrupted_run(demo_dir, tmp_path):  # noqa: F811
    _, reference_qat, reference = _qat_trainer(demo_dir, str(tmp_path / "ref"), max_steps=4)
    reference.fit()
    expected = {k: v.numpy() for k, v in reference_qat.model.state_dict().items()}

    work = str(tmp_path / "killed")
    _, _, killed = _qat_trainer(demo_dir, work, loss=FailingLoss(build_task_loss("det"), at=3), max_steps=4)
    with pytest.raises(RuntimeError, match="simulated kill"):
        killed.fit()
    assert json.load(open(os.path.join(work, PROGRESS_FILE)))["step"] == 2

    _, resumed_qat, resumed = _qat_trainer(demo_dir, work, max_steps=4)
    result = resumed.fit()
    assert result.resumed_from == 2 and result.steps == 4
    state = resumed_qat.model.state_dict()
    assert any("_fake_quant_input._scale" in name for name in state)  # observer scales are part of the progress
    for name, value in state.items():
        np.testing.assert_allclose(value.numpy(), expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


def _onnx_run(path, x, optimize):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = (onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else
                                        onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_store_int8_weights_shrinks_the_qat_onnx_and_keeps_its_function(tmp_path):
    import shutil

    import onnx
    from onnx import numpy_helper

    from compress.quant.onnx_int8 import store_int8_weights

    qat = prepare_qat(_conv_net(), _example(), layer_types=("Conv2D",))
    calibrate_observers(qat.model, [_example(seed=seed) for seed in range(4)])
    fake_quant = qat.model(paddle.to_tensor(_example(seed=7))).numpy()
    export_qat_model(qat, str(tmp_path / "qdq"), [paddle.static.InputSpec([None, 3, None, None], "float32", "x")])
    original = export_onnx(str(tmp_path / "qdq"), str(tmp_path / "qdq.onnx"))
    x = _example(seed=7)
    for bits in (8, 7):
        path = str(tmp_path / f"w{bits}.onnx")
        shutil.copyfile(original, path)
        assert store_int8_weights(path, bits) == 2  # both Conv2D weights
        model = onnx.load(path)
        assert not [node for node in model.graph.node if node.op_type == "QuantizeLinear"
                    and node.input[0] in {init.name for init in model.graph.initializer}]
        int8 = [numpy_helper.to_array(init) for init in model.graph.initializer if init.data_type == onnx.TensorProto.INT8
                and numpy_helper.to_array(init).ndim == 4]
        assert len(int8) == 2 and max(np.abs(w).max() for w in int8) == (127 if bits == 8 else 63)
        stored = _onnx_run(path, x, optimize=False)
        if bits == 8:  # the same quantize/dequantize arithmetic, computed once at export instead of at load
            np.testing.assert_allclose(stored, _onnx_run(original, x, optimize=False), atol=1e-5)
        assert np.abs(stored - fake_quant).mean() < 0.02 * np.abs(fake_quant).mean()
        assert np.isfinite(_onnx_run(path, x, optimize=True)).all()
    def weight_bytes(onnx_path):
        from compress.quant.onnx_int8 import constants_to_initializers

        model = constants_to_initializers(onnx.load(onnx_path))
        return sum(numpy_helper.to_array(init).nbytes for init in model.graph.initializer
                   if numpy_helper.to_array(init).ndim == 4)

    assert weight_bytes(str(tmp_path / "w8.onnx")) < 0.5 * weight_bytes(original)  # conv weights int8, not float32
    with pytest.raises(ValueError, match="weight_bits"):
        store_int8_weights(path, 4)
