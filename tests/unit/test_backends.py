"""Backends as plug-ins: a backend registered from test code alone runs through the predictor, the deploy bundle,
the export config, the export stage (its own INT8 model and export hooks) and the A/B variant discovery; fallbacks
follow the chain; INT8 needs a recipe."""
import os
import shutil

import numpy as np
import pytest

from compress.config import parse_section
from compress.errors import ConfigError, InputError
from compress.compare.variants import discover_variants
from compress.stages.compare import CompareConfig
from compress.stages.quant import QuantConfig
from export.backends import BACKENDS, Backend, get_backend, register_backend
from export.backends.paddle_inference import copy_model
from export.deploy import build_deploy_config, read_deploy_bundle, write_deploy_bundle
from export.predictor import DeployConfig, create_predictor, resolve_backend
from export.stage import ExportConfig, ExportStage
from tests.unit.test_export import TINY_INPUT, fake_ctx, tiny_det, tiny_model_cfg


class Doubling(Backend):
    """Runs Paddle programs through the paddle_cpu backend and doubles every output (so a test can tell it ran)."""

    name = "test_doubling"
    formats = ("pdmodel",)
    summary = "test backend"
    calls = 0

    def create(self, files, deploy):
        run, inputs, outputs = get_backend("paddle_cpu").create(files, deploy)

        def doubled(feed):
            Doubling.calls += 1
            return [2 * out for out in run(feed)]
        return doubled, inputs, outputs


class Unavailable(Doubling):
    name = "test_unavailable"
    fallback = "test_doubling"

    def unavailable(self, capabilities):
        return "the test says so"


class WithInt8(Backend):
    """A backend with its own INT8 model (a Paddle model the quant stage left in ``int8_plugin/``), run by paddle_cpu;
    it records every export hook called."""

    name = "test_int8"
    formats = ("pdmodel",)
    int8_dir = "int8_plugin"
    summary = "test backend with an INT8 model"
    hooks = []

    def create(self, files, deploy):
        return get_backend("paddle_cpu").create(files, deploy)

    def dry_run_lines(self, ranges):
        return [f"  {self.name}: inputs {sorted(ranges)}"]

    def int8_source(self, folder):
        source = os.path.join(folder.quant_dir, self.int8_dir)
        return source if folder.quant_passed(self.name) and os.path.isdir(source) else None

    def export_model(self, folder, source=None):
        WithInt8.hooks.append((folder.name, "export_model", source))
        if source is None:
            return {}
        return {self.files_key: os.path.basename(copy_model(source, folder.path).model_file)}

    def finish_export(self, folder):
        WithInt8.hooks.append((folder.name, "finish_export", os.path.isfile(os.path.join(folder.path, "deploy.yml"))))


@pytest.fixture(scope="module", autouse=True)
def plugins():
    for cls in (Doubling, Unavailable):
        register_backend(cls)
    yield
    for cls in (Doubling, Unavailable):
        BACKENDS.unregister(cls.name)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import paddle

    folder = tmp_path_factory.mktemp("plugin_export")
    model = tiny_det()
    spec = [paddle.static.InputSpec([None, 3, None, None], "float32", "x")]
    paddle.jit.save(model, str(folder / "inference"), input_spec=spec)
    return str(folder)


def test_a_registered_backend_runs_through_create_predictor(exported):
    x = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
    reference = create_predictor(exported, DeployConfig()).run({"x": x})[0]
    before = Doubling.calls
    predictor = create_predictor(exported, DeployConfig(backend="test_doubling"))
    assert predictor.backend == "test_doubling" and predictor.fallback_reason is None
    np.testing.assert_array_equal(predictor.run({"x": x})[0], 2 * reference)
    assert Doubling.calls == before + 1
    with pytest.raises(InputError, match="test_doubling reads pdmodel models but .* holds onnx; use backend "
                                         "onnxruntime"):
        create_predictor(_fake_onnx(exported), DeployConfig(backend="test_doubling"))


def _fake_onnx(folder):
    import os

    path = os.path.join(folder, "other.onnx")
    open(path, "wb").close()
    return path


def test_an_unavailable_backend_falls_back_along_its_chain():
    assert resolve_backend(DeployConfig(backend="test_unavailable")) == ("test_doubling", "the test says so")
    orphan = type("Orphan", (Unavailable,), {"name": "test_orphan", "fallback": None})
    register_backend(orphan)
    try:
        with pytest.raises(InputError, match="deploy backend test_orphan cannot run here: the test says so"):
            resolve_backend(DeployConfig(backend="test_orphan"))
    finally:
        BACKENDS.unregister("test_orphan")


def test_configs_accept_registered_backends_and_name_the_valid_ones(exported):
    assert parse_section(ExportConfig, {"backends": ["test_doubling"]}, "Export").backends == ("test_doubling",)
    assert parse_section(CompareConfig, {"backends": ["test_doubling"]}, "Compare").backends == ("test_doubling",)
    with pytest.raises(ConfigError, match=r"Compare.backends: unknown inference backend 'test_doubing'; did you "
                                          r"mean 'test_doubling'\?"):
        parse_section(CompareConfig, {"backends": ["test_doubing"]}, "Compare")
    with pytest.raises(ConfigError, match="Quant.backends: test_doubling has no INT8 recipe; use onnxruntime"):
        parse_section(QuantConfig, {"backends": ["test_doubling"]}, "Quant")
    with pytest.raises(ConfigError, match="unknown inference backend"):
        DeployConfig(backend="test_nothing")


def test_a_deploy_bundle_and_the_ab_discovery_find_the_plugin(exported, tmp_path):
    import shutil

    folder = tmp_path / "export" / "fp32"
    shutil.copytree(exported, folder)
    deploys = [build_deploy_config("det", TINY_INPUT, name, "fp32") for name in ("paddle_cpu", "test_doubling")]
    write_deploy_bundle(str(folder), tiny_model_cfg(), "fp32", deploys)
    bundle = read_deploy_bundle(str(folder))
    assert bundle.deploy("test_doubling").backend == "test_doubling"
    assert bundle.model_path("test_doubling") == str(folder)
    with pytest.raises(InputError, match="lists no model backend onnxruntime reads"):
        bundle.model_path("onnxruntime")
    variants = discover_variants(str(tmp_path / "export"), backends=("test_doubling",), task="det")
    assert [(v.name, v.backend, v.precision) for v in variants] == [("fp32", "test_doubling", "fp32")]


def test_a_registered_backend_brings_its_int8_model_through_the_export(exported, tmp_path):
    metadata = {"backends": {"test_int8": {"dir": "int8_plugin"}}, "passed_backends": ["test_int8"]}
    ctx = fake_ctx(tmp_path, {"quant": {"status": "done", "files": {}, "metadata": metadata}})
    source = os.path.join(ctx.stage_dir("quant"), "int8_plugin")
    shutil.copytree(exported, source)
    register_backend(WithInt8)
    try:
        cfg = parse_section(ExportConfig, {"backends": ["test_int8"], "parity_samples": 1, "export_baseline": False},
                            "Export")
        assert "  test_int8: inputs ['x']" in ExportStage().dry_run(tiny_det(), cfg, ctx).splitlines()
        result = ExportStage().run(tiny_det(), cfg, ctx)
        assert result.passed, result.message
        assert WithInt8.hooks == [("fp32", "export_model", None), ("fp32", "finish_export", True),
                                  ("int8", "export_model", source), ("int8", "finish_export", True)]
        bundle = read_deploy_bundle(os.path.join(ctx.out_dir, "int8"))
        assert bundle.backends() == ["test_int8"] and bundle.deploy("test_int8").precision == "int8"
        assert bundle.data["Model"]["files"]["paddle"] == "inference.pdmodel"
        assert result.metrics["int8/test_int8/binary_map_agreement"] == pytest.approx(1.0)
    finally:
        BACKENDS.unregister("test_int8")


def test_an_int8_onnx_made_for_one_runtime_is_refused_by_the_others(exported, tmp_path):
    import shutil

    from export.backends.onnx_runtime import mark_int8_runtime
    from export.onnx_export import export_to_onnx

    folder = tmp_path / "m"
    shutil.copytree(exported, folder)
    onnx_file = export_to_onnx(str(folder), str(folder / "model.onnx")).path
    x = np.random.default_rng(1).normal(size=(1, 3, 64, 64)).astype(np.float32)
    float_out = create_predictor(onnx_file, DeployConfig(backend="openvino")).run({"x": x})[0]
    mark_int8_runtime(onnx_file, "onnxruntime")
    with pytest.raises(InputError, match=r"model.onnx is an INT8 model made for onnxruntime .*; run it with "
                                         r"onnxruntime, or use the openvino INT8 model of the export"):
        create_predictor(onnx_file, DeployConfig(backend="openvino"))
    marked_out = create_predictor(onnx_file, DeployConfig(backend="onnxruntime")).run({"x": x})[0]
    np.testing.assert_allclose(marked_out, float_out, atol=1e-4)  # the mark changes nothing else
