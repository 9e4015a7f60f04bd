"""Export: jit.save with dynamic dims, deploy configs (TensorRT ranges, validation), parity, the stage, infer CLI."""
import dataclasses
import logging
import os
import shutil
import sys
import types

import numpy as np
import pytest
import yaml

import export.stage  # noqa: F401  (registers the stage)
from compress.checkpoint import Manifest
from compress.config import InputConfig, ModelConfig, parse_section
from compress.errors import ConfigError, InputError
from compress.runner import StageContext
from compress.stages.base import STAGES
from export import deploy as deploy_mod
from export.deploy import build_deploy_config, plan_dynamic_shapes, read_deploy_bundle, validate_trt_settings, \
    write_deploy_bundle
from export.exporter import ParityTolerance, compare_outputs, export_inference_model, export_parity
from export.predictor import DeployConfig, TrtConfig, create_predictor, detect_capabilities
from export.stage import ExportConfig, ExportStage
from tests.helpers.dummy_stages import TINY_DET_ARCH

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DET_INPUT = InputConfig(name="x", example_shape=(3, 640, 640), min_shape=(3, 64, 64), opt_shape=(3, 640, 640),
                        max_shape=(3, 1280, 1280), max_batch_size=1)
REC_INPUT = InputConfig(name="x", example_shape=(3, 48, 320), min_shape=(3, 48, 32), opt_shape=(3, 48, 320),
                        max_shape=(3, 48, 1280), max_batch_size=8)
TINY_INPUT = InputConfig(name="x", example_shape=(3, 64, 64), min_shape=(3, 32, 32), opt_shape=(3, 64, 64),
                         max_shape=(3, 128, 128), max_batch_size=2)
CUDA = detect_capabilities().cuda


@pytest.fixture(autouse=True)
def one_thread():
    from paddle.base import core
    core.set_num_threads(1)


def tiny_det(seed=0):
    import paddle
    from compress.models import build_model

    paddle.seed(seed)
    return build_model(TINY_DET_ARCH, {"random": True})


def map_net(seed=0):
    """A plain two-conv net with a det-like output (N, 1, H, W); exports in well under a second."""
    import paddle

    paddle.seed(seed)
    net = paddle.nn.Sequential(paddle.nn.Conv2D(3, 4, 3, padding=1), paddle.nn.ReLU(), paddle.nn.Conv2D(4, 1, 1),
                               paddle.nn.Sigmoid())
    net.eval()
    return net


def images(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype("float32") for shape in shapes]


def tiny_model_cfg():
    raw = {"Global": {"task": "det"}, "Architecture": TINY_DET_ARCH, "Weights": {"random": True},
           "PostProcess": {"name": "DBPostProcess", "thresh": 0.3, "box_thresh": 0.6},
           "Metric": {"name": "DetMetric"},
           "Eval": {"data_dir": "none", "label_file": "none.txt", "transforms": [
               {"DecodeImage": {"img_mode": "BGR"}}, {"DetLabelEncode": None},
               {"DetResizeForTest": {"limit_side_len": 64, "limit_type": "max"}},
               {"NormalizeImage": {"scale": "1./255.", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                   "order": "hwc"}},
               {"ToCHWImage": None}, {"KeepKeys": {"keep_keys": ["image", "shape", "polys", "ignore_tags"]}}]},
           "Input": {"name": "x", "example_shape": [3, 64, 64], "min_shape": [3, 32, 32],
                     "opt_shape": [3, 64, 64], "max_shape": [3, 128, 128], "max_batch_size": 2},
           "source_file": "tiny.yml", "base_dir": ROOT}
    return parse_section(ModelConfig, raw, "tiny.yml")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny ppocr-built det net exported once for the module."""
    model = tiny_det()
    folder = str(tmp_path_factory.mktemp("tiny_export"))
    files = export_inference_model(model, folder, TINY_INPUT, "det")
    return model, folder, files


# ---------------------------------------------------------------------------------------------- exporter


def test_export_detects_files_and_keeps_dygraph_model(exported):
    from compress.tasks import dygraph_predictor

    model, folder, files = exported
    assert os.path.dirname(files.model_file) == folder and os.path.isfile(files.params_file)
    assert files.format in ("pdmodel", "json")
    assert not hasattr(model.forward, "concrete_program")  # jit.save did not swap in a static forward
    batch = images((1, 3, 64, 64))[0]
    first = dygraph_predictor(model)(batch)
    assert np.array_equal(first, dygraph_predictor(model)(batch))


def test_exported_det_has_dynamic_batch_height_width(exported):
    model, folder, _ = exported
    report = export_parity(model, folder, DeployConfig(), images((1, 3, 64, 64), (2, 3, 96, 128)), task="det")
    assert report.passed and report.samples == 3 and report.backend == "paddle_cpu"
    assert report.max_abs_diff < 1e-4 and report.mean_abs_diff <= report.max_abs_diff


def test_export_parity_fails_for_other_weights(exported):
    _, folder, _ = exported
    report = export_parity(tiny_det(seed=5), folder, DeployConfig(), images((1, 3, 64, 64)), task="det")
    assert not report.passed and "max |diff|" in report.detail


def test_onnx_export_and_parity(exported, tmp_path):
    from export.onnx_export import export_to_onnx, onnx_parity

    _, folder, _ = exported
    result = export_to_onnx(folder, str(tmp_path / "model.onnx"), opset=13)
    assert result.bytes > 0 and result.opset >= 13
    report = onnx_parity(folder, result.path, images((1, 3, 64, 64), (1, 3, 32, 96)), task="det")
    assert report.passed and report.backend == "onnxruntime" and report.max_abs_diff < 1e-4


def test_int8_parity_judges_decoded_results():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 10, 6)).astype("float32")
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    same = compare_outputs([probs], [probs + 1e-3], "rec", "int8")
    assert same.passed and same.agreement["sequence_agreement"] == 1.0
    scrambled = compare_outputs([probs], [probs[:, ::-1, :].copy()], "rec", "int8",
                                ParityTolerance(int8_rec_sequence_agreement=0.9))
    assert not scrambled.passed and "string agreement" in scrambled.detail
    det_map = rng.uniform(size=(1, 1, 8, 8)).astype("float32")
    assert compare_outputs([det_map], [det_map * 0.98], "det", "int8").passed
    assert not compare_outputs([det_map], [1 - det_map], "det", "int8").passed


# ---------------------------------------------------------------------------------------------- deploy configs


def test_trt_dynamic_shapes_for_det_and_rec_inputs():
    assert plan_dynamic_shapes("det", DET_INPUT) == {"x": ((1, 3, 64, 64), (1, 3, 640, 640), (1, 3, 1280, 1280))}
    assert plan_dynamic_shapes("rec", REC_INPUT) == {"x": ((1, 3, 48, 32), (8, 3, 48, 320), (8, 3, 48, 1280))}
    for task, input_cfg in (("det", DET_INPUT), ("rec", REC_INPUT)):
        deploy = build_deploy_config(task, input_cfg, "paddle_trt", "int8")
        assert deploy.trt.use_calib_mode is False and deploy.trt.max_batch_size == input_cfg.max_batch_size
        assert deploy.trt.dynamic_shapes == plan_dynamic_shapes(task, input_cfg)
        validate_trt_settings(deploy, input_cfg)


def test_rec_height_must_stay_fixed():
    bad = dataclasses.replace(REC_INPUT, max_shape=(3, 64, 1280))
    with pytest.raises(ConfigError, match="max_shape: dim 1 is 64 .* fixes it at 48"):
        plan_dynamic_shapes("rec", bad)
    plan_dynamic_shapes("det", dataclasses.replace(DET_INPUT, max_shape=(3, 64, 1280)))  # det H is dynamic


@pytest.mark.parametrize("trt, problem", [
    (TrtConfig(dynamic_shapes={"x": ((1, 3, 48, 320), (1, 3, 48, 32), (1, 3, 48, 1280))}), "dim 3 needs"),
    (TrtConfig(max_batch_size=2, dynamic_shapes={"x": ((1, 3, 48, 32), (2, 3, 48, 320), (4, 3, 48, 1280))}),
     "max batch 4 exceeds max_batch_size 2"),
    (TrtConfig(dynamic_shapes={"image": ((1, 3, 48, 32), (1, 3, 48, 320), (1, 3, 48, 1280))}),
     "no range for input 'x'"),
    (TrtConfig(dynamic_shapes={"x": ((1, 1, 48, 32), (1, 1, 48, 320), (1, 1, 48, 1280))}), "channels must stay 3"),
    (TrtConfig(use_calib_mode=True, dynamic_shapes={"x": ((1, 3, 48, 32), (1, 3, 48, 320), (1, 3, 48, 1280))}),
     "use_calib_mode must be false"),
])
def test_validate_trt_settings_rejects(trt, problem):
    deploy = DeployConfig(backend="paddle_trt", precision="int8", trt=trt)
    with pytest.raises(ConfigError, match=problem):
        validate_trt_settings(deploy, REC_INPUT)


def test_deploy_config_passes_and_precisions():
    rec = build_deploy_config("rec", REC_INPUT, "paddle_cpu", "fp32")
    assert "self_attention_fuse_pass" in rec.delete_passes
    assert "conv_transpose_eltwiseadd_bn_fuse_pass" in build_deploy_config("det", DET_INPUT, "paddle_cpu",
                                                                           "fp32").delete_passes
    assert rec.trt == TrtConfig()  # TensorRT settings only on paddle_trt
    with pytest.raises(ConfigError, match="fp16 needs a GPU backend"):
        build_deploy_config("rec", REC_INPUT, "paddle_cpu", "fp16")


@pytest.mark.skipif(CUDA, reason="checks the CPU fallback of a CPU-only Paddle build")
def test_trt_deploy_falls_back_to_cpu_with_a_logged_notice(exported, caplog):
    _, folder, _ = exported
    deploy = build_deploy_config("det", TINY_INPUT, "paddle_trt", "fp32")
    with caplog.at_level(logging.WARNING, logger="export.predictor"):
        predictor = create_predictor(folder, deploy)
    assert predictor.backend == "paddle_cpu" and "no CUDA" in predictor.fallback_reason
    assert any("paddle_trt is not available" in r.getMessage() for r in caplog.records)
    assert predictor.run({"x": images((1, 3, 64, 64))[0]})[0].shape == (1, 1, 64, 64)


def test_deploy_bundle_round_trip(exported, tmp_path):
    _, folder, _ = exported
    out = str(tmp_path / "bundle")
    shutil.copytree(folder, out)
    model_cfg = tiny_model_cfg()
    deploys = [build_deploy_config("det", model_cfg.Input, b, "fp32") for b in ("paddle_cpu", "paddle_trt")]
    deploys.append(build_deploy_config("det", model_cfg.Input, "paddle_trt", "fp16"))
    write_deploy_bundle(out, model_cfg, "fp32", deploys, None, deploy_mod.shape_range_plan(out, "tiny.yml"))
    bundle = read_deploy_bundle(out)
    assert bundle.task == "det" and bundle.backends() == ["paddle_cpu", "paddle_trt", "paddle_trt_fp16"]
    assert bundle.deploy("paddle_trt") == deploys[1] and bundle.deploy() == deploys[0]
    assert [next(iter(op)) for op in bundle.preprocess] == ["DetResizeForTest", "NormalizeImage", "ToCHWImage",
                                                             "KeepKeys"]
    assert bundle.data["ShapeRangeTuning"]["collected"] is False
    assert "python -m export.deploy --collect-shape-ranges" in bundle.data["ShapeRangeTuning"]["note"]
    with pytest.raises(InputError, match="no deploy config for backend 'onnxruntime'"):
        bundle.deploy("onnxruntime")
    with open(os.path.join(out, "deploy_paddle_cpu.yml"), "a") as handle:
        handle.write("thread: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'threads'"):
        bundle.deploy("paddle_cpu")


def test_shape_range_collection(exported, tmp_path):
    _, folder, _ = exported
    if not CUDA:
        with pytest.raises(InputError, match="needs paddlepaddle-gpu"):
            deploy_mod.collect_shape_range_file(folder, images((1, 3, 64, 64)), str(tmp_path / "r.pbtxt"))
    path = deploy_mod.collect_shape_range_file(folder, images((1, 3, 32, 32), (2, 3, 96, 128)),
                                               str(tmp_path / "r.pbtxt"), allow_cpu=True)
    text = open(path).read()
    assert 'name: "x"' in text and "max_shape: 2" in text and "max_shape: 128" in text


# ---------------------------------------------------------------------------------------------- stage


def test_export_config_is_strict():
    with pytest.raises(ConfigError, match="did you mean 'backends'"):
        parse_section(ExportConfig, {"backend": ["paddle_cpu"]}, "Export")
    with pytest.raises(ConfigError, match=r"Export.backends: unknown inference backend 'tensorrt'; valid: .*paddle_trt"):
        parse_section(ExportConfig, {"backends": ["tensorrt"]}, "Export")
    with pytest.raises(ConfigError, match=r"fp16 needs a GPU backend \(paddle_gpu, paddle_trt\)"):
        parse_section(ExportConfig, {"backends": ["paddle_cpu"], "precisions": ["fp32", "fp16"]}, "Export")
    with pytest.raises(ConfigError, match="opset"):
        parse_section(ExportConfig, {"opset": 20}, "Export")
    assert STAGES.get("export") is ExportStage and "quant" in ExportStage.allowed_after


class FakeTask:
    task = "det"

    def input_batches(self, split, batch_size=None, limit=None):
        yield from images(*[(1, 3, 64, 64)] * (limit or 2), seed=3)


class FakeManifest:
    """The manifest's reading side over hand-written entries (no checksums to verify)."""

    weight_stages = Manifest.weight_stages

    def __init__(self, entries):
        self.data = {"pipeline": [*entries, "export"]}
        self._entries = entries

    def entry(self, stage, model):
        return self._entries.get(stage)


def fake_ctx(tmp_path, entries):
    """What ExportStage uses of StageContext: a manifest with earlier entries and their folders."""
    dirs = {stage: str(tmp_path / "stages" / stage) for stage in entries}
    ctx = types.SimpleNamespace(model_name="det", model_cfg=tiny_model_cfg(), task=FakeTask(),
                                out_dir=str(tmp_path / "out"), manifest=FakeManifest(entries),
                                stage_entry=entries.get, stage_dir=dirs.__getitem__, global_cfg=None)
    ctx.baseline_model = types.MethodType(StageContext.baseline_model, ctx)
    return ctx


def test_stage_exports_head_baseline_and_int8(exported, tmp_path):
    import paddle

    head, folder, _ = exported  # the exported folder stands in for the INT8 model of the head
    baseline = tiny_det(seed=2)
    done = {"status": "done", "files": {"model.pdparams": "x"}}
    ctx = fake_ctx(tmp_path, {"baseline": done, "prune": done, "quant": {"status": "done", "files": {}}})
    os.makedirs(ctx.stage_dir("baseline"))
    paddle.save(baseline.state_dict(), os.path.join(ctx.stage_dir("baseline"), "model.pdparams"))
    shutil.copytree(folder, os.path.join(ctx.stage_dir("quant"), "int8"))
    cfg = parse_section(ExportConfig, {"backends": ["paddle_cpu", "paddle_trt"], "parity_samples": 2}, "Export")

    result = ExportStage().run(head, cfg, ctx)

    assert result.passed, result.message
    assert result.model is head and not result.weights_changed
    for sub in ("fp32", "baseline_fp32", "int8"):
        bundle = read_deploy_bundle(os.path.join(ctx.out_dir, sub))
        assert bundle.backends() == ["paddle_cpu", "paddle_trt"]
        assert result.metrics[f"{sub}/paddle_bytes"] > 0
    assert read_deploy_bundle(os.path.join(ctx.out_dir, "int8")).deploy("paddle_trt").precision == "int8"
    assert result.metrics["fp32/paddle_cpu/max_abs_diff"] < 1e-4
    assert "int8/paddle_cpu/binary_map_agreement" in result.metrics
    if not CUDA:
        assert result.metrics["fp32/paddle_trt/ran_as"] == "paddle_cpu"
    parity = export.stage.load_parity(ctx.out_dir)
    assert parity["failures"] == [] and "baseline_fp32/paddle_cpu" in parity["reports"]
    # the baseline export holds the baseline weights, not the head's
    from export.exporter import predictor_outputs
    from compress.tasks import dygraph_predictor
    batch = images((1, 3, 64, 64))
    out, _ = predictor_outputs(os.path.join(ctx.out_dir, "baseline_fp32"), DeployConfig(), batch)
    assert np.abs(out[0] - dygraph_predictor(baseline)(batch[0])).max() < 1e-4


def test_quant_onnx_int8_is_found_from_metadata_or_name(tmp_path):
    from export.backends import ExportFolder
    from export.backends.onnx_runtime import quant_onnx_int8

    def found(metadata):
        return quant_onnx_int8(ExportFolder("int8", str(tmp_path / "out"), None, quant_dir=str(tmp_path),
                                            quant_metadata=metadata))

    (tmp_path / "int8_onnx").mkdir()
    assert found({}) is None
    (tmp_path / "int8_onnx" / "model_fp32.onnx").write_bytes(b"f")
    (tmp_path / "int8_onnx" / "model_int8.onnx").write_bytes(b"q")
    (tmp_path / "int8_onnx" / "custom.onnx").write_bytes(b"c")
    assert found({}).endswith("model_int8.onnx")
    assert found({"backends": {"onnxruntime": {"dir": "int8_onnx", "files": {"int8": "custom.onnx"}}}}).endswith(
        "custom.onnx")


def test_stage_gate_fails_when_parity_is_out_of_tolerance(tmp_path):
    ctx = fake_ctx(tmp_path, {"baseline": {"status": "done", "files": {"model.pdparams": "x"}}})
    cfg = parse_section(ExportConfig, {"backends": ["paddle_cpu"], "parity_samples": 1,
                                       "fp32_max_abs_diff": 1e-12}, "Export")
    result = ExportStage().run(map_net(), cfg, ctx)
    assert not result.passed and "fp32/paddle_cpu" in result.message and "Export.backends" in result.message
    # no quant stage and no weight change since the baseline: only fp32/ is exported
    assert result.metrics["exported"] == "fp32" and not os.path.exists(os.path.join(ctx.out_dir, "int8"))
    assert "current weights are the baseline's" in export.stage.load_parity(ctx.out_dir)["notes"][0]


# ---------------------------------------------------------------------------------------------- infer CLI


def run_infer(argv, capsys):
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        import infer
    finally:
        sys.path.pop(0)
    code = infer.main(argv)
    return code, capsys.readouterr()


def test_infer_cli_bad_paths(tmp_path, capsys):
    image = tmp_path / "page.png"
    image.write_bytes(b"not really")
    code, out = run_infer(["--det", str(tmp_path / "nope"), "--rec", str(tmp_path), "--image", str(image)], capsys)
    assert code == 2 and out.err.count("\n") == 1 and "does not exist" in out.err
    code, out = run_infer(["--det", str(tmp_path), "--rec", str(tmp_path), "--image", str(tmp_path / "x.png")],
                          capsys)
    assert code == 2 and "--image" in out.err and "no such file" in out.err
    code, out = run_infer(["--det", str(tmp_path), "--rec", str(tmp_path), "--folder", str(tmp_path / "empty")],
                          capsys)
    assert code == 2 and "no such folder" in out.err


def test_infer_cli_rejects_swapped_folders(exported, tmp_path, capsys):
    _, folder, _ = exported
    det = str(tmp_path / "det")
    shutil.copytree(folder, det)
    write_deploy_bundle(det, tiny_model_cfg(), "fp32", [build_deploy_config("det", TINY_INPUT, "paddle_cpu",
                                                                            "fp32")])
    image = tmp_path / "page.png"
    import cv2
    cv2.imwrite(str(image), np.full((64, 64, 3), 255, np.uint8))
    code, out = run_infer(["--det", det, "--rec", det, "--image", str(image)], capsys)
    assert code == 2 and "Model.task is det" in out.err
    with open(os.path.join(det, "deploy.yml")) as handle:
        assert yaml.safe_load(handle)["Model"]["task"] == "det"
