"""PTQ, affine folding and ONNX Runtime INT8 on a tiny conv net exported with paddle.jit.save."""
import os

import numpy as np
import pytest

from compress.errors import ConfigError, InputError
from compress.quant import ptq
from compress.quant.fold import fold_affine_into_conv
from export.predictor import DeployConfig, create_predictor


def _tiny_net():
    import paddle

    from tests.unit.test_qat import AffineBlock

    class Tiny(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.stem = paddle.nn.Conv2D(3, 8, 3, padding=1)
            self.stem_affine = AffineBlock(1.3, 0.1)
            self.act_affine = AffineBlock(0.9, -0.2)
            self.depthwise = paddle.nn.Conv2D(8, 8, 3, padding=1, groups=8)
            self.dw_affine = AffineBlock(1.1, 0.05)
            self.pre_pw_affine = AffineBlock(0.8, 0.3)
            self.pointwise = paddle.nn.Conv2D(8, 16, 1)
            self.head = paddle.nn.Conv2D(16, 4, 1)

        def forward(self, x):
            x = self.act_affine(paddle.nn.functional.hardswish(self.stem_affine(self.stem(x))))
            x = self.pre_pw_affine(paddle.nn.functional.hardswish(self.dw_affine(self.depthwise(x))))
            return self.head(paddle.nn.functional.relu(self.pointwise(x)))

    return Tiny()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import paddle

    paddle.seed(0)
    net = _tiny_net()
    net.eval()
    folder = tmp_path_factory.mktemp("tiny")
    paddle.jit.save(net, str(folder / "inference"),
                    input_spec=[paddle.static.InputSpec([None, 3, 16, 16], "float32", "x")])
    return str(folder)


def _batches(count, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(batch, 3, 16, 16)).astype(np.float32)} for _ in range(count)]


def _run(model_dir, deploy, batch):
    return create_predictor(model_dir, deploy).run(batch)[0]


def test_fold_removes_affine_ops_and_keeps_outputs(tiny_model_dir, tmp_path):
    result = fold_affine_into_conv(tiny_model_dir, str(tmp_path / "folded"))
    # stem and depthwise: mul + add each folded forward; pre-pointwise affine folded into the 1x1 conv
    assert result.folded_after_conv == 4
    assert result.folded_before_conv == 2
    batch = _batches(1, seed=3)[0]
    reference = _run(tiny_model_dir, DeployConfig(mkldnn=False), batch)
    folded = _run(result.model_dir, DeployConfig(mkldnn=False), batch)
    np.testing.assert_allclose(folded, reference, rtol=1e-4, atol=1e-5)


def test_ptq_int8_predictor_close_to_float(tiny_model_dir, tmp_path):
    result = ptq.quantize_post_static(tiny_model_dir, str(tmp_path / "int8"), _batches(4), algo="abs_max")
    assert os.path.exists(os.path.join(result.model_dir, "inference.pdmodel"))
    assert result.calibration_batches == 4 and result.onnx_format
    batch = _batches(1, seed=5)[0]
    reference = _run(tiny_model_dir, DeployConfig(mkldnn=False), batch)
    quantized = _run(result.model_dir, DeployConfig(precision="int8"), batch)
    relative_error = np.abs(quantized - reference).mean() / np.abs(reference).mean()
    assert relative_error < 0.05
    assert not np.array_equal(quantized, reference)  # it really ran quantised


def test_ptq_stores_int8_weights_in_onnx_format(tiny_model_dir, tmp_path):
    qdq = ptq.quantize_post_static(tiny_model_dir, str(tmp_path / "qdq"), _batches(2), algo="abs_max")
    fake = ptq.quantize_post_static(tiny_model_dir, str(tmp_path / "fake"), _batches(2), algo="abs_max",
                                    onnx_format=False)
    layers = ptq.list_quantizable_layers(tiny_model_dir)
    assert {_weight_dtype(qdq.model_dir, name) for name in layers} == {np.int8}
    assert {_weight_dtype(fake.model_dir, name) for name in layers} == {np.float32}


def _weight_dtype(model_dir, name):
    import paddle

    scope = paddle.static.Scope()
    with ptq.static_mode(), paddle.static.scope_guard(scope):
        paddle.static.load_inference_model(os.path.join(model_dir, "inference"),
                                           paddle.static.Executor(paddle.CPUPlace()))
        return np.array(scope.find_var(name).get_tensor()).dtype.type


def test_skip_tensor_list_keeps_layer_float(tiny_model_dir, tmp_path):
    layers = ptq.list_quantizable_layers(tiny_model_dir)
    assert len(layers) == 4
    result = ptq.quantize_post_static(tiny_model_dir, str(tmp_path / "skip"), _batches(2), algo="abs_max",
                                      skip_tensor_list=[layers[0]])
    assert result.skipped_layers == (layers[0],)
    quantized_weights = _dequantized_weight_names(result.model_dir)
    assert layers[0] not in quantized_weights
    assert set(layers[1:]) <= quantized_weights


def _dequantized_weight_names(model_dir):
    import paddle

    with ptq.static_mode(), paddle.static.scope_guard(paddle.static.Scope()):
        program, _, _ = paddle.static.load_inference_model(os.path.join(model_dir, "inference"),
                                                           paddle.static.Executor(paddle.CPUPlace()))
    return {op.input("X")[0] for op in program.global_block().ops if op.type == "dequantize_linear"}


def test_ptq_with_fallback_skips_most_sensitive_layers(tiny_model_dir, tmp_path):
    batch = _batches(1, seed=9)[0]
    reference = _run(tiny_model_dir, DeployConfig(mkldnn=False), batch)

    def negative_error(model_dir):
        return -float(np.abs(_run(model_dir, DeployConfig(precision="int8"), batch) - reference).mean())

    unreachable = ptq.ptq_with_fallback(tiny_model_dir, str(tmp_path / "fb"), _batches(2), negative_error,
                                        max_drop=-1.0, max_skipped=2, algo="abs_max")
    assert len(unreachable.skipped_layers) == 2 and not unreachable.met_budget
    assert [count for count, _ in unreachable.history] == [0, 1, 2]
    relaxed = ptq.ptq_with_fallback(tiny_model_dir, str(tmp_path / "fb2"), _batches(2), negative_error,
                                    max_drop=1.0, algo="abs_max")
    assert relaxed.met_budget and relaxed.skipped_layers == ()


def test_layer_sensitivity_ranks_every_layer(tiny_model_dir):
    batch = _batches(1, seed=9)[0]
    reference = _run(tiny_model_dir, DeployConfig(mkldnn=False), batch)

    def negative_error(model_dir):
        return -float(np.abs(_run(model_dir, DeployConfig(precision="int8"), batch) - reference).mean())

    ranking = ptq.layer_quant_sensitivity(tiny_model_dir, _batches(2), negative_error, mode="one_at_a_time",
                                          algo="abs_max")
    assert sorted(item.layer for item in ranking) == sorted(ptq.list_quantizable_layers(tiny_model_dir))
    assert [item.gain for item in ranking] == sorted((item.gain for item in ranking), reverse=True)


def test_calibration_data_errors(tiny_model_dir, tmp_path):
    with pytest.raises(InputError, match="empty"):
        ptq.quantize_post_static(tiny_model_dir, str(tmp_path / "q"), [])
    with pytest.raises(InputError, match="lacks model inputs"):
        ptq.quantize_post_static(tiny_model_dir, str(tmp_path / "q"), [{"image": np.zeros((1, 3, 16, 16))}])
    with pytest.raises(ConfigError, match="algo"):
        ptq.quantize_post_static(tiny_model_dir, str(tmp_path / "q"), _batches(1), algo="minmax")


def test_calibration_batches_accept_a_generator_function():
    batches = ptq.materialize_batches(lambda: (b for b in _batches(5)), batch_nums=3)
    assert len(batches) == 3


@pytest.mark.parametrize("recipe", ["dense", "full"])
def test_onnx_runtime_int8_close_to_float(tiny_model_dir, tmp_path, recipe):
    from compress.quant.onnx_int8 import build_onnx_int8

    result = build_onnx_int8(tiny_model_dir, str(tmp_path / "onnx"), _batches(4), recipe=recipe)
    batch = _batches(1, seed=5)[0]
    reference = _run(tiny_model_dir, DeployConfig(mkldnn=False), batch)
    float_out = _run(result.float_onnx, DeployConfig(backend="onnxruntime"), batch)
    int8_out = _run(result.int8_onnx, DeployConfig(backend="onnxruntime"), batch)
    np.testing.assert_allclose(float_out, reference, rtol=1e-4, atol=1e-4)
    assert np.abs(int8_out - reference).mean() / np.abs(reference).mean() < 0.05
    assert result.recipe == recipe
    assert (result.quantized_nodes > 0) == (recipe == "dense")


class _FlakyPool:
    """Stands in for a spawn Pool whose PTQ raises the given errors first, then returns "done"."""

    def __init__(self, errors, calls):
        self.errors, self.calls = errors, calls

    def apply(self, func, args, kwargs):
        self.calls.append(func.__name__)
        if self.errors:
            raise self.errors.pop(0)
        return "done"

    def close(self):
        pass

    def join(self):
        pass


def _flaky_context(monkeypatch, errors):
    import multiprocessing

    calls = []

    class _Context:
        def Pool(self, processes):  # noqa: N802 (multiprocessing's spelling)
            return _FlakyPool(errors, calls)

    monkeypatch.setattr(multiprocessing, "get_context", lambda method: _Context())
    return calls


CYCLE = ValueError("(InvalidArgument) Generated graph shouldn't contain cycle.")


def test_isolated_ptq_retries_the_random_graph_cycle_error(monkeypatch):
    calls = _flaky_context(monkeypatch, [CYCLE, CYCLE])
    assert ptq.quantize_post_static("model", "out", _batches(1)) == "done"
    assert calls == ["_quantize"] * 3


def test_isolated_ptq_gives_up_after_the_last_attempt_and_never_retries_other_errors(monkeypatch):
    calls = _flaky_context(monkeypatch, [CYCLE] * ptq.CYCLE_ATTEMPTS)
    with pytest.raises(ptq.GraphCycleError, match=r"failed 4 times .* Quant\.backends: \[onnxruntime\]") as error:
        ptq.quantize_post_static("model", "out", _batches(1))
    assert len(calls) == ptq.CYCLE_ATTEMPTS
    assert error.value.exit_code == 2 and "\n" not in str(error.value)  # one line from tools/run.py, no traceback
    calls = _flaky_context(monkeypatch, [ValueError("bad shape"), CYCLE])
    with pytest.raises(ValueError, match="bad shape"):
        ptq.quantize_post_static("model", "out", _batches(1))
    assert len(calls) == 1


def test_fallback_keeps_the_int8_model_when_the_ranking_hits_the_graph_cycle_error(monkeypatch):
    monkeypatch.setattr(ptq, "quantize_post_static", lambda *args, **kwargs: "int8")

    class _CyclingRanking:
        def __getitem__(self, index):
            raise ptq.GraphCycleError("Paddle PTQ failed 4 times")

    result = ptq.ptq_with_fallback("model", "out", _batches(1), lambda model_dir: 0.5 if model_dir == "model" else 0.4,
                                   max_drop=0.01, max_skipped=2, sensitivity=_CyclingRanking())
    assert result.quant == "int8" and result.quant_metric == 0.4 and not result.met_budget
    assert result.skipped_layers == () and result.history == [(0, 0.4)]
