"""ONNX graph rewrites of the ONNX Runtime INT8 recipes, on tiny hand-built ONNX models."""
import compress  # noqa: F401  (imports zlib before onnxruntime)

import numpy as np
import pytest

from compress.errors import ConfigError, InputError
from compress.quant import onnx_int8


def _model(nodes, initializers, channels=4, size=8):
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.asarray(value, np.float32), name) for name, value in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def _run(model, x):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _x(seed=0, batch=2, channels=4, size=8):
    return np.random.default_rng(seed).normal(size=(batch, channels, size, size)).astype(np.float32)


def _bn_params(rng, prefix, channels):
    return {f"{prefix}_gamma": rng.uniform(0.5, 2, channels), f"{prefix}_beta": rng.normal(size=channels),
            f"{prefix}_mean": rng.normal(size=channels), f"{prefix}_var": rng.uniform(0.5, 2, channels)}


def _bn(prefix, source, output):
    from onnx import helper

    return helper.make_node("BatchNormalization", [source] + [f"{prefix}_{k}" for k in ("gamma", "beta", "mean", "var")],
                            [output], epsilon=1e-5)


def test_fold_batch_norms_into_conv_and_conv_transpose_keeps_outputs():
    from onnx import helper

    rng = np.random.default_rng(0)
    initializers = {"w": rng.normal(size=(6, 4, 3, 3)), "b": rng.normal(size=6), "wt": rng.normal(size=(6, 3, 2, 2)),
                    **_bn_params(rng, "bn1", 6), **_bn_params(rng, "bn2", 3)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), _bn("bn1", "c", "n"),
             helper.make_node("ConvTranspose", ["n", "wt"], ["t"], strides=[2, 2]), _bn("bn2", "t", "y")]
    model = _model(nodes, initializers)
    expected = _run(model, _x())
    assert onnx_int8.fold_batch_norms(model) == 2
    assert [node.op_type for node in model.graph.node] == ["Conv", "ConvTranspose"]
    np.testing.assert_allclose(_run(model, _x()), expected, rtol=1e-4, atol=1e-4)


def test_fold_batch_norms_leaves_shared_conv_outputs_alone():
    from onnx import helper

    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), _bn("bn", "c", "n"), helper.make_node("Add", ["c", "n"], ["y"])]
    model = _model(nodes, {"w": rng.normal(size=(4, 4, 1, 1)), **_bn_params(rng, "bn", 4)})
    assert onnx_int8.fold_batch_norms(model) == 0
    assert "BatchNormalization" in [node.op_type for node in model.graph.node]


def test_decompose_hard_swish_is_exact():
    from onnx import helper

    model = _model([helper.make_node("HardSwish", ["x"], ["y"])], {})
    x = _x() * 4
    expected = _run(model, x)
    assert onnx_int8.decompose_hard_swish(model) == 1
    assert sorted(node.op_type for node in model.graph.node) == ["HardSigmoid", "Mul"]
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-6, atol=1e-6)


def _block_model(rng):
    """conv -> HardSwish -> * s -> + b -> padded depthwise conv -> conv: PP-LCNetV3's pattern after folding."""
    from onnx import helper

    initializers = {"w1": rng.normal(0, 0.5, (8, 4, 1, 1)), "b1": rng.normal(0, 0.1, 8), "scale": [1.3],
                    "shift": [0.4], "wd": rng.normal(0, 0.5, (8, 1, 3, 3)), "bd": rng.normal(0, 0.1, 8),
                    "w2": rng.normal(0, 0.5, (4, 8, 1, 1)), "b2": rng.normal(0, 0.1, 4)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1"),
             helper.make_node("HardSwish", ["c1"], ["h"], name="hard_swish"),
             helper.make_node("Mul", ["h", "scale"], ["m"], name="scale"),
             helper.make_node("Add", ["m", "shift"], ["a"], name="shift"),
             helper.make_node("Conv", ["a", "wd", "bd"], ["d"], group=8, pads=[1, 1, 1, 1], name="depthwise"),
             helper.make_node("Conv", ["d", "w2", "b2"], ["y"], name="conv2")]
    return _model(nodes, initializers)


def _relative_error(candidate, reference):
    return float(np.abs(candidate - reference).mean() / np.abs(reference).mean())


@pytest.fixture(scope="module")
def block_onnx(tmp_path_factory):
    import onnx

    path = str(tmp_path_factory.mktemp("block") / "float.onnx")
    onnx.save(_block_model(np.random.default_rng(2)), path)
    return path


def _calibration(count=4):
    return [{"x": _x(seed)} for seed in range(count)]


def test_full_recipe_keeps_activations_uint8_and_close_to_float(block_onnx, tmp_path):
    import onnx

    result = onnx_int8.quantize_onnx(block_onnx, str(tmp_path / "int8.onnx"), _calibration(), recipe="full",
                                     reduce_range=True)
    ops = [node.op_type for node in onnx.load(result.int8_onnx).graph.node]
    assert result.recipe == "full"
    assert "HardSigmoid" not in ops and "HardSwish" not in ops
    assert ops.count("QLinearLeakyRelu") == 1  # the HardSwish gate as a lookup table
    assert "QLinearAdd" not in ops and ops.count("QLinearMul") == 1  # scalar affine folded; x * gate is left
    assert ops.count("QLinearConv") == 3
    x = _x(seed=9)
    reference = _run(onnx.load(block_onnx), x)
    assert _relative_error(_run(onnx.load(result.int8_onnx), x), reference) < 0.05


def test_graph_rewrites_change_outputs_by_about_one_quantisation_step(block_onnx, tmp_path):
    """Rewriting the QOperator graph must compute what it computed before, up to uint8 rounding."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    prepared = str(tmp_path / "prepared.onnx")
    model = onnx.load(block_onnx)
    onnx_int8.decompose_hard_swish(model)
    onnx.save(model, prepared)
    quantized_path = str(tmp_path / "qop.onnx")
    quantize_static(prepared, quantized_path, onnx_int8._Reader(_calibration()), quant_format=QuantFormat.QOperator,
                    per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, extra_options={"WeightSymmetric": True})
    quantized = onnx.load(quantized_path)
    x = _x(seed=5)
    before = _run(quantized, x)
    assert onnx_int8.hard_sigmoid_to_lookup(quantized) == 1
    after_lookup = _run(quantized, x)
    assert onnx_int8.fold_scalar_requantize(quantized) == 2
    after_fold = _run(quantized, x)
    step = float(np.abs(before).max()) / 127
    assert np.abs(after_lookup - before).mean() < step
    assert np.abs(after_fold - before).mean() < step
    assert _relative_error(after_fold, _run(onnx.load(block_onnx), x)) < 0.05
    used = {name for node in quantized.graph.node for name in node.input}
    assert all(init.name in used for init in quantized.graph.initializer)


def test_auto_recipe_reports_both_errors_and_keeps_one(block_onnx, tmp_path):
    result = onnx_int8.quantize_onnx(block_onnx, str(tmp_path / "int8.onnx"), _calibration(), recipe="auto")
    assert set(result.calibration_error) == {"dense", "full"}
    keep_full = result.calibration_error["full"] <= (onnx_int8.FULL_RECIPE_ERROR_TOLERANCE
                                                     * result.calibration_error["dense"])
    assert result.recipe == ("full" if keep_full else "dense")


def test_excluded_nodes_stay_float(block_onnx, tmp_path):
    import onnx

    dense = onnx_int8.dense_conv_and_matmul_nodes(onnx_int8.constants_to_initializers(onnx.load(block_onnx)))
    assert len(dense) == 2  # the two 1x1 convs; the depthwise conv is never selected
    result = onnx_int8.quantize_onnx(block_onnx, str(tmp_path / "int8.onnx"), _calibration(), exclude=dense[:1])
    assert result.quantized_nodes == 1
    model = onnx.load(result.int8_onnx)
    weights = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    convs = {node.name: node for node in model.graph.node if node.op_type == "Conv"}
    assert convs[dense[0]].input[1] not in weights  # float weight straight from the initializer
    assert convs[dense[1]].input[1] in weights  # int8 weight through DequantizeLinear
    with pytest.raises(InputError, match="no dense conv"):
        onnx_int8.quantize_onnx(block_onnx, str(tmp_path / "none.onnx"), _calibration(), exclude=dense)


def test_unknown_recipe_is_a_config_error(block_onnx, tmp_path):
    with pytest.raises(ConfigError, match="recipe"):
        onnx_int8.quantize_onnx(block_onnx, str(tmp_path / "int8.onnx"), _calibration(), recipe="fast")


def test_resize_to_common_shape_uses_the_most_common_size():
    batches = [{"x": np.zeros((1, 3, 32, 64), np.float32)}, {"x": np.ones((1, 3, 32, 64), np.float32)},
               {"x": np.arange(3 * 64 * 96, dtype=np.float32).reshape(1, 3, 64, 96)}]
    resized = onnx_int8.resize_to_common_shape(batches)
    assert [batch["x"].shape for batch in resized] == [(1, 3, 32, 64)] * 3
    assert resized[2]["x"][0, 0, 0, 0] == 0 and resized[2]["x"][0, 0, 1, 1] == batches[2]["x"][0, 0, 2, 1]
    assert onnx_int8.resize_to_common_shape(batches[:2]) is not None


def _conv_chain(rng, specs, channels=4):
    """x -> conv -> conv ..., each spec (name, out_channels, kernel, stride); padded so sizes stay simple."""
    from onnx import helper

    nodes, initializers, source, in_channels = [], {}, "x", channels
    for position, (name, out_channels, kernel, stride) in enumerate(specs):
        output = "y" if position == len(specs) - 1 else f"{name}_out"
        initializers[f"{name}_w"] = rng.normal(0, 0.3, (out_channels, in_channels, kernel, kernel))
        nodes.append(helper.make_node("Conv", [source, f"{name}_w"], [output], name=name, strides=[stride, stride],
                                      pads=[kernel // 2] * 4))
        source, in_channels = output, out_channels
    return _model(nodes, initializers, channels=channels)


def test_dense_selection_keeps_light_convs_float():
    rng = np.random.default_rng(3)
    # multiply-adds per input + output element: 4*64/68 = 3.8, 64*64/128 = 32, 64*64*9/(64*4 + 64) = 115
    model = _conv_chain(rng, [("widen", 64, 1, 1), ("pointwise", 64, 1, 1), ("strided3x3", 64, 3, 2)])
    assert onnx_int8.dense_conv_and_matmul_nodes(model) == ["strided3x3"]
    assert onnx_int8.dense_conv_and_matmul_nodes(model, min_macs_per_element=30) == ["pointwise", "strided3x3"]
    assert onnx_int8.dense_conv_and_matmul_nodes(model, min_macs_per_element=0) == ["widen", "pointwise",
                                                                                     "strided3x3"]
    light_only = _conv_chain(rng, [("widen", 8, 1, 1), ("narrow", 4, 1, 1)])
    assert onnx_int8.dense_conv_and_matmul_nodes(light_only) == ["widen", "narrow"]  # nothing heavy: all of them


def test_float_weights_stored_as_fp16_are_folded_at_session_creation(tmp_path):
    import onnx
    import onnxruntime
    from onnx import helper

    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], group=4, pads=[1, 1, 1, 1]),
             helper.make_node("ConvTranspose", ["c", "wt", "bt"], ["y"], strides=[2, 2])]
    model = _model(nodes, {"w": rng.normal(size=(4, 1, 3, 3)), "b": rng.normal(size=4),
                           "wt": rng.normal(size=(4, 2, 2, 2)), "bt": rng.normal(size=2)})
    x = _x()
    expected = _run(model, x)
    assert onnx_int8.store_float_weights_as_fp16(model) == 4
    assert {init.data_type for init in model.graph.initializer} == {onnx.TensorProto.FLOAT16}
    assert _relative_error(_run(model, x), expected) < 1e-3  # float16 rounding of the weights only
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    assert "Cast" not in [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def test_dense_recipe_folds_batch_norm_into_the_int8_conv(tmp_path):
    import onnx
    from onnx import helper

    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"), _bn("bn", "c", "n"),
             helper.make_node("Relu", ["n"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2")]
    path = str(tmp_path / "float.onnx")
    onnx.save(_model(nodes, {"w1": rng.normal(size=(8, 4, 1, 1)), "w2": rng.normal(size=(4, 8, 1, 1)),
                             **_bn_params(rng, "bn", 8)}), path)
    result = onnx_int8.quantize_onnx(path, str(tmp_path / "int8.onnx"), _calibration(), reduce_range=True)
    int8 = onnx.load(result.int8_onnx)
    assert "BatchNormalization" not in [node.op_type for node in int8.graph.node]
    x = _x(seed=7)
    assert _relative_error(_run(int8, x), _run(onnx.load(path), x)) < 0.05
