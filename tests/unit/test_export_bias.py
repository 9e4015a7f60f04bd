"""The exporter adds conv biases as ``elementwise_add(conv out, bias, axis=1)`` as shipped PP-OCR programs do,
without the ``reshape2`` Paddle 2.6's ``paddle.jit.save`` puts in between, and computes the same outputs."""
import collections
import os
import shutil

import numpy as np
import pytest

from compress.config import InputConfig
from export.deploy import build_deploy_config
from export.exporter import CONV_OPS, export_inference_model, export_parity, fold_conv_bias_reshapes, \
    predictor_outputs
from export.predictor import DeployConfig

TINY_INPUT = InputConfig(name="x", example_shape=(3, 32, 32), min_shape=(3, 16, 16), opt_shape=(3, 32, 32),
                         max_shape=(3, 64, 64), max_batch_size=2)
# what paddle.jit.save writes for BiasNet, and the shipped-style program: the same minus one reshape2 per biased conv
JIT_SAVE_OPS = {"feed": 1, "conv2d": 2, "depthwise_conv2d": 1, "conv2d_transpose": 1, "reshape2": 3,
                "elementwise_add": 4, "batch_norm": 1, "relu": 2, "transpose2": 2, "matmul_v2": 1, "sigmoid": 1,
                "scale": 1, "fetch": 1}
SHIPPED_STYLE_OPS = {op: count for op, count in JIT_SAVE_OPS.items() if op != "reshape2"}


@pytest.fixture(autouse=True)
def one_thread():
    from paddle.base import core
    core.set_num_threads(1)


def bias_net(seed=0):
    """conv + bias, depthwise conv + bias, conv without bias, transposed conv + bias + BN, a Linear over channels."""
    import paddle

    class BiasNet(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = paddle.nn.Conv2D(3, 8, 3, padding=1)
            self.depthwise = paddle.nn.Conv2D(8, 8, 3, padding=1, groups=8)
            self.no_bias = paddle.nn.Conv2D(8, 8, 1, bias_attr=False)
            self.up = paddle.nn.Conv2DTranspose(8, 4, 2, stride=2)
            self.bn = paddle.nn.BatchNorm2D(4)
            self.linear = paddle.nn.Linear(4, 1)

        def forward(self, x):
            x = paddle.nn.functional.relu(self.conv(x))
            x = self.no_bias(self.depthwise(x))
            x = paddle.nn.functional.relu(self.bn(self.up(x)))
            x = self.linear(x.transpose([0, 2, 3, 1])).transpose([0, 3, 1, 2])
            return paddle.nn.functional.sigmoid(x)

    paddle.seed(seed)
    net = BiasNet()
    # non-trivial BN statistics and biases, so that a dropped or misplaced bias shows in the outputs
    for name, param in net.named_parameters():
        if name.endswith("bias") or name.startswith("bn."):
            param.set_value(paddle.uniform(param.shape, min=0.2, max=1.0, seed=seed + 1))
    net.bn._mean.set_value(paddle.uniform([4], min=-0.5, max=0.5, seed=seed + 2))
    net.bn._variance.set_value(paddle.uniform([4], min=0.5, max=2.0, seed=seed + 3))
    net.eval()
    return net


def op_list(model_file):
    """The program of a ``.pdmodel`` file and its block-0 ops (valid while the program is referenced)."""
    from paddle.base import core

    with open(model_file, "rb") as handle:
        program = core.ProgramDesc(handle.read())
    block = program.block(0)
    return program, [block.op(i) for i in range(block.op_size())]


def op_types(model_file):
    program, ops = op_list(model_file)  # noqa: F841  (program keeps the ops alive)
    return collections.Counter(op.type() for op in ops)


def images(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype("float32") for shape in shapes]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = bias_net()
    folder = str(tmp_path_factory.mktemp("bias_export"))
    return model, folder, export_inference_model(model, folder, TINY_INPUT, "det")


def test_conv_biases_are_added_without_reshape(exported):
    _, folder, files = exported
    assert files.folded_bias_reshapes == 3 and files.format == "pdmodel"
    assert sorted(os.listdir(folder)) == ["inference.pdiparams", "inference.pdiparams.info", "inference.pdmodel"]
    assert op_types(files.model_file) == SHIPPED_STYLE_OPS
    program, ops = op_list(files.model_file)
    producers = {name: op for op in ops for name in op.output_arg_names()}
    block = program.block(0)
    conv_adds = 0
    for add in (op for op in ops if op.type() == "elementwise_add"):
        source = producers.get(add.input("X")[0])
        if source is not None and source.type() in CONV_OPS:
            bias = block.find_var(add.input("Y")[0].encode())
            assert bias.persistable() and len(bias.shape()) == 1 and add.attr("axis") == 1
            conv_adds += 1
    assert conv_adds == 3
    assert not [name for name in (v.name() for v in block.all_vars()) if name.startswith("reshape2")]


@pytest.mark.parametrize("deploy", [DeployConfig(), build_deploy_config("det", TINY_INPUT, "paddle_cpu", "fp32"),
                                    DeployConfig(mkldnn=False)], ids=["default", "det_deploy", "native"])
def test_exported_outputs_equal_the_dygraph_outputs(exported, deploy):
    model, folder, _ = exported
    report = export_parity(model, folder, deploy, images((1, 3, 32, 32), (2, 3, 48, 64)), task="det")
    assert report.backend == "paddle_cpu" and report.samples == 3
    assert report.max_abs_diff < 1e-5, report


def test_rewritten_program_computes_what_jit_save_wrote(exported, tmp_path):
    """The raw ``paddle.jit.save`` program and its rewrite agree through Paddle Inference (oneDNN fuses the bias into
    the conv only in the rewrite, so the sums may round differently), and a second rewrite finds nothing to fold."""
    import paddle

    model, _, _ = exported
    raw, folded = tmp_path / "raw", tmp_path / "folded"
    spec = paddle.static.InputSpec([None, 3, None, None], "float32", "x")
    paddle.jit.save(model, str(raw / "inference"), input_spec=[spec])
    assert op_types(str(raw / "inference.pdmodel")) == JIT_SAVE_OPS
    shutil.copytree(raw, folded)
    assert fold_conv_bias_reshapes(str(folded / "inference.pdmodel")) == 3
    assert fold_conv_bias_reshapes(str(folded / "inference.pdmodel")) == 0
    assert (folded / "inference.pdiparams").read_bytes() == (raw / "inference.pdiparams").read_bytes()
    batches = images((1, 3, 32, 32), (2, 3, 16, 48), seed=3)
    for deploy in (DeployConfig(), DeployConfig(mkldnn=False)):
        before, _ = predictor_outputs(str(raw), deploy, batches)
        after, _ = predictor_outputs(str(folded), deploy, batches)
        assert max(float(np.abs(b - a).max()) for b, a in zip(before, after)) <= 1e-6


def test_other_reshapes_are_left_alone(tmp_path):
    """A bias reshape also used elsewhere, and one added to something no conv made, keep their reshape2."""
    import paddle

    class Shared(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = paddle.nn.Conv2D(3, 4, 1, bias_attr=False)
            self.shift = self.create_parameter([4], default_initializer=paddle.nn.initializer.Uniform(0.1, 0.9))
            self.offset = self.create_parameter([4], default_initializer=paddle.nn.initializer.Uniform(0.1, 0.9))

        def forward(self, x):
            shift = self.shift.reshape([1, 4, 1, 1])
            y = self.conv(x) + shift
            y = y * shift  # the reshape has two consumers
            return paddle.nn.functional.relu(y) + self.offset.reshape([1, 4, 1, 1])  # not after a conv

    paddle.seed(0)
    model = Shared()
    model.eval()
    files = export_inference_model(model, str(tmp_path), TINY_INPUT, "det")
    assert files.folded_bias_reshapes == 0
    assert op_types(files.model_file)["reshape2"] == 2
    report = export_parity(model, str(tmp_path), DeployConfig(), images((1, 3, 32, 32)), task="det")
    assert report.max_abs_diff < 1e-5


def test_an_unreadable_program_is_kept_as_it_is(tmp_path, caplog):
    path = tmp_path / "inference.pdmodel"
    path.write_bytes(b"not a program")
    assert fold_conv_bias_reshapes(str(path)) == 0
    assert path.read_bytes() == b"not a program" and "left" in caplog.text
