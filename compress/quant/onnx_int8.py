"""ONNX Runtime INT8: paddle2onnx export (in a subprocess) and ONNX Runtime static quantisation.

Recipe measured on PP-OCRv4 (see ``benchmarks/bench_int8.py``):

1. fold the affine blocks into convs first (:func:`compress.quant.fold.fold_affine_into_conv`);
2. export with paddle2onnx in a child process (it can abort the whole process on some quantised graphs);
3. ``onnxruntime.quantization.quantize_static`` in QDQ format, U8 activations / S8 per-channel weights, on the
   dense convs (group 1, more than 3 input channels) and MatMuls only. Depthwise and first convs stay float:
   MLAS's INT8 depthwise kernel was slower than its FP32 one here, and the QLinear elementwise/softmax ops the
   full graph drags in cost more than they save;
4. on CPUs without VNNI, ``reduce_range=True`` (7-bit weights): the AVX2 u8*s8 kernels saturate 16-bit pair
   sums otherwise (PP-OCRv4 rec strings agreeing with float: 66% without, 94-97% with).
"""
import compress  # noqa: F401  (imports zlib before paddle/onnxruntime, see compress/__init__.py)

import dataclasses
import logging
import os
import subprocess
import sys
import tempfile

import numpy as np

from compress.errors import InputError
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


def dense_conv_and_matmul_nodes(model):
    """Names of the nodes worth running in INT8: group-1 convs with more than 3 input channels, MatMuls."""
    from onnx import numpy_helper

    weights = {init.name: init for init in model.graph.initializer}
    selected = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and any(name in weights for name in node.input):
            selected.append(node.name)
        if node.op_type != "Conv" or node.input[1] not in weights:
            continue
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        in_channels = numpy_helper.to_array(weights[node.input[1]]).shape[1]
        if group == 1 and in_channels > 3:
            selected.append(node.name)
    return selected


def cpu_has_vnni():
    """True when the CPU has AVX512-VNNI or AVX-VNNI (int8 dot products without 16-bit saturation)."""
    try:
        with open("/proc/cpuinfo", encoding="utf8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


@dataclasses.dataclass
class OnnxInt8Result:
    """Files written by :func:`quantize_onnx` / :func:`build_onnx_int8`.

    Attributes:
        float_onnx: the float ONNX model.
        int8_onnx: the quantised ONNX model.
        quantized_nodes: number of nodes selected for INT8.
        reduce_range: whether 7-bit weights were used.
    """

    float_onnx: str
    int8_onnx: str
    quantized_nodes: int
    reduce_range: bool

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


def quantize_onnx(float_onnx, int8_onnx, calib_batches, *, reduce_range=None, nodes="dense",
                  calibrate_method="MinMax", batch_nums=None):
    """Quantise a float ONNX model with ONNX Runtime (QDQ, U8 activations, per-channel S8 weights).

    Args:
        float_onnx: float ``.onnx`` path.
        int8_onnx: output path.
        calib_batches: iterable (or callable returning a generator) of ``{input name: array}``.
        reduce_range: 7-bit weights; None picks True on CPUs without VNNI.
        nodes: ``"dense"`` (see :func:`dense_conv_and_matmul_nodes`), ``"all"``, or a list of node names.
        calibrate_method: ``MinMax``, ``Entropy``, ``Percentile`` or ``Distribution``.
        batch_nums: use at most this many batches.

    Returns:
        OnnxInt8Result.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    batches = materialize_batches(calib_batches, batch_nums)
    reduce_range = (not cpu_has_vnni()) if reduce_range is None else reduce_range
    with tempfile.TemporaryDirectory(prefix="onnx-int8-") as scratch:
        prepared = os.path.join(scratch, "prepared.onnx")
        model = constants_to_initializers(onnx.load(float_onnx))
        onnx.save(model, os.path.join(scratch, "initializers.onnx"))
        # symbolic shape inference needs sympy; ONNX shape inference is enough for these CNNs
        quant_pre_process(os.path.join(scratch, "initializers.onnx"), prepared, skip_symbolic_shape=True)
        prepared_model = onnx.load(prepared)
        selected = (dense_conv_and_matmul_nodes(prepared_model) if nodes == "dense"
                    else None if nodes == "all" else list(nodes))
        quantize_static(prepared, int8_onnx, _Reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, calibrate_method), nodes_to_quantize=selected,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    count = len(selected) if selected is not None else len(prepared_model.graph.node)
    logger.info("ONNX Runtime INT8: %d nodes quantised, reduce_range=%s -> %s", count, reduce_range, int8_onnx)
    return OnnxInt8Result(float_onnx, int8_onnx, count, reduce_range)


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
