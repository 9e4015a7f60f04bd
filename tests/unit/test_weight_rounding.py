"""GPTQ rounding onto the INT8 grid (compress/quant/weight_rounding.py): on the grid, better than nearest, and
reproduced exactly by NNCF's own weight quantization."""
import compress  # noqa: F401  (imports zlib before paddle)

import numpy as np
import pytest

from compress.quant import weight_rounding as wr


def _correlated_inputs(rows=512, columns=24, seed=0):
    """Inputs whose columns are strongly correlated (as neighbouring channels of a feature map are)."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(6, columns))
    return rng.normal(size=(rows, 6)) @ basis + 0.1 * rng.normal(size=(rows, columns))


def test_gptq_stays_on_the_grid_and_lowers_the_output_error_of_nearest_rounding():
    rng = np.random.default_rng(1)
    x = _correlated_inputs()
    weights = rng.normal(size=(16, 24))
    scales = wr.channel_scales(weights, qmax=7)  # a coarse 4-bit grid makes the difference plain
    hessian = x.T @ x
    rounded = wr.gptq_rounding(weights, hessian, scales, rounded_columns=24, qmax=7)
    levels = rounded / scales[:, None]
    assert np.allclose(levels, np.round(levels), atol=1e-9) and np.abs(levels).max() <= 7 + 1e-9
    nearest = wr.nearest_rounding(weights, scales, qmax=7)
    error_nearest = np.linalg.norm(x @ (nearest - weights).T)
    error_gptq = np.linalg.norm(x @ (rounded - weights).T)
    assert error_gptq < 0.6 * error_nearest


def test_a_bias_column_absorbs_the_mean_shift_and_is_not_rounded():
    rng = np.random.default_rng(2)
    x = np.abs(_correlated_inputs(seed=3)) + 1.0  # positive inputs (after a ReLU): rounding shifts the mean
    x1 = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    weights = rng.normal(size=(8, 24))
    bias = rng.normal(size=(8, 1)) * 0.01
    scales = wr.channel_scales(weights, qmax=7)
    solved = wr.gptq_rounding(np.concatenate([weights, bias], axis=1), x1.T @ x1, scales, rounded_columns=24,
                              qmax=7)
    without_bias = wr.gptq_rounding(weights, x.T @ x, scales, rounded_columns=24, qmax=7)
    target = x1 @ np.concatenate([weights, bias], axis=1).T
    mean_shift = np.abs((x1 @ solved.T - target).mean(axis=0)).max()
    mean_shift_fixed_bias = np.abs((x @ without_bias.T + bias.T - target).mean(axis=0)).max()
    assert mean_shift < 1e-6 < mean_shift_fixed_bias
    assert not np.allclose(solved[:, -1], bias[:, 0])


def test_every_channel_keeps_its_largest_level_so_the_backend_derives_the_same_scale():
    original = np.array([[1.0, -0.5, 0.2], [0.3, -0.9, 0.1]])
    scales = wr.channel_scales(original)
    rounded = np.array([[126.0, -63.0, 25.0], [38.0, -127.0, 13.0]]) * scales[:, None]
    assert wr._anchor_channels(rounded, original, scales) == 1
    assert rounded[0, 0] == pytest.approx(127 * scales[0])
    assert np.allclose(wr.channel_scales(rounded), scales)


def _net():
    import paddle

    paddle.seed(3)
    return paddle.nn.Sequential(paddle.nn.Conv2D(3, 16, 3, padding=1), paddle.nn.ReLU(),
                                paddle.nn.Conv2D(16, 16, 3, padding=1, groups=16), paddle.nn.ReLU(),
                                paddle.nn.Conv2D(16, 24, 1), paddle.nn.ReLU(),
                                paddle.nn.Conv2D(24, 8, 3, padding=1, bias_attr=False))


def _first_layer(name, layer):
    return "reads the image" if layer._in_channels == 3 else ""


def test_round_to_int8_grid_rounds_the_dense_convs_and_reports_a_lower_error():
    net = _net()
    net.eval()
    batches = [np.random.default_rng(i).normal(size=(2, 3, 12, 16)).astype("float32") for i in range(3)]
    before = {name: p.numpy().copy() for name, p in net.named_parameters()}
    report = wr.round_to_int8_grid(net, batches, skip=_first_layer)
    assert [layer.layer for layer in report.layers] == ["4", "6"]  # depth-wise "2" is no dense conv
    assert set(report.skipped) == {"0"}
    assert np.array_equal(net[0].weight.numpy(), before["0.weight"])  # skipped: untouched
    for index in ("4", "6"):
        weight = getattr(net, index).weight.numpy().astype("float64").reshape(net[int(index)].weight.shape[0], -1)
        scales = wr.channel_scales(weight)
        off_grid = np.abs(weight - wr.nearest_rounding(weight, scales)) / scales[:, None]
        assert off_grid.max() < 1e-4  # float32 storage of q * scale
    assert all(layer.error_gptq < layer.error_nearest for layer in report.layers)
    assert not np.array_equal(net[4].bias.numpy(), before["4.bias"])  # the bias absorbed part of the error


def _weight_values(conv):
    """The float weights an OpenVINO conv computes with: its weight input evaluated (int8 * scale after NNCF)."""
    import openvino

    from export.backends import openvino_runtime as ovr

    weights = openvino.Model([conv.input_value(1)], [], "weights")
    return ovr.ov_core().compile_model(weights, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({})[0]


def test_nncf_reproduces_the_rounded_weights_exactly_after_export_and_folding(tmp_path):
    import paddle

    from export.backends import openvino_runtime as ovr

    net = _net()
    net.eval()
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(2, 3, 12, 16)).astype("float32") for _ in range(3)]
    wr.round_to_int8_grid(net, batches, skip=_first_layer)
    spec = [paddle.static.InputSpec([None, 3, None, None], "float32", "x")]
    paddle.jit.save(net, str(tmp_path / "inference"), input_spec=spec)
    model = ovr.ov_core().read_model(str(tmp_path / "inference.pdmodel"))
    quantized, _ = ovr.nncf_quantize(model, [{"x": b} for b in batches], "det")
    weights = {tuple(values.shape): values for values in
               (_weight_values(op) for op in quantized.get_ops() if op.get_type_name() == "Convolution")}
    assert len(weights) == 3
    for layer in (net[4], net[6]):
        expected = layer.weight.numpy()
        assert np.abs(weights[tuple(expected.shape)] - expected).max() <= 1e-6 * np.abs(expected).max()
    first = net[0].weight.numpy()  # not rounded: NNCF's grid moves it
    assert np.abs(weights[tuple(first.shape)] - first).max() > 1e-4 * np.abs(first).max()


def _onnx_int8_weights(path):
    """The float weights an ONNX QDQ model's convs compute with: int8 initializer x per-channel scale, by shape."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        q = init.get(node.input[0])
        if node.op_type == "DequantizeLinear" and q is not None and q.ndim == 4 and q.dtype == np.int8:
            scale = init[node.input[1]].astype("float64")
            weights[q.shape] = q.astype("float64") * scale.reshape(-1, 1, 1, 1)
    return weights


def test_onnx_runtime_reproduces_the_rounded_weights_exactly_without_reduce_range(tmp_path):
    import paddle

    from compress.quant.onnx_int8 import export_onnx, quantize_onnx

    net = _net()
    net.eval()
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(2, 3, 12, 16)).astype("float32") for _ in range(3)]
    unrounded = net[4].weight.numpy().copy()
    wr.round_to_int8_grid(net, batches, skip=_first_layer)
    spec = [paddle.static.InputSpec([None, 3, None, None], "float32", "x")]
    paddle.jit.save(net, str(tmp_path / "inference"), input_spec=spec)
    float_onnx = export_onnx(str(tmp_path), str(tmp_path / "model_fp32.onnx"))
    int8 = quantize_onnx(float_onnx, str(tmp_path / "model_int8.onnx"), [{"x": b} for b in batches],
                         reduce_range=False, min_macs_per_element=0)
    weights = _onnx_int8_weights(int8.int8_onnx)
    for layer in (net[4], net[6]):
        expected = layer.weight.numpy()
        assert np.abs(weights[tuple(expected.shape)] - expected).max() <= 1e-6 * np.abs(expected).max()
    assert np.abs(weights[unrounded.shape] - unrounded).max() > 1e-3 * np.abs(unrounded).max()  # GPTQ moved them


def test_openvino_leaves_the_convs_nncf_keeps_float_or_quantizes_on_another_grid():
    import types

    import paddle

    from export.backends import openvino_runtime as ovr

    options = types.SimpleNamespace(openvino_float_op_types=ovr.FLOAT_OP_TYPES, openvino_min_macs_per_element=0.0)
    skip = ovr.OpenVino().weight_rounding_skip(options)
    image, dense, light = paddle.nn.Conv2D(3, 16, 3), paddle.nn.Conv2D(16, 32, 1), paddle.nn.Conv2D(16, 4, 1)
    assert "reads the image" in skip("stem", image)
    assert skip("pw", dense) == "" and skip("light", light) == ""
    skip = ovr.OpenVino().weight_rounding_skip(types.SimpleNamespace(
        openvino_float_op_types=ovr.FLOAT_OP_TYPES, openvino_min_macs_per_element=10.0))
    assert skip("pw", dense) == "" and "light conv" in skip("light", light)  # 16*4/(16+4) = 3.2 < 10 <= 10.7
    skip = ovr.OpenVino().weight_rounding_skip(types.SimpleNamespace(
        openvino_float_op_types=("Convolution",), openvino_min_macs_per_element=0.0))
    assert "keeps Convolution float" in skip("pw", dense)


def test_the_quant_stage_exports_a_rounded_copy_and_leaves_its_model_as_it_was(tmp_path):
    import types

    import paddle

    from compress.config import InputConfig
    from compress.stages.quant import QuantConfig, QuantStage
    from export.predictor import DeployConfig, create_predictor

    net = _net()
    net.eval()
    before = {name: value.numpy().copy() for name, value in net.state_dict().items()}
    rng = np.random.default_rng(0)
    calib = [{"x": rng.normal(size=(2, 3, 12, 16)).astype("float32")} for _ in range(3)]
    ctx = types.SimpleNamespace(model_cfg=types.SimpleNamespace(Input=InputConfig(name="x"), task="det"),
                                task=types.SimpleNamespace(show_progress=False))
    cfg = QuantConfig(backends=["openvino"], weight_rounding="gptq")
    folder, record = QuantStage()._gptq_rounded(net, calib, cfg, ctx, str(tmp_path), "openvino")
    assert all(np.array_equal(value.numpy(), before[name]) for name, value in net.state_dict().items())
    assert [layer["layer"] for layer in record["layers"]] == ["4", "6"] and "GPTQ-rounded" in record["summary"]
    exported = create_predictor(folder, DeployConfig(backend="paddle_cpu", precision="fp32")).run(calib[0])[0]
    unrounded = net(paddle.to_tensor(calib[0]["x"])).numpy()
    difference = np.abs(exported - unrounded).max()
    assert 1e-6 * np.abs(unrounded).max() < difference < 0.05 * np.abs(unrounded).max()  # the rounded copy
