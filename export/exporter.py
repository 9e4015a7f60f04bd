"""Export a dygraph model to a Paddle inference model and check the exported model against it.

``export_inference_model`` saves with ``paddle.jit.save`` and an ``InputSpec`` whose dims are dynamic where the task
needs them (det ``[None, 3, None, None]``, rec ``[None, 3, 48, None]``); the files it produced are found on disk
(``find_model_files``), never guessed from the Paddle version (2.x writes ``.pdmodel``, PIR builds ``.json``).
A ``.pdmodel`` program is then rewritten in place to add conv biases the way shipped PP-OCR models do
(``fold_conv_bias_reshapes``).

``export_parity`` runs the exported model through ``create_predictor`` and the dygraph model on the same images.
Float precisions are judged on raw outputs (det probability maps and rec character probabilities both lie in
[0, 1], so an absolute tolerance is a relative one too); INT8 is judged on what the outputs decode to: det maps
binarised at the DB threshold, rec greedy CTC strings.
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import dataclasses
import logging
import os

import numpy as np

from compress.checkpoint import atomic_write_bytes
from compress.errors import InputError
from export.deploy import export_input_shape
from export.predictor import ModelFiles, create_predictor, find_model_files

logger = logging.getLogger(__name__)

MODEL_PREFIX = "inference"
# ops whose ``Output`` has its channels on axis 1 (NCHW) when their bias is a reshape2 to [1, C, 1, 1]
CONV_OPS = ("conv2d", "depthwise_conv2d", "conv2d_transpose")


@dataclasses.dataclass(frozen=True)
class ExportedFiles(ModelFiles):
    """ModelFiles of a model written by :func:`export_inference_model`.

    Attributes:
        folded_bias_reshapes: conv-bias ``reshape2`` ops removed from the saved program
            (:func:`fold_conv_bias_reshapes`).
    """

    folded_bias_reshapes: int = 0


def export_inference_model(model, out_dir, input_cfg, task, prefix=MODEL_PREFIX):
    """Save ``model`` as a Paddle inference model with dynamic input dims.

    The model is not modified (``paddle.jit.save`` converts ``forward`` without replacing it); it is run in eval
    mode and its training flag is restored afterwards. The saved ``.pdmodel`` program gets its conv biases added
    as the shipped PP-OCR models add them (:func:`fold_conv_bias_reshapes`); the parameters file is not touched.

    Args:
        model: dygraph ``paddle.nn.Layer``.
        out_dir: folder to write into (created).
        input_cfg: the model config's ``Input`` section (input name, C/H/W).
        task: ``"det"``, ``"rec"`` (others export with the fixed ``example_shape``).
        prefix: file name prefix.

    Returns:
        ExportedFiles of the written model.

    Raises:
        InputError: when no program with parameters appeared in ``out_dir``.
    """
    import paddle

    os.makedirs(out_dir, exist_ok=True)
    spec = paddle.static.InputSpec(export_input_shape(task, input_cfg), "float32", input_cfg.name)
    was_training = model.training
    model.eval()
    try:
        paddle.jit.save(model, os.path.join(out_dir, prefix), input_spec=[spec])
    finally:
        if was_training:
            model.train()
    files = find_model_files(out_dir)
    if files.params_file is None:
        raise InputError(f"paddle.jit.save wrote {os.path.basename(files.model_file)} into {out_dir} but no "
                         f"parameters file beside it; the model has no parameters to deploy")
    folded = fold_conv_bias_reshapes(files.model_file) if files.format == "pdmodel" else 0
    return ExportedFiles(files.model_file, files.params_file, files.format, folded_bias_reshapes=folded)


def fold_conv_bias_reshapes(model_file):
    """Add conv biases as ``elementwise_add(conv out, bias, axis=1)``, in place in a ``.pdmodel`` program.

    Paddle 2.6's static conv (``paddle.nn.functional.conv._conv_nd``, which ``paddle.jit.save`` traces) adds a
    bias as ``reshape2(bias -> [1, C, 1, 1])`` then ``elementwise_add(axis=-1)``; shipped PP-OCR programs add the
    1-D bias parameter itself with ``axis=1``. Paddle Inference's oneDNN conv + bias fuse passes take only the
    latter, so the former left 54 extra ops and ~15% more time in PP-OCRv4 det on CPU. Every ``reshape2`` of a
    persistable 1-D parameter to ``[1, C, 1, 1]`` whose only consumer is that add right after a conv is removed
    (with its output and ``XShape`` vars) and the add reads the parameter with ``axis=1``: the same arithmetic. Any
    other pattern is left alone; the set of parameters is unchanged, so ``.pdiparams`` (and its ``.info``) still fit.
    The file is replaced atomically; a program this cannot read or rewrite is kept as it is, with a warning.

    Args:
        model_file: a ``.pdmodel`` file (ProgramDesc protobuf).

    Returns:
        Number of ``reshape2`` ops removed.
    """
    from paddle.base import core

    try:
        with open(model_file, "rb") as handle:
            program = core.ProgramDesc(handle.read())
        folded = _fold_bias_reshapes(program)
        if folded:
            atomic_write_bytes(model_file, program.serialize_to_string())
    except Exception as error:  # an optimisation: never fail an export because of it
        logger.warning("left %s as paddle.jit.save wrote it: rewriting its conv biases failed (%s: %s)",
                       model_file, type(error).__name__, error)
        return 0
    logger.info("%s: %d conv-bias reshape2 ops folded into their elementwise_add", model_file, folded)
    return folded


def _fold_bias_reshapes(program):
    block = program.block(0)
    ops = [block.op(i) for i in range(block.op_size())]
    consumers, producers = {}, {}
    for index in range(program.num_blocks()):
        sub = program.block(index)
        for op in (sub.op(i) for i in range(sub.op_size())):
            for name in op.input_arg_names():
                consumers.setdefault(name, []).append(op)
    for op in ops:
        for name in op.output_arg_names():
            producers.setdefault(name, []).append(op)
    matches = [(index, op, add) for index, op in enumerate(ops)
               for add in [_bias_add(block, op, consumers, producers)] if add is not None]
    for index, reshape, add in reversed(matches):
        add.set_input("Y", reshape.input("X"))
        add._set_int32_attr("axis", 1)
        dropped = reshape.output_arg_names()  # read before the removal frees the op desc
        block._remove_op(index, index + 1)
        for name in dropped:
            block._remove_var(name.encode())
    return len(matches)


def _bias_add(block, reshape, consumers, producers):
    """The ``elementwise_add`` that ``reshape`` feeds a conv's per-channel bias into, or None."""
    if reshape.type() != "reshape2" or any(reshape.input(k) for k in ("Shape", "ShapeTensor")
                                           if k in reshape.input_names()):
        return None
    source = reshape.input("X")
    param = block.find_var(source[0].encode()) if len(source) == 1 else None
    if param is None or not param.persistable() or len(param.shape()) != 1:
        return None
    if list(reshape.attr("shape")) not in ([1, param.shape()[0], 1, 1], [1, -1, 1, 1]):
        return None
    out = reshape.output("Out")[0]
    if any(consumers.get(name) for name in reshape.output("XShape")) or len(consumers.get(out, [])) != 1:
        return None
    add = consumers[out][0]
    if add.type() != "elementwise_add" or add.input("Y") != [out] or not add.has_attr("axis") \
            or add.attr("axis") != -1:
        return None
    conv = producers.get(add.input("X")[0], [])
    if len(conv) != 1 or conv[0].type() not in CONV_OPS or conv[0].output("Output") != add.input("X"):
        return None
    layout = conv[0].attr("data_format") if conv[0].has_attr("data_format") else "NCHW"
    return add if layout in ("NCHW", "AnyLayout") else None


def model_bytes(files):
    """Bytes of a model's program plus parameters."""
    return sum(os.path.getsize(path) for path in (files.model_file, files.params_file) if path)


def dygraph_outputs(model, inputs):
    """First output of the dygraph model for each input batch (det: the probability map)."""
    from compress.tasks import dygraph_predictor

    predict = dygraph_predictor(model)
    return [predict(batch) for batch in inputs]


def predictor_outputs(model_path, deploy, inputs):
    """First output of ``create_predictor(model_path, deploy)`` for each batch, and the predictor."""
    predictor = create_predictor(model_path, deploy)
    name = predictor.input_names[0]
    return [predictor.run({name: batch})[0] for batch in inputs], predictor


@dataclasses.dataclass(frozen=True)
class ParityTolerance:
    """Largest acceptable differences between an exported model and its reference.

    Attributes:
        fp32_max_abs_diff: float models, largest absolute output difference.
        fp16_max_abs_diff: half-precision runs.
        int8_det_mean_abs_diff: INT8 det, mean absolute difference of the probability maps.
        int8_det_map_agreement: INT8 det, least fraction of pixels on the same side of the 0.3 DB threshold.
        int8_rec_sequence_agreement: INT8 rec, least fraction of lines whose greedy CTC strings are equal.
    """

    fp32_max_abs_diff: float = 1e-4
    fp16_max_abs_diff: float = 1e-2
    int8_det_mean_abs_diff: float = 0.03
    int8_det_map_agreement: float = 0.97
    int8_rec_sequence_agreement: float = 0.85


@dataclasses.dataclass(frozen=True)
class ParityReport:
    """How closely an exported model reproduces its reference.

    Attributes:
        backend: the backend that really ran (after any CPU fallback).
        precision: ``fp32``, ``fp16`` or ``int8``.
        samples: number of images compared.
        max_abs_diff / mean_abs_diff: raw output differences.
        agreement: decoded agreement (INT8: ``binary_map_agreement`` or ``sequence_agreement`` /
            ``frame_agreement``).
        passed: whether the tolerance was met.
        detail: the failed check, or ``""``.
        fallback: why the requested backend was replaced, or None.
    """

    backend: str
    precision: str
    samples: int
    max_abs_diff: float
    mean_abs_diff: float
    agreement: dict
    passed: bool
    detail: str = ""
    fallback: "str | None" = None

    def to_dict(self):
        return dataclasses.asdict(self)


def compare_outputs(reference, candidate, task, precision, tolerance=None, backend="", fallback=None):
    """Compare lists of output batches of a reference and a candidate model.

    Args:
        reference / candidate: lists of arrays, batch by batch, same shapes.
        task: ``"det"`` or ``"rec"`` (how INT8 outputs are decoded).
        precision: ``fp32`` / ``fp16`` judge raw differences; ``int8`` judges decoded agreement.
        tolerance: ParityTolerance (defaults when None).
        backend / fallback: recorded in the report.

    Returns:
        ParityReport.

    Raises:
        InputError: when the batch counts or shapes differ.
    """
    from compress.quant.onnx_int8 import compare_outputs as decoded_agreement

    tolerance = tolerance or ParityTolerance()
    if len(reference) != len(candidate) or not reference:
        raise InputError(f"parity needs the same non-empty list of batches, got {len(reference)} reference and "
                         f"{len(candidate)} candidate outputs")
    for ref, cand in zip(reference, candidate):
        if np.shape(ref) != np.shape(cand):
            raise InputError(f"exported model output shape {np.shape(cand)} differs from the reference "
                             f"{np.shape(ref)}; the export dropped or reordered outputs")
    diffs = [np.abs(np.asarray(r, "float64") - np.asarray(c, "float64")) for r, c in zip(reference, candidate)]
    max_abs = float(max(d.max() for d in diffs))
    mean_abs = float(np.concatenate([d.ravel() for d in diffs]).mean())
    samples = int(sum(len(r) for r in reference))
    agreement = {}
    if precision == "int8":
        if task == "det":
            parts = [decoded_agreement(r, c, "det") for r, c in zip(reference, candidate)]
            agreement = {"binary_map_agreement": float(np.mean([p["binary_map_agreement"] for p in parts]))}
        else:
            agreement = _rec_agreement(reference, candidate, decoded_agreement)
        detail = _int8_failure(task, mean_abs, agreement, tolerance)
    else:
        limit = tolerance.fp16_max_abs_diff if precision == "fp16" else tolerance.fp32_max_abs_diff
        detail = "" if max_abs <= limit else f"max |diff| {max_abs:.2e} > {limit:.0e}"
    return ParityReport(backend=backend, precision=precision, samples=samples, max_abs_diff=max_abs,
                        mean_abs_diff=mean_abs, agreement=agreement, passed=not detail, detail=detail,
                        fallback=fallback)


def _rec_agreement(reference, candidate, decoded_agreement):
    lines = sequences = frames = 0.0
    for ref, cand in zip(reference, candidate):
        part = decoded_agreement(ref, cand, "rec")
        sequences += part["sequence_agreement"] * len(ref)
        frames += part["frame_agreement"] * len(ref)
        lines += len(ref)
    return {"sequence_agreement": sequences / lines, "frame_agreement": frames / lines}


def _int8_failure(task, mean_abs, agreement, tolerance):
    if task == "det":
        if mean_abs > tolerance.int8_det_mean_abs_diff:
            return f"det map mean |diff| {mean_abs:.3f} > {tolerance.int8_det_mean_abs_diff}"
        if agreement["binary_map_agreement"] < tolerance.int8_det_map_agreement:
            return (f"det binary map agreement {agreement['binary_map_agreement']:.3f} < "
                    f"{tolerance.int8_det_map_agreement}")
        return ""
    if agreement["sequence_agreement"] < tolerance.int8_rec_sequence_agreement:
        return (f"rec string agreement {agreement['sequence_agreement']:.3f} < "
                f"{tolerance.int8_rec_sequence_agreement}")
    return ""


def export_parity(model, model_dir, deploy, inputs, tolerance=None, task="det", reference=None):
    """Run the exported model through ``create_predictor`` and compare it with the dygraph model.

    Args:
        model: the dygraph model (the float model, also for an INT8 export of it).
        model_dir: exported model folder, or an ``.onnx`` file for the onnxruntime backend.
        deploy: DeployConfig.
        inputs: list of NCHW float32 batches (real eval images, e.g. ``task.input_batches("eval", limit=8)``).
        tolerance: ParityTolerance.
        task: ``"det"`` or ``"rec"``.
        reference: precomputed dygraph outputs for ``inputs`` (saves re-running the dygraph model).

    Returns:
        ParityReport (``max_abs_diff`` / ``mean_abs_diff`` always filled).
    """
    inputs = list(inputs)
    if not inputs:
        raise InputError("parity needs at least one input batch; check the Eval split has images")
    reference = reference if reference is not None else dygraph_outputs(model, inputs)
    candidate, predictor = predictor_outputs(model_dir, deploy, inputs)
    return compare_outputs(reference, candidate, task, deploy.precision, tolerance, backend=predictor.backend,
                           fallback=predictor.fallback_reason)
