"""export.backends.openvino_runtime: FP32 parity with Paddle Inference, NNCF INT8 that really runs INT8, deploy
settings, model lookup in an exported folder. Tiny Paddle conv nets with dynamic spatial sizes; seconds each."""
import compress  # noqa: F401  (imports zlib before paddle)

import dataclasses
import json
import os
import types

import numpy as np
import pytest

from compress.errors import ConfigError
from export.backends import openvino_runtime as ovr
from export.backends.base import PtqJob
from export.predictor import DeployConfig, OpenVinoConfig, create_predictor

SIZES = ((1, 3, 16, 16), (2, 3, 24, 40))


def _save(net, folder):
    import paddle

    net.eval()
    spec = [paddle.static.InputSpec([None, 3, None, None], "float32", "x")]
    paddle.jit.save(net, os.path.join(str(folder), "inference"), input_spec=spec)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import paddle

    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Conv2D(3, 8, 3, padding=1), paddle.nn.BatchNorm2D(8), paddle.nn.Hardswish(),
                               paddle.nn.Conv2D(8, 8, 3, padding=1, groups=8), paddle.nn.ReLU(),
                               paddle.nn.Conv2D(8, 2, 1), paddle.nn.Sigmoid())
    return _save(net, tmp_path_factory.mktemp("tiny_ov"))


@pytest.fixture(scope="module")
def quant_model_dir(tmp_path_factory):
    """Dense convs around a depthwise one: enough weights that INT8 storage shows in the file size."""
    import paddle

    paddle.seed(1)
    net = paddle.nn.Sequential(paddle.nn.Conv2D(3, 32, 3, padding=1), paddle.nn.ReLU(),
                               paddle.nn.Conv2D(32, 32, 3, padding=1, groups=32), paddle.nn.ReLU(),
                               paddle.nn.Conv2D(32, 64, 3, padding=1), paddle.nn.ReLU(), paddle.nn.Conv2D(64, 2, 1))
    return _save(net, tmp_path_factory.mktemp("quant_ov"))


class _ConvThenLinear:
    """A conv feature map read as a sequence by a Linear layer (PP-OCRv4 rec's neck and CTC head in small)."""

    @staticmethod
    def build():
        import paddle

        class Net(paddle.nn.Layer):
            def __init__(self):
                super().__init__()
                self.conv = paddle.nn.Conv2D(3, 32, 3, padding=1)
                self.fc = paddle.nn.Linear(32, 16)

            def forward(self, x):
                features = paddle.nn.functional.relu(self.conv(x)).mean(axis=2)  # N, C, W
                return self.fc(features.transpose([0, 2, 1]))

        paddle.seed(2)
        return Net()


@pytest.fixture(scope="module")
def linear_model_dir(tmp_path_factory):
    return _save(_ConvThenLinear.build(), tmp_path_factory.mktemp("linear_ov"))


def _inputs(shape, seed=0):
    return {"x": np.random.default_rng(seed).normal(size=shape).astype(np.float32)}


def test_fp32_matches_paddle_inference_on_two_input_sizes_and_reads_onnx(tiny_model_dir, tmp_path):
    from export.onnx_export import export_to_onnx

    paddle_predictor = create_predictor(tiny_model_dir, DeployConfig())
    openvino_predictor = create_predictor(tiny_model_dir, DeployConfig(backend="openvino"))
    assert openvino_predictor.backend == "openvino"
    assert (openvino_predictor.input_names, openvino_predictor.output_names) == \
        (paddle_predictor.input_names, paddle_predictor.output_names)
    onnx_path = export_to_onnx(tiny_model_dir, str(tmp_path / "model.onnx")).path
    onnx_predictor = create_predictor(onnx_path, DeployConfig(backend="openvino"))
    for seed, shape in enumerate(SIZES):
        feed = _inputs(shape, seed)
        reference = paddle_predictor.run(feed)[0]
        assert reference.shape == (shape[0], 2) + shape[2:]
        for predictor in (openvino_predictor, onnx_predictor):
            output = predictor.run(feed)[0]
            assert output.shape == reference.shape
            assert np.abs(output - reference).max() <= 1e-4


def test_outputs_are_copies_not_the_request_buffers(tiny_model_dir):
    predictor = create_predictor(tiny_model_dir, DeployConfig(backend="openvino"))
    first = predictor.run(_inputs(SIZES[0], 0))[0]
    kept = first.copy()
    predictor.run(_inputs(SIZES[0], 1))
    np.testing.assert_array_equal(first, kept)


def _ptq_job(model_dir, out_dir, task="det"):
    rng = np.random.default_rng(0)
    # spatial sizes differ between batches, as det pages and rec widths do
    calibration = [{"x": rng.normal(size=(2, 3, h, w)).astype(np.float32)} for h, w in ((16, 16), (24, 20),
                                                                                          (20, 28), (16, 24))]
    probe = _inputs((2, 3, 20, 20), seed=5)
    outputs = {}

    def evaluate(model_path, backend, precision, split="eval", limit=None, mkldnn=True):
        output = create_predictor(model_path, DeployConfig(backend=backend, precision=precision)).run(probe)[0]
        outputs[precision] = output
        return {"score": float(np.abs(output).mean())}

    job = PtqJob(folded_dir=model_dir, out_dir=str(out_dir), work_dir=str(out_dir), calibration=calibration,
                 evaluate=evaluate, main_metric="score", task=task,
                 options=types.SimpleNamespace(max_metric_drop=1.0, max_skipped=0, bias_correction="fast",
                                               openvino_min_macs_per_element=0.0,
                                               openvino_float_op_types=ovr.FLOAT_OP_TYPES))
    return job, probe, outputs


def _runtime_precisions(xml_path):
    """{original layer name: runtime precision} of the convolutions the CPU plugin compiled."""
    compiled = ovr.ov_core().compile_model(xml_path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    precisions = {}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            for name in info["originalLayersNames"].astype(str).split(","):
                precisions[name] = info["runtimePrecision"].astype(str)
    return precisions


def test_ptq_writes_an_int8_ir_that_runs_int8_and_stays_close_to_float(quant_model_dir, tmp_path):
    import openvino

    job, probe, outputs = _ptq_job(quant_model_dir, tmp_path)
    result = ovr.OpenVino().ptq(job)
    folder = tmp_path / "int8_openvino"
    assert result["dir"] == "int8_openvino" and result["files"] == {"fp32": "model_fp32.xml", "int8": "model_int8.xml"}
    assert result["float_model"] == str(folder / "model_fp32.xml")
    assert result["int8_model"] == str(folder / "model_int8.xml")
    assert sorted(os.listdir(folder)) == ["model_fp32.bin", "model_fp32.xml", "model_int8.bin", "model_int8.xml"]
    assert result["int8_bytes"] == sum((folder / f"model_int8.{ext}").stat().st_size for ext in ("xml", "bin"))
    # measured 0.518: int8 dense weights, the depthwise conv's float16, and the larger xml of the FakeQuantize ops
    assert 0.45 <= result["int8_bytes"] / result["float_bytes"] <= 0.58
    assert result["model_type"] is None and result["calibration_items"] == 4

    reference = create_predictor(quant_model_dir, DeployConfig()).run(probe)[0]
    assert np.abs(outputs["fp32"] - reference).max() <= 1e-5
    assert result["float_metric"] == pytest.approx(float(np.abs(reference).mean()), abs=1e-6)
    # measured 0.014 (VNNI) and 0.018 (overflow fix on): more is broken INT8, much less is no INT8 at all
    error = float(np.abs(outputs["int8"] - outputs["fp32"]).max())
    assert 0.007 <= error <= 0.03
    assert abs(result["int8_metric"] - result["float_metric"]) <= 1e-3  # measured 4e-4

    precisions = _runtime_precisions(result["int8_model"])
    assert precisions["conv2d_0.tmp_0"] in ("i8", "u8") and precisions["conv2d_1.tmp_0"] in ("i8", "u8")
    assert _runtime_precisions(result["float_model"])["conv2d_1.tmp_0"] == "f32"
    # the depthwise conv stays float: no quantizer before it, no int8 weights in it
    model = ovr.ov_core().read_model(result["int8_model"])
    depthwise = next(op for op in model.get_ops() if op.get_type_name() == "GroupConvolution")
    producers = [depthwise.input_value(i).get_node() for i in range(2)]
    assert all(p.get_type_name() != "FakeQuantize" for p in producers)
    assert depthwise.input_value(1).get_element_type() != openvino.Type.i8
    assert precisions["depthwise_conv2d_0.tmp_0"] == "f32"


def test_ptq_keeps_the_overflow_fix_without_vnni_and_uses_transformer_patterns_for_rec(quant_model_dir, tmp_path,
                                                                                       monkeypatch):
    import openvino

    from compress.quant import onnx_int8

    monkeypatch.setattr(onnx_int8, "cpu_has_vnni", lambda: False)
    job, _, _ = _ptq_job(quant_model_dir, tmp_path, task="rec")
    result = ovr.OpenVino().ptq(job)
    assert (result["model_type"], result["overflow_fix"]) == ("transformer", "first_layer_only")
    model = ovr.ov_core().read_model(result["int8_model"])
    weight_ranges = {tuple(op.get_output_shape(0)): int(np.abs(op.get_data().astype(np.int32)).max())
                     for op in model.get_ops()
                     if op.get_type_name() == "Constant" and op.get_element_type() == openvino.Type.i8}
    # half the int8 range on the first conv only (the fix: 7-bit levels, -64..63); the full range elsewhere
    assert weight_ranges.pop((32, 3, 3, 3)) in (63, 64)
    assert weight_ranges == {(64, 32, 3, 3): 127, (2, 64, 1, 1): 127}


def test_light_convs_stay_float_above_a_work_threshold(quant_model_dir, tmp_path):
    # conv2d_0 reads 3 channels, conv2d_2 (64 -> 2, 1x1) does 1.9 multiply-adds per element, conv2d_1 192
    model = ovr.ov_core().read_model(os.path.join(quant_model_dir, "inference.pdmodel"))
    assert sorted(ovr.light_convolutions(model, 40)) == ["conv2d_0.tmp_0", "conv2d_2.tmp_0"]
    assert ovr.light_convolutions(model, 200) == ovr.light_convolutions(model, 1000)  # all three
    job, _, _ = _ptq_job(quant_model_dir, tmp_path)
    job = dataclasses.replace(job, options=types.SimpleNamespace(**dict(vars(job.options),
                                                                         openvino_min_macs_per_element=40)))
    result = ovr.OpenVino().ptq(job)
    assert (result["min_macs_per_element"], result["float_convs"]) == (40, 2)
    compiled = ovr.ov_core().compile_model(result["int8_model"], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    runtime = {op.get_rt_info()["originalLayersNames"].astype(str): op.get_rt_info()["runtimePrecision"].astype(str)
               for op in compiled.get_runtime_model().get_ops()
               if op.get_rt_info()["layerType"].astype(str) == "Convolution"}
    # the dense conv alone runs INT8; the first conv, the depth-wise one and the 64 -> 2 1x1 stay f32
    int8 = [names for names, precision in runtime.items() if precision in ("i8", "u8")]
    assert len(int8) == 1 and "conv2d_1.tmp_0" in int8[0].split(",")
    assert sorted(runtime.values()).count("f32") == 3


def _fake_quantized_inputs(model, op_type):
    """{friendly name: are any of its inputs FakeQuantize outputs} of the ops of ``op_type`` in an INT8 model."""
    return {op.get_friendly_name(): any(op.input_value(i).get_node().get_type_name() == "FakeQuantize"
                                        for i in range(op.get_input_size()))
            for op in model.get_ops() if op.get_type_name() == op_type}


def test_matmuls_stay_float_by_default_and_are_quantized_when_not_listed(linear_model_dir):
    model = ovr.ov_core().read_model(os.path.join(linear_model_dir, "inference.pdmodel"))
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.normal(size=(2, 3, 8, w)).astype(np.float32)} for w in (16, 24, 20)]
    default = ovr.FLOAT_OP_TYPES
    assert default == ("GroupConvolution", "MatMul")
    kept, settings = ovr.nncf_quantize(model, calibration, "rec")
    assert settings["float_op_types"] == list(default)
    assert list(_fake_quantized_inputs(kept, "Convolution").values()) == [True]
    assert list(_fake_quantized_inputs(kept, "MatMul").values()) == [False]
    quantized, _ = ovr.nncf_quantize(model, calibration, "rec", float_op_types=("GroupConvolution",))
    assert list(_fake_quantized_inputs(quantized, "MatMul").values()) == [True]


def test_compile_properties_follow_the_deploy_config():
    import openvino
    import openvino.properties as props
    import openvino.properties.hint as hints

    deploy = DeployConfig(backend="openvino", precision="int8", threads=3,
                          openvino=OpenVinoConfig(streams=2, hint="THROUGHPUT", pinning=True))
    assert ovr.compile_properties(deploy) == {
        props.inference_num_threads: 3, props.num_streams: 2, hints.performance_mode: hints.PerformanceMode.THROUGHPUT,
        hints.enable_cpu_pinning: True, hints.inference_precision: openvino.Type.f32}
    with pytest.raises(ConfigError, match="LATENCY, THROUGHPUT"):
        OpenVinoConfig(hint="latency")
    with pytest.raises(ConfigError, match="streams must be a positive integer"):
        DeployConfig.from_dict({"backend": "openvino", "openvino": {"streams": 0}})
    with pytest.raises(ConfigError, match="fp16"):
        ovr.compile_properties(DeployConfig(backend="openvino", precision="fp16"))


def test_deploy_config_round_trips_openvino_settings_through_json():
    config = DeployConfig(backend="openvino", precision="int8", threads=2,
                          openvino=OpenVinoConfig(streams=2, hint="THROUGHPUT", pinning=True))
    data = json.loads(json.dumps(config.to_dict()))
    assert data["openvino"] == {"streams": 2, "hint": "THROUGHPUT", "pinning": True}
    assert DeployConfig.from_dict(data) == config
    with pytest.raises(ConfigError, match="did you mean 'streams'"):
        DeployConfig.from_dict({"backend": "openvino", "openvino": {"stream": 2}})


def test_model_path_prefers_ir_then_paddle_then_onnx(tmp_path):
    backend = ovr.OpenVino()
    assert backend.int8_format == "openvino"  # its INT8 model is the IR, not a Paddle program
    folder = str(tmp_path)
    files = {"paddle": "inference.pdmodel", "params": "inference.pdiparams", "onnx": "model.onnx",
             "openvino": "model_int8.xml"}
    assert backend.model_path(folder, files) == os.path.join(folder, "model_int8.xml")
    assert backend.model_path(folder, {**files, "openvino": None}) == folder
    assert backend.model_path(folder, {**files, "openvino": None, "paddle": None}) == os.path.join(folder, "model.onnx")
    # a PIR program (json) is not readable by OpenVINO: its ONNX file is
    assert backend.model_path(folder, {"paddle": "inference.json", "onnx": "model.onnx"}) == \
        os.path.join(folder, "model.onnx")
    assert backend.model_path(folder, {"paddle": None, "params": None, "onnx": None}) is None


def test_unavailable_names_the_install_and_qat_is_refused(monkeypatch):
    backend = ovr.OpenVino()
    assert backend.unavailable(None) is None
    monkeypatch.setattr(ovr.importlib.util, "find_spec", lambda name: None)
    assert "pip install openvino" in backend.unavailable(None)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="method qat: backend openvino"):
        backend.from_qdq(None, "qdq")
