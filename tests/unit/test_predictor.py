"""export.predictor: model file detection, DeployConfig round trip, CPU fallback of GPU/TensorRT configs."""
import json
import logging

import numpy as np
import pytest

from compress.errors import ConfigError, InputError
from export import predictor as pred
from export.predictor import DeployConfig, TrtConfig, create_predictor, find_model_files


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import paddle

    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3, padding=1), paddle.nn.ReLU(), paddle.nn.Conv2D(4, 2, 1))
    net.eval()
    folder = tmp_path_factory.mktemp("tiny_pred")
    spec = [paddle.static.InputSpec([None, 3, 8, 8], "float32", "x")]
    paddle.jit.save(net, str(folder / "inference"), input_spec=spec)
    return str(folder)


def _touch(path):
    path.write_bytes(b"")
    return str(path)


def test_find_model_files_pdmodel(tmp_path):
    model = _touch(tmp_path / "inference.pdmodel")
    params = _touch(tmp_path / "inference.pdiparams")
    _touch(tmp_path / "inference.pdiparams.info")
    assert find_model_files(tmp_path) == pred.ModelFiles(model, params, "pdmodel")


def test_find_model_files_pir_json_needs_params_beside_it(tmp_path):
    _touch(tmp_path / "config.json")  # an unrelated JSON is not a model
    model = _touch(tmp_path / "model.json")
    params = _touch(tmp_path / "model.pdiparams")
    assert find_model_files(tmp_path) == pred.ModelFiles(model, params, "json")


def test_find_model_files_prefers_paddle_then_inference_name(tmp_path):
    _touch(tmp_path / "model.onnx")
    _touch(tmp_path / "other.pdmodel")
    preferred = _touch(tmp_path / "inference.pdmodel")
    assert find_model_files(tmp_path).model_file == preferred
    onnx_only = tmp_path / "onnx"
    onnx_only.mkdir()
    onnx_file = _touch(onnx_only / "m.onnx")
    assert find_model_files(onnx_only) == pred.ModelFiles(onnx_file, None, "onnx")
    assert find_model_files(onnx_file).format == "onnx"


def test_find_model_files_errors(tmp_path):
    with pytest.raises(InputError, match="no inference model"):
        find_model_files(tmp_path)
    _touch(tmp_path / "a.pdmodel")
    _touch(tmp_path / "b.pdmodel")
    with pytest.raises(InputError, match="several models"):
        find_model_files(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        find_model_files(tmp_path / "missing")


def test_deploy_config_round_trip_through_json():
    config = DeployConfig(backend="paddle_trt", precision="int8", threads=2, delete_passes=("fc_fuse_pass",),
                          trt=TrtConfig(max_batch_size=4, use_static=True, cache_dir="/tmp/trt",
                                        dynamic_shapes={"x": ((1, 3, 48, 10), (1, 3, 48, 320), (8, 3, 48, 2000))}))
    restored = DeployConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config


def test_deploy_config_rejects_unknown_keys_and_values():
    with pytest.raises(ConfigError, match="did you mean 'threads'"):
        DeployConfig.from_dict({"thread": 2})
    with pytest.raises(ConfigError, match="Deploy.trt.workspace"):
        DeployConfig.from_dict({"trt": {"workspace": 1}})
    with pytest.raises(ConfigError, match="paddle_cpu"):
        DeployConfig(backend="tensorrt")
    with pytest.raises(ConfigError, match="fp32"):
        DeployConfig(precision="int4")


def test_trt_config_falls_back_to_cpu_with_one_notice(tiny_model_dir, caplog):
    if pred.detect_capabilities().tensorrt:
        pytest.skip("this machine can run TensorRT")
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    reference = create_predictor(tiny_model_dir, DeployConfig()).run({"x": x})[0]
    trt = TrtConfig(dynamic_shapes={"x": ((1, 3, 8, 8), (1, 3, 8, 8), (4, 3, 8, 8))})
    with caplog.at_level(logging.WARNING, logger="export.predictor"):
        predictor = create_predictor(tiny_model_dir, DeployConfig(backend="paddle_trt", trt=trt))
    notices = [r for r in caplog.records if r.name == "export.predictor"]
    assert len(notices) == 1 and "paddle_trt" in notices[0].getMessage()
    assert predictor.backend in ("paddle_cpu", "paddle_gpu") and predictor.fallback_reason
    np.testing.assert_allclose(predictor.run({"x": x})[0], reference, rtol=1e-5, atol=1e-5)


def test_resolve_backend_uses_detected_capabilities():
    no_gpu = pred.Capabilities(cuda=False, gpu_count=0, tensorrt=False, ort_providers=())
    gpu_no_trt = pred.Capabilities(cuda=True, gpu_count=1, tensorrt=False, ort_providers=())
    assert pred.resolve_backend(DeployConfig(backend="paddle_gpu"), no_gpu)[0] == "paddle_cpu"
    backend, reason = pred.resolve_backend(DeployConfig(backend="paddle_trt"), gpu_no_trt)
    assert backend == "paddle_gpu" and "TensorRT" in reason
    assert pred.resolve_backend(DeployConfig(), no_gpu) == ("paddle_cpu", None)


def test_predictor_checks_inputs_and_formats(tiny_model_dir):
    predictor = create_predictor(tiny_model_dir, DeployConfig(mkldnn=False))
    assert predictor.input_names == ["x"]
    with pytest.raises(InputError, match="missing"):
        predictor.run({"image": np.zeros((1, 3, 8, 8), np.float32)})
    with pytest.raises(InputError, match="onnx"):
        create_predictor(tiny_model_dir, DeployConfig(backend="onnxruntime"))
