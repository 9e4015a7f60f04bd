"""ONNX Runtime INT8: paddle2onnx export (in a subprocess) and ONNX Runtime static quantisation.

Recipe measured on PP-OCRv4 (see ``benchmarks/bench_int8.py``):

1. fold the affine blocks into convs first (:func:`compress.quant.fold.fold_affine_into_conv`);
2. export with paddle2onnx in a child process (it can abort the whole process on some quantised graphs);
3. ``onnxruntime.quantization.quantize_static`` with U8 activations, S8 symmetric per-channel weights and
   ``Percentile`` (99.999) activation ranges: MinMax ranges let a few outliers stretch the scales (PP-OCRv4 rec on
   the demo Eval split: acc 0.877 with MinMax, 0.913 = float with Percentile). Two recipes:

   * ``dense`` (QDQ): MatMuls with weights and the dense convs (group 1, more than 3 input channels) that do at
     least :data:`MIN_MACS_PER_ELEMENT` multiply-adds per activation element, everything else float. Safe for every
     model. On AVX2 each INT8 conv pays for a quantize, a dequantize, NHWC transposes and a float HardSwish that a
     float conv would have fused (ONNX Runtime's CPU provider has no HardSwish kernel: it inlines HardSigmoid + Mul
     unless the op is fused into a float conv), so light convs (PP-OCRv4 det's first 1x1 convs at 320x320, the FPN
     1x1 convs) run faster float. BatchNormalization is folded into the conv before it (:func:`fold_batch_norms`),
     and (both recipes) the weights of the convs left float are stored as float16
     (:func:`store_float_weights_as_fp16`).
     ONNX Runtime's pre-optimisation is skipped: it inlines HardSwish before quantisation (a duplicated dequantize
     per activation);
   * ``full`` (QOperator): every op ONNX Runtime can quantise, so activations stay uint8 from conv to conv.
     BatchNormalization is folded into the Conv / ConvTranspose before it (:func:`fold_batch_norms`) and two
     rewrites remove what is left in float between convs: HardSigmoid (and HardSwish, decomposed into
     ``x * HardSigmoid(x)``) becomes a uint8 lookup table (:func:`hard_sigmoid_to_lookup`), and elementwise
     multiplies / adds by a scalar constant (PP-LCNetV3's affine blocks before padded depthwise convs) are folded
     into the quantisation parameters of the tensor before them (:func:`fold_scalar_requantize`). Faster (PP-OCRv4
     det 1.2x vs 1.1x for dense), but uint8 depthwise convs and elementwise ops cost accuracy: det hmean -1.9 to
     -2.1 points (dense -0.5), rec collapses;
   * ``auto`` builds both and keeps ``full`` when its output error on the calibration batches is at most
     ``FULL_RECIPE_ERROR_TOLERANCE`` times the ``dense`` one (twice the quantisation time; on PP-OCRv4 it keeps
     ``dense`` for both models, hence ``dense`` is the default);
4. on CPUs without VNNI, ``reduce_range=True`` (7-bit weights): the AVX2 u8*s8 kernels saturate 16-bit pair
   sums otherwise (PP-OCRv4 rec strings agreeing with float: 66% without, 94-97% with).

Measured (AMD EPYC 2 vCPU, AVX2 only, ONNX Runtime 1.31.1, batch 1, 1 thread, p50 of interleaved runs on a machine
shared with other jobs; ``python benchmarks/bench_int8.py --batches 1 --threads 1 --repeats 21 --rebuild``), speedup
vs the affine-folded float ONNX model; accuracy on the demo Eval split (float: rec acc 0.913, det hmean 0.975);
INT8 / float file size:

  =====  =======================================  ==========================================  ===============
  model  dense, every dense conv (before)          dense (now)                                 full
  =====  =======================================  ==========================================  ===============
  rec    1.28-1.31x, acc 0.910, size 0.292         1.33-1.34x, acc 0.917, size 0.277           1.27-1.32x, 0.007
  det    1.04-1.07x, hmean 0.969, size 0.325       1.11-1.13x, hmean 0.971, size 0.299         1.18-1.21x, 0.956
  =====  =======================================  ==========================================  ===============

1.5x is out of reach with these kernels: the float ops both models share (depthwise convs, adds, layout reorders,
resizes, ConvTranspose: ~30 of det's ~85 ms) stay, so even INT8 dense convs at 2x with no overhead at all would
leave det near 1.5x. Tried, did not help: INT8 depthwise convs (slower than the float ones, which fuse HardSwish;
rec profile 17.1 -> 18.2 ms); HardSwish as a uint8 lookup + QLinearMul after the dense convs only (rec acc 0.857);
DB head ConvTranspose as 1x1 conv + DepthToSpace (exact, but DepthToSpace costs more: float 0.96x, INT8 1.07x ->
0.96x); 1x1 convs as MatMul (outputs quantised anyway, float transposes: rec 1.31x -> 1.19x); folding the scalar
affine after HardSwish into the next quantize's scale / zero point (ONNX Runtime then left 9 of 14 INT8 depthwise
convs unfused, likely because the nudged input scale no longer matches the int32 bias scale); int8 weight-only
(``DequantizeLinear``) storage of float convs (not constant-folded: the conv runs unfused); INT8
squeeze-and-excitation convs kept whatever their size (no measurable time or size difference).
"""
import compress  # noqa: F401  (imports zlib before paddle/onnxruntime, see compress/__init__.py)

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from compress.errors import ConfigError, InputError
from compress.quant.ptq import materialize_batches
from export.predictor import find_model_files

logger = logging.getLogger(__name__)

_EXPORT_SCRIPT = """
import zlib, sys
import paddle2onnx
paddle2onnx.export(sys.argv[1], sys.argv[2], sys.argv[3], opset_version=int(sys.argv[4]),
                   enable_onnx_checker=True, verbose=False)
"""


def export_onnx(model_dir, onnx_path, opset_version=13, timeout_s=900):
    """Convert a Paddle inference model to ONNX with paddle2onnx, in a child process.

    Args:
        model_dir: Paddle inference model folder.
        onnx_path: output ``.onnx`` path.
        opset_version: minimum ONNX opset (paddle2onnx raises it when an op needs more).
        timeout_s: give up after this many seconds.

    Returns:
        ``onnx_path``.

    Raises:
        InputError: when paddle2onnx fails or crashes (the message carries the end of its output).
    """
    files = find_model_files(model_dir)
    if files.format == "onnx" or files.params_file is None:
        raise InputError(f"{model_dir!r} holds no Paddle program with params to convert to ONNX")
    os.makedirs(os.path.dirname(os.path.abspath(onnx_path)), exist_ok=True)
    command = [sys.executable, "-c", _EXPORT_SCRIPT, files.model_file, files.params_file, onnx_path,
               str(opset_version)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not os.path.exists(onnx_path):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise InputError(f"paddle2onnx could not convert {model_dir!r} (exit code {proc.returncode}): "
                         f"{' | '.join(tail)}; quantised models must use onnx_format=True")
    return onnx_path


def constants_to_initializers(model):
    """Move ``Constant`` nodes (paddle2onnx writes weights that way) into graph initializers, in place.

    ONNX Runtime's quantiser and fusions only recognise weights stored as initializers.
    """
    import onnx

    graph = model.graph
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return model


# A conv runs in INT8 only when it does at least this many multiply-adds per activation element it reads or writes:
# on AVX2 an INT8 conv costs a quantize before it, a dequantize after it, layout transposes, and its HardSwish as two
# float ops instead of one fused into the float conv, all proportional to its activations, while what it saves is
# proportional to its multiply-adds (the dequantize and HardSwish after PP-OCRv4 det's 16 -> 32 1x1 conv at 320x320
# alone took ~7 ms). Threshold sweep, speedup vs the float model, batch 1, 1 thread, one interleaved run each on a
# loaded machine: det every dense conv 1.04-1.07x, 25: 1.14x, 40: 1.16x, 50: 1.15-1.17x, 80: 1.15x, 100: 1.14x;
# rec 1.28-1.31x, 25: 1.31x, 40: 1.33x, 50: 1.31-1.34x, 70: 1.31x, 100: 1.29x.
MIN_MACS_PER_ELEMENT = 40


def macs_per_element(in_channels, out_channels, kernel, stride):
    """Multiply-adds of a group-1 conv per activation element it reads or writes (:data:`MIN_MACS_PER_ELEMENT`)."""
    return in_channels * out_channels * int(np.prod(kernel)) / (in_channels * stride + out_channels)


def dense_conv_and_matmul_nodes(model, min_macs_per_element=MIN_MACS_PER_ELEMENT):
    """Names of the nodes worth running in INT8: MatMuls with a weight, and group-1 convs with more than 3 input
    channels doing at least ``min_macs_per_element`` multiply-adds per input plus output element (see
    :data:`MIN_MACS_PER_ELEMENT`). When no conv reaches that (a small model), every such conv is selected: the
    caller asked for an INT8 model."""
    from onnx import numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    matmuls, heavy, light = [], [], []
    for node in model.graph.node:
        if node.op_type == "MatMul" and any(name in weights for name in node.input):
            matmuls.append(node.name)
        if node.op_type != "Conv" or node.input[1] not in weights:
            continue
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        out_channels, in_channels, *kernel = numpy_helper.to_array(weights[node.input[1]]).shape
        if group != 1 or in_channels <= 3:
            continue
        stride = int(np.prod(_attribute(node, "strides", [1] * len(kernel))))
        work = macs_per_element(in_channels, out_channels, kernel, stride)
        (heavy if work >= min_macs_per_element else light).append(node.name)
    if heavy and light:
        logger.info("ONNX INT8: %d light convs kept float (< %s multiply-adds per element)", len(light),
                    min_macs_per_element)
    selected = set(matmuls + (heavy or light))
    return [node.name for node in model.graph.node if node.name in selected]


def cpu_has_vnni():
    """True when the CPU has AVX512-VNNI or AVX-VNNI (int8 dot products without 16-bit saturation)."""
    try:
        with open("/proc/cpuinfo", encoding="utf8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# ------------------------------------------------------------------------------------------------ float rewrites


class _GraphIndex:
    """Producer / consumer / initializer lookups over an ONNX graph (rebuild after every edit)."""

    def __init__(self, graph):
        from onnx import numpy_helper

        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.producer = {name: node for node in graph.node for name in node.output}
        self.consumers = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {output.name for output in graph.output}
        self._to_array = numpy_helper.to_array

    def value(self, name):
        return self._to_array(self.initializers[name])

    def set_value(self, name, array):
        from onnx import numpy_helper

        self.initializers[name].CopyFrom(numpy_helper.from_array(np.asarray(array), name))

    def only_consumer(self, name):
        found = self.consumers.get(name, [])
        return found[0] if len(found) == 1 and name not in self.graph_outputs else None


def _attribute(node, name, default):
    from onnx import helper

    found = [helper.get_attribute_value(attr) for attr in node.attribute if attr.name == name]
    return found[0] if found else default


def fold_batch_norms(model):
    """Fold inference BatchNormalization nodes into the Conv / ConvTranspose (group 1) before them, in place.

    ``BN(conv(x, W) + b) = conv(x, W * k) + (b - mean) * k + beta`` with ``k = gamma / sqrt(var + eps)`` per output
    channel. ONNX Runtime does this itself for float convs, but not for a quantised conv (nor for ConvTranspose),
    where the BN would stay a float op between dequantize and quantize.

    Returns:
        number of BatchNormalization nodes removed.
    """
    graph, folded = model.graph, 0
    index = _GraphIndex(graph)
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or _attribute(bn, "training_mode", 0):
            continue
        conv = index.producer.get(bn.input[0])
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or index.only_consumer(conv.output[0]) is not bn:
            continue
        params = [name for name in list(conv.input[1:]) + list(bn.input[1:]) if name]
        if not all(name in index.initializers and len(index.consumers[name]) == 1 for name in params):
            continue
        if conv.op_type == "ConvTranspose" and _attribute(conv, "group", 1) != 1:
            continue
        gamma, beta, mean, var = (index.value(name).astype(np.float64) for name in bn.input[1:5])
        k = gamma / np.sqrt(var + _attribute(bn, "epsilon", 1e-5))
        weight = index.value(conv.input[1])
        axis = 0 if conv.op_type == "Conv" else 1
        shape = [1] * weight.ndim
        shape[axis] = -1
        bias = index.value(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(len(k))
        index.set_value(conv.input[1], (weight * k.reshape(shape)).astype(weight.dtype))
        new_bias = ((bias - mean) * k + beta).astype(np.float32)
        if len(conv.input) > 2 and conv.input[2]:
            index.set_value(conv.input[2], new_bias)
        else:
            from onnx import numpy_helper

            bias_name = f"{conv.output[0]}_folded_bn_bias"
            graph.initializer.append(numpy_helper.from_array(new_bias, bias_name))
            del conv.input[2:]
            conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        graph.node.remove(bn)
        folded += 1
        index = _GraphIndex(graph)
    return folded


def decompose_hard_swish(model):
    """Rewrite ``HardSwish(x)`` as ``x * HardSigmoid(x, alpha=1/6, beta=0.5)``, in place.

    ONNX Runtime has no quantised HardSwish; as a Mul of a HardSigmoid it quantises into QLinearMul plus a lookup
    table (:func:`hard_sigmoid_to_lookup`). Returns the number of rewritten nodes.
    """
    from onnx import helper

    graph, nodes, rewritten = model.graph, [], 0
    for node in graph.node:
        if node.op_type != "HardSwish" or node.domain not in ("", "ai.onnx"):
            nodes.append(node)
            continue
        gate = f"{node.output[0]}_hard_sigmoid"
        nodes.append(helper.make_node("HardSigmoid", [node.input[0]], [gate], name=gate, alpha=1.0 / 6, beta=0.5))
        nodes.append(helper.make_node("Mul", [node.input[0], gate], [node.output[0]], name=f"{gate}_mul"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten


def store_float_weights_as_fp16(model):
    """Store the weights and biases of the convs left float as float16 initializers behind a ``Cast``, in place.

    Halves what the depthwise, first and light convs add to an INT8 file. ONNX Runtime folds the ``Cast`` at session
    creation (constant folding), so the float convs run exactly as before on float32 weights rounded to float16
    (relative error 2^-11); a ``DequantizeLinear`` (int8 weight-only) would not be folded and would turn those convs
    into slow unfused ones. Returns the number of initializers converted.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph, converted = model.graph, 0
    index = _GraphIndex(graph)
    graph_inputs = {value.name for value in graph.input}
    for node in list(graph.node):
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        for name in node.input[1:3]:
            init = index.initializers.get(name)
            if init is None or init.data_type != onnx.TensorProto.FLOAT or name in graph_inputs \
                    or len(index.consumers[name]) != 1:
                continue
            value = numpy_helper.to_array(init)
            if np.abs(value).max(initial=0) > np.finfo(np.float16).max:
                continue
            half = f"{name}_fp16"
            graph.initializer.append(numpy_helper.from_array(value.astype(np.float16), half))
            graph.node.insert(list(graph.node).index(node),
                              helper.make_node("Cast", [half], [name], name=f"{half}_cast", to=onnx.TensorProto.FLOAT))
            graph.initializer.remove(init)
            converted += 1
    return converted


def store_int8_weights(onnx_path, weight_bits=8):
    """Store a paddle2onnx QAT model's weights as int8, in place on disk; returns the number of weights stored.

    paddle2onnx writes each quantised weight as a float constant followed by ``QuantizeLinear``, so the file is as
    large as the float model (PP-OCRv4 rec: 10.96 MB vs 10.80 MB float). The quantize is computed here once and
    its int8 result stored as the ``DequantizeLinear`` input, which ONNX Runtime would otherwise compute at load
    time: the same model, a quarter of the size.

    With ``weight_bits=7`` the integers are also re-rounded to [-63, 63] (scale x 127/63). ONNX Runtime's AVX2
    u8 x s8 kernels (CPUs without VNNI) add pairs of products in 16 bits, which saturate with full 8-bit weights;
    PTQ avoids it with ``reduce_range``. PP-OCRv4 rec after 40 QAT steps, demo Eval split: acc 0.723 with 8-bit
    weights, 0.787 with 7-bit, 0.860 with the quantize/dequantize ops run in float.
    """
    import onnx
    from onnx import numpy_helper

    if weight_bits not in (7, 8):
        raise ValueError(f"weight_bits must be 7 or 8, got {weight_bits}")
    model = constants_to_initializers(onnx.load(onnx_path))
    graph = model.graph
    index = _GraphIndex(graph)
    stored = []
    for quantize in graph.node:
        if quantize.op_type != "QuantizeLinear" or len(quantize.input) < 3 \
                or not all(name in index.initializers for name in quantize.input[:3]):
            continue
        dequantize = index.only_consumer(quantize.output[0])
        if dequantize is None or dequantize.op_type != "DequantizeLinear":
            continue
        weight, scale, zero_point = (index.value(name) for name in quantize.input[:3])
        if weight.dtype != np.float32 or zero_point.dtype != np.int8 or np.any(zero_point != 0):
            continue
        shape = [1] * weight.ndim
        if scale.ndim:
            shape[_attribute(quantize, "axis", 1)] = -1
        safe = np.where(scale == 0, 1, scale).reshape(shape)  # a zero scale: an all-zero (pruned) channel
        integers = np.clip(np.round(weight / safe), -127, 127)
        if weight_bits == 7:
            integers, scale = np.round(integers * 63 / 127), (scale * 127 / 63).astype(np.float32)
        name = f"{quantize.input[0]}_int8"
        graph.initializer.extend([numpy_helper.from_array(integers.astype(np.int8), name),
                                  numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale")])
        dequantize.input[0], dequantize.input[1] = name, f"{name}_scale"
        stored.append(quantize)
    for quantize in stored:
        graph.node.remove(quantize)
    _drop_unused_initializers(graph)
    onnx.save(model, onnx_path)
    return len(stored)


# ------------------------------------------------------------------------------------------------ QOperator rewrites

# (scale, zero point) input positions of the output quantisation parameters of QOperator nodes
_OUTPUT_QPARAMS = {"QLinearConv": (6, 7), "QLinearMul": (6, 7), "QLinearAdd": (6, 7), "QLinearLeakyRelu": (3, 4),
                   "QLinearSigmoid": (3, 4), "QLinearGlobalAveragePool": (3, 4), "QLinearConcat": (0, 1)}
# HardSigmoid output as uint8 with scale 1/256 and zero point 0: [0, 255/256] (1 becomes 255/256, a 0.4% error
# for inputs past the upper knee)
_GATE_SCALE = 1.0 / 256


def _drop_unused_initializers(graph):
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _params_private_to(index, names, tensor, owner):
    """True when the initializers ``names`` are used only by ``owner`` and by the consumers of ``tensor``."""
    allowed = {id(owner)} | {id(node) for node in index.consumers.get(tensor, [])}
    return all(name in index.initializers and all(id(node) in allowed for node in index.consumers.get(name, []))
               for name in names)


def hard_sigmoid_to_lookup(model):
    """Replace ``DequantizeLinear -> HardSigmoid -> QuantizeLinear`` by one uint8 lookup table, in place.

    ``HardSigmoid(x) = clip(alpha * x + beta, 0, 1)`` is affine up to the clipping, so on a uint8 input it is a
    requantisation that saturates: ``QLinearLeakyRelu`` with ``alpha=1`` (the identity, computed by ONNX Runtime
    through a 256-entry table) whose output scale ``1 / (256 * alpha)`` and zero point ``256 * beta`` make the
    saturation bounds land on 0 and 1. The output tensor is then declared with scale 1/256 and zero point 0 for its
    consumers. Needs ``256 * beta`` to be an integer in [0, 255] (true for 0.5, PP-LCNetV3's value).

    Returns:
        number of HardSigmoid nodes replaced.
    """
    from onnx import helper, numpy_helper

    graph, replaced = model.graph, 0
    index = _GraphIndex(graph)
    for gate in list(graph.node):
        if gate.op_type != "HardSigmoid":
            continue
        dequantize = index.producer.get(gate.input[0])
        quantize = index.only_consumer(gate.output[0])
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or quantize is None \
                or quantize.op_type != "QuantizeLinear" or len(quantize.input) < 3:
            continue
        alpha, beta = _attribute(gate, "alpha", 0.2), _attribute(gate, "beta", 0.5)
        zero_point = 256 * beta
        if alpha <= 0 or abs(zero_point - round(zero_point)) > 1e-6 or not 0 <= zero_point <= 255:
            continue
        out_scale, out_zero_point = quantize.input[1], quantize.input[2]
        if index.value(out_zero_point).dtype != np.uint8 or len(dequantize.input) < 3 or not _params_private_to(
                index, (out_scale, out_zero_point), quantize.output[0], quantize):
            continue
        index.set_value(out_scale, np.array(_GATE_SCALE, np.float32))
        index.set_value(out_zero_point, np.array(0, np.uint8))
        name = f"{quantize.output[0]}_lookup"
        graph.initializer.extend([numpy_helper.from_array(np.array(1.0 / (256 * alpha), np.float32), f"{name}_scale"),
                                  numpy_helper.from_array(np.array(round(zero_point), np.uint8), f"{name}_zero_point")])
        lookup = helper.make_node("QLinearLeakyRelu", list(dequantize.input[:3]) + [f"{name}_scale", f"{name}_zero_point"],
                                  [quantize.output[0]], name=name, domain="com.microsoft", alpha=1.0)
        position = list(graph.node).index(gate)
        graph.node.insert(position, lookup)
        graph.node.remove(gate)
        graph.node.remove(quantize)
        if not index.consumers.get(dequantize.output[0], [])[1:] and dequantize.output[0] not in index.graph_outputs:
            graph.node.remove(dequantize)
        replaced += 1
        index = _GraphIndex(graph)
    if replaced and not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _drop_unused_initializers(graph)
    return replaced


def fold_scalar_requantize(model):
    """Fold QLinearMul / QLinearAdd by a scalar constant into the output parameters of the node before, in place.

    On uint8 data ``y = c * t`` and ``y = t + c`` only change what the integers mean: the node producing ``t``
    can write ``y``'s integers directly when its output scale is ``scale_y / c`` (multiply, ``c > 0``) or its zero
    point is ``zero_point_y + c / scale_y`` (add). The add needs an integer zero-point shift, so ``scale_y`` is
    nudged to ``c / round(c / scale_y)`` (a relative change of at most ``1 / (2 |k|)``); adds of less than half a
    quantisation step are left alone. Nodes are visited from the graph's end so that chains (``* s`` then ``+ b``)
    fold into the first real op.

    Returns:
        number of nodes removed.
    """
    graph, removed = model.graph, 0
    changed = True
    while changed:
        changed = False
        index = _GraphIndex(graph)
        for node in reversed(list(graph.node)):
            if node.op_type not in ("QLinearMul", "QLinearAdd") or node.domain != "com.microsoft":
                continue
            operands = [tuple(node.input[0:3]), tuple(node.input[3:6])]
            constants = [op for op in operands if op[0] in index.initializers and index.value(op[0]).size == 1]
            if len(constants) != 1 or len(node.input) < 8:
                continue
            tensor = operands[1 - operands.index(constants[0])]
            producer = index.producer.get(tensor[0])
            if producer is None or producer.op_type not in _OUTPUT_QPARAMS or index.only_consumer(tensor[0]) is not node:
                continue
            scale_name, zero_name = (producer.input[i] for i in _OUTPUT_QPARAMS[producer.op_type])
            if (scale_name, zero_name) != tensor[1:] or not _params_private_to(index, tensor[1:], tensor[0], producer):
                continue
            out_scale_name, out_zero_name = node.input[6], node.input[7]
            if index.value(out_zero_name).dtype != np.uint8 or not _params_private_to(
                    index, (out_scale_name, out_zero_name), node.output[0], node):
                continue
            q, s, z = constants[0]
            c = float(index.value(s)) * (float(index.value(q).reshape(-1)[0]) - float(index.value(z)))
            out_scale, out_zero = float(index.value(out_scale_name)), int(index.value(out_zero_name))
            if node.op_type == "QLinearMul":
                if c <= 0:
                    continue
                new_scale, new_zero = out_scale / c, out_zero
            else:
                shift = round(c / out_scale)
                if shift == 0 or not 0 <= out_zero + shift <= 255:
                    continue
                out_scale = c / shift
                index.set_value(out_scale_name, np.array(out_scale, np.float32))
                new_scale, new_zero = out_scale, out_zero + shift
            index.set_value(scale_name, np.array(new_scale, np.float32))
            index.set_value(zero_name, np.array(new_zero, np.uint8))
            producer.output[0] = node.output[0]
            graph.node.remove(node)
            removed += 1
            changed = True
            break
    _drop_unused_initializers(graph)
    return removed


# ------------------------------------------------------------------------------------------------ quantisation

RECIPES = ("dense", "full", "auto")
# ``auto`` keeps the full recipe when its calibration-set output error is at most this many times the dense one
# (PP-OCRv4 det: 1.8x for 1.1 hmean points more loss; rec: 6x, acc 0.91 -> 0.06), so both fall back to dense
FULL_RECIPE_ERROR_TOLERANCE = 1.5
HISTOGRAM_METHODS = ("Percentile", "Entropy", "Distribution")


@dataclasses.dataclass
class OnnxInt8Result:
    """Files written by :func:`quantize_onnx` / :func:`build_onnx_int8`.

    Attributes:
        float_onnx: the float ONNX model.
        int8_onnx: the quantised ONNX model.
        quantized_nodes: number of nodes selected for INT8 (0 means every quantisable node).
        reduce_range: whether 7-bit weights were used.
        recipe: ``dense`` or ``full`` (the one kept by ``auto``).
        calibration_error: recipe -> mean |int8 - float| / mean |float| of the outputs on the calibration batches
            (filled by ``auto``).
    """

    float_onnx: str
    int8_onnx: str
    quantized_nodes: int
    reduce_range: bool
    recipe: str = "dense"
    calibration_error: dict = dataclasses.field(default_factory=dict)

    @property
    def size_ratio(self):
        """INT8 file size / float file size."""
        return os.path.getsize(self.int8_onnx) / max(os.path.getsize(self.float_onnx), 1)


class _Reader:
    """``CalibrationDataReader`` protocol over prepared batches."""

    def __init__(self, batches):
        self._batches = iter(batches)

    def get_next(self):
        return next(self._batches, None)


def _prepare(float_onnx, prepared, full):
    """Float model ready for the quantiser: weights as initializers, BN folded into the convs (ONNX Runtime does
    that itself for float convs only, so a BN after an INT8 conv would stay a float op), shapes inferred; for the
    full recipe also HardSwish decomposed (it would otherwise stay a float op between uint8 tensors)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = constants_to_initializers(onnx.load(float_onnx))
    fold_batch_norms(model)
    if full:
        decompose_hard_swish(model)
    staged = prepared + ".staged.onnx"
    onnx.save(model, staged)
    # symbolic shape inference needs sympy (ONNX's is enough for these CNNs); the pre-optimisation would inline
    # HardSwish (see the module docstring)
    quant_pre_process(staged, prepared, skip_symbolic_shape=True, skip_optimization=True)
    return onnx.load(prepared)


def _quantize_recipe(float_onnx, int8_onnx, batches, recipe, reduce_range, calibrate_method, percentile, exclude,
                     min_macs_per_element, scratch):
    """One recipe (``dense`` or ``full``), ``exclude`` nodes kept float; returns the number of selected nodes
    (0: all)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    prepared = os.path.join(scratch, f"prepared_{recipe}.onnx")
    model = _prepare(float_onnx, prepared, full=recipe == "full")
    selected = dense_conv_and_matmul_nodes(model, min_macs_per_element) if recipe == "dense" else None
    if selected is not None:
        selected = [name for name in selected if name not in exclude]
        if not selected:  # an empty list would mean "every node" to quantize_static
            raise InputError(f"{float_onnx!r}: no dense conv or MatMul left to quantise after excluding "
                             f"{len(exclude)} nodes")
    extra = {"WeightSymmetric": True, "ActivationSymmetric": False}
    if calibrate_method == "Percentile":
        extra["CalibPercentile"] = percentile
    quantize_static(prepared, int8_onnx, _Reader(batches),
                    quant_format=QuantFormat.QDQ if recipe == "dense" else QuantFormat.QOperator,
                    per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=getattr(CalibrationMethod, calibrate_method),
                    nodes_to_quantize=selected, nodes_to_exclude=list(exclude), extra_options=extra)
    quantized = onnx.load(int8_onnx)
    if recipe == "full":
        lookups = hard_sigmoid_to_lookup(quantized)
        folded = fold_scalar_requantize(quantized)
        logger.info("full INT8 recipe: %d HardSigmoid lookups, %d scalar requantisations folded", lookups, folded)
    store_float_weights_as_fp16(quantized)
    del quantized.graph.value_info[:]  # shapes from the pre-processing: ONNX Runtime infers them again
    onnx.save(quantized, int8_onnx)
    return len(selected) if selected is not None else 0


def resize_to_common_shape(batches):
    """Nearest-neighbour resize of every 4-D input to the most common height and width among the batches.

    ONNX Runtime's histogram calibrators (Percentile, Entropy) stack the activations of all batches into one array,
    so det pages of different sizes fail there. Activation ranges hardly depend on the image size, and MinMax
    instead is no option: on PP-OCRv4 det it cost 4.5 hmean points where Percentile cost 0.5.
    """
    sizes = [value.shape[2:] for batch in batches for value in batch.values() if value.ndim == 4]
    if len(set(sizes)) <= 1:
        return batches
    target = max(set(sizes), key=sizes.count)
    logger.info("ONNX INT8: %d calibration image sizes, resized to %s for histogram calibration", len(set(sizes)),
                target)

    def resize(value):
        if value.ndim != 4 or value.shape[2:] == target:
            return value
        rows = (np.arange(target[0]) * value.shape[2] // target[0]).astype(np.int64)
        cols = (np.arange(target[1]) * value.shape[3] // target[1]).astype(np.int64)
        return np.ascontiguousarray(value[:, :, rows][:, :, :, cols])

    return [{name: resize(value) for name, value in batch.items()} for batch in batches]


def output_error(float_onnx, int8_onnx, batches):
    """Mean |int8 - float| / mean |float| of the first output over ``batches`` (ONNX Runtime, one thread)."""
    from export.predictor import DeployConfig, create_predictor

    reference = create_predictor(float_onnx, DeployConfig(backend="onnxruntime"))
    candidate = create_predictor(int8_onnx, DeployConfig(backend="onnxruntime"))
    diff = total = 0.0
    for batch in batches:
        expected = reference.run(batch)[0]
        diff += float(np.abs(candidate.run(batch)[0] - expected).sum())
        total += float(np.abs(expected).sum())
    return diff / max(total, 1e-12)


def quantize_onnx(float_onnx, int8_onnx, calib_batches, *, recipe="dense", reduce_range=None,
                  calibrate_method="Percentile", percentile=99.999, batch_nums=None, exclude=(),
                  min_macs_per_element=MIN_MACS_PER_ELEMENT):
    """Quantise a float ONNX model with ONNX Runtime (U8 activations, per-channel symmetric S8 weights).

    Args:
        float_onnx: float ``.onnx`` path.
        int8_onnx: output path.
        calib_batches: iterable (or callable returning a generator) of ``{input name: array}``.
        recipe: ``dense``, ``full`` or ``auto`` (see the module docstring).
        reduce_range: 7-bit weights; None picks True on CPUs without VNNI.
        calibrate_method: ``Percentile``, ``MinMax``, ``Entropy`` or ``Distribution`` (for the histogram methods,
            batches of different image sizes are resized to one, see :func:`resize_to_common_shape`).
        percentile: range kept by ``Percentile``.
        batch_nums: use at most this many batches.
        exclude: names of nodes to keep float (e.g. from :func:`dense_conv_and_matmul_nodes`).
        min_macs_per_element: ``dense`` recipe: convs doing fewer multiply-adds per activation element stay float
            (:data:`MIN_MACS_PER_ELEMENT`, measured on AVX2; 0 selects every dense conv).

    Returns:
        OnnxInt8Result.

    Raises:
        ConfigError: unknown recipe.
    """
    if recipe not in RECIPES:
        raise ConfigError(f"ONNX INT8 recipe {recipe!r} is unknown; use one of {', '.join(RECIPES)}")
    batches = materialize_batches(calib_batches, batch_nums)
    reduce_range = (not cpu_has_vnni()) if reduce_range is None else reduce_range
    if calibrate_method in HISTOGRAM_METHODS:
        batches = resize_to_common_shape(batches)
    args = (reduce_range, calibrate_method, percentile, tuple(exclude), min_macs_per_element)
    errors = {}
    with tempfile.TemporaryDirectory(prefix="onnx-int8-") as scratch:
        if recipe != "auto":
            count = _quantize_recipe(float_onnx, int8_onnx, batches, recipe, *args, scratch)
        else:
            candidates = {}
            for name in ("dense", "full"):
                path = os.path.join(scratch, f"{name}.onnx")
                candidates[name] = (path, _quantize_recipe(float_onnx, path, batches, name, *args, scratch))
                errors[name] = output_error(float_onnx, path, batches)
            recipe = "full" if errors["full"] <= FULL_RECIPE_ERROR_TOLERANCE * errors["dense"] else "dense"
            path, count = candidates[recipe]
            shutil.copyfile(path, int8_onnx)
            logger.info("ONNX INT8 auto: calibration output error dense %.4f, full %.4f -> %s", errors["dense"],
                        errors["full"], recipe)
    logger.info("ONNX Runtime INT8 (%s): %s nodes quantised, reduce_range=%s -> %s", recipe, count or "all",
                reduce_range, int8_onnx)
    return OnnxInt8Result(float_onnx, int8_onnx, count, reduce_range, recipe, errors)


def build_onnx_int8(model_dir, out_dir, calib_batches, *, fold=True, **quant_kwargs):
    """Paddle float model -> (folded) float ONNX + INT8 ONNX in ``out_dir``.

    Args:
        model_dir: float Paddle inference model folder.
        out_dir: writes ``model_fp32.onnx`` and ``model_int8.onnx``.
        calib_batches: calibration data.
        fold: fold affine blocks into convs first (exact; faster FP32 and INT8).
        **quant_kwargs: passed to :func:`quantize_onnx`.

    Returns:
        OnnxInt8Result.
    """
    from compress.quant.fold import fold_affine_into_conv

    os.makedirs(out_dir, exist_ok=True)
    source = model_dir
    with tempfile.TemporaryDirectory(prefix="fold-") as scratch:
        if fold:
            source = fold_affine_into_conv(model_dir, os.path.join(scratch, "folded")).model_dir
        float_onnx = export_onnx(source, os.path.join(out_dir, "model_fp32.onnx"))
    return quantize_onnx(float_onnx, os.path.join(out_dir, "model_int8.onnx"), calib_batches, **quant_kwargs)


def compare_outputs(reference, candidate, kind):
    """Agreement of a candidate model's outputs with the float reference.

    Args:
        reference: float model outputs (first output array).
        candidate: quantised model outputs, same shape.
        kind: ``"det"`` (probability maps: mean abs diff and agreement of the 0.3-binarised map) or
            ``"rec"`` (CTC logits: greedy-decoded sequences equal, frame argmax agreement).

    Returns:
        dict of metric name -> float.
    """
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if kind == "det":
        return {"mean_abs_diff": float(np.abs(reference - candidate).mean()),
                "binary_map_agreement": float(((reference > 0.3) == (candidate > 0.3)).mean())}
    ref_ids, cand_ids = reference.argmax(-1), candidate.argmax(-1)
    same = [_ctc_collapse(a) == _ctc_collapse(b) for a, b in zip(ref_ids, cand_ids)]
    return {"sequence_agreement": float(np.mean(same)), "frame_agreement": float((ref_ids == cand_ids).mean())}


def _ctc_collapse(ids, blank=0):
    out, previous = [], None
    for index in ids.tolist():
        if index != previous and index != blank:
            out.append(index)
        previous = index
    return tuple(out)
