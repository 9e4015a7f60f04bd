"""Fold per-tensor affine ops (``x * s + b`` with constant scalars) into neighbouring convolutions.

PP-LCNetV3 (the PP-OCRv4 backbone) follows every re-parameterised conv with a "learnable affine block"
(``elementwise_mul`` by a 1-element parameter, then ``elementwise_add`` of another) and repeats the pair after
each ``hard_swish``. Neither Paddle's oneDNN passes nor ONNX Runtime fold these, so they cost ~20% of FP32 time
and, worse for INT8, they sit between conv and activation: oneDNN cannot fuse conv+hard_swish and every
quantised conv is wrapped in quantize/dequantize ops. Folding is exact:

* ``conv -> (+bias) -> *s -> +b``  becomes ``conv(W*s) + (bias*s + b)``;
* ``*s -> +b -> conv`` with zero padding becomes ``conv(W*s) + (bias + b*sum(W))`` (a padded conv would see
  ``b`` where it pads zeros, so padded convs are left alone).
"""
import dataclasses
import logging
import os

import numpy as np

from compress.quant.ptq import static_mode
from export.predictor import find_model_files

logger = logging.getLogger(__name__)

CONV_TYPES = ("conv2d", "depthwise_conv2d")


@dataclasses.dataclass
class FoldResult:
    """What :func:`fold_affine_into_conv` changed.

    Attributes:
        model_dir: folder holding the folded inference model.
        folded_after_conv: affine ops merged into the conv before them.
        folded_before_conv: affine ops merged into the (unpadded) conv after them.
    """

    model_dir: str
    folded_after_conv: int
    folded_before_conv: int


class _ProgramView:
    """Producer/consumer lookups and parameter access over one static program block."""

    def __init__(self, program, scope):
        self.block = program.global_block()
        self.scope = scope
        self.persistable = {v.name for v in program.list_vars() if v.persistable}

    def consumers(self, var_name):
        return [op for op in self.block.ops if var_name in op.input_arg_names]

    def producer(self, var_name):
        found = [op for op in self.block.ops if var_name in op.output_arg_names]
        return found[0] if len(found) == 1 else None

    def only_consumer(self, var_name):
        found = self.consumers(var_name)
        return found[0] if len(found) == 1 else None

    def param(self, name):
        return np.array(self.scope.find_var(name).get_tensor())

    def set_param(self, name, value):
        import paddle

        self.scope.find_var(name).get_tensor().set(value.astype(np.float32), paddle.CPUPlace())

    def single_use_param(self, name):
        return name in self.persistable and len(self.consumers(name)) == 1

    def scalar_operand(self, op):
        """For an elementwise op with one 1-element parameter operand: ``(value, activation input name)``."""
        if op.type not in ("elementwise_mul", "elementwise_add"):
            return None
        names = op.input("X") + op.input("Y")
        params = [n for n in names if n in self.persistable]
        acts = [n for n in names if n not in self.persistable]
        if len(params) != 1 or len(acts) != 1:
            return None
        value = self.param(params[0])
        if value.size != 1:
            return None
        return float(value.reshape(-1)[0]), acts[0]

    def conv_bias(self, conv):
        """``(elementwise_add op, bias parameter name)`` adding a per-channel bias right after ``conv``, or None.

        The bias is either a parameter (``axis=1``, older exports) or a ``reshape2`` of one (``paddle.jit.save``).
        """
        out = conv.output("Output")[0]
        add = self.only_consumer(out)
        if add is None or add.type != "elementwise_add" or add.input("X") != [out]:
            return None
        bias_name = add.input("Y")[0]
        channels = self.param(conv.input("Filter")[0]).shape[0]
        if bias_name in self.persistable:
            broadcast_per_channel = add.attr("axis") == 1
        else:
            reshape = self.producer(bias_name)
            if reshape is None or reshape.type != "reshape2" or len(self.consumers(bias_name)) != 1:
                return None
            broadcast_per_channel = list(reshape.attr("shape")) in ([1, channels, 1, 1], [channels, 1, 1])
            bias_name = reshape.input("X")[0]
        if not broadcast_per_channel or not self.single_use_param(bias_name):
            return None
        return (add, bias_name) if self.param(bias_name).size == channels else None

    def remove(self, op):
        index = list(self.block.ops).index(op)
        self.block._remove_op(index)


def _fold_one_after(view):
    """Fold one ``conv + bias -> *s | +b`` pair; returns how many affine ops were removed (0 when none left)."""
    for conv in list(view.block.ops):
        if conv.type not in CONV_TYPES or not view.single_use_param(conv.input("Filter")[0]):
            continue
        found = view.conv_bias(conv)
        if found is None:
            continue
        bias_add, bias_name = found
        affine = view.only_consumer(bias_add.output("Out")[0])
        operand = view.scalar_operand(affine) if affine is not None else None
        if operand is None:
            continue
        value, _ = operand
        filter_name = conv.input("Filter")[0]
        if affine.type == "elementwise_mul":
            view.set_param(filter_name, view.param(filter_name) * value)
            view.set_param(bias_name, view.param(bias_name) * value)
        else:
            view.set_param(bias_name, view.param(bias_name) + value)
        bias_add._rename_output(bias_add.output("Out")[0], affine.output("Out")[0])
        view.remove(affine)
        return 1
    return 0


def _is_unpadded(conv):
    if conv.has_attr("padding_algorithm") and conv.attr("padding_algorithm") == "SAME":
        return False
    return not any(conv.attr("paddings"))


def _fold_one_before(view):
    """Fold one ``*s | +b -> unpadded conv + bias`` pair; returns 1 when something was folded."""
    for conv in list(view.block.ops):
        if conv.type not in CONV_TYPES or not _is_unpadded(conv):
            continue
        if not view.single_use_param(conv.input("Filter")[0]):
            continue
        found = view.conv_bias(conv)
        x_name = conv.input("Input")[0]
        affine = view.producer(x_name)
        if found is None or affine is None or len(view.consumers(x_name)) != 1:
            continue
        bias_name = found[1]
        operand = view.scalar_operand(affine)
        if operand is None:
            continue
        value, source = operand
        filter_name = conv.input("Filter")[0]
        filters = view.param(filter_name)
        if affine.type == "elementwise_mul":
            view.set_param(filter_name, filters * value)
        else:
            view.set_param(bias_name, view.param(bias_name) + value * filters.sum(axis=(1, 2, 3)))
        conv._rename_input(x_name, source)
        view.remove(affine)
        return 1
    return 0


def fold_affine_into_conv(model_dir, out_dir):
    """Write a copy of a Paddle inference model with scalar affine ops folded into convolutions.

    The folded model computes the same function (max abs diff ~1e-5 on PP-OCRv4) with fewer ops, which
    speeds up FP32 and lets INT8 backends fuse conv + activation.

    Args:
        model_dir: folder of the float inference model (file names detected by ``find_model_files``).
        out_dir: folder to write ``inference.pdmodel`` / ``inference.pdiparams`` into.

    Returns:
        FoldResult with the counts of folded ops.

    Raises:
        InputError: when ``model_dir`` holds no inference model.
    """
    import paddle

    files = find_model_files(model_dir)
    scope = paddle.static.Scope()
    exe = paddle.static.Executor(paddle.CPUPlace())
    with static_mode(), paddle.static.scope_guard(scope):
        program, feed_names, fetch_vars = paddle.static.load_inference_model(
            os.path.dirname(files.model_file), exe, model_filename=os.path.basename(files.model_file),
            params_filename=os.path.basename(files.params_file) if files.params_file else None)
        view = _ProgramView(program, scope)
        after = _fold_all(view, _fold_one_after)
        before = _fold_all(view, _fold_one_before)
        os.makedirs(out_dir, exist_ok=True)
        feed_vars = [program.global_block().var(name) for name in feed_names]
        paddle.static.save_inference_model(os.path.join(out_dir, "inference"), feed_vars, fetch_vars, exe,
                                           program=program)
    logger.info("folded %d affine ops into the conv before them and %d into the conv after them",
                after, before)
    return FoldResult(out_dir, after, before)


def _fold_all(view, fold_one):
    total = 0
    while True:
        done = fold_one(view)
        if not done:
            return total
        total += done

