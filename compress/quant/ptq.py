"""Static post-training quantization (PTQ) of Paddle inference models, with sensitive-layer fallback.

``quantize_post_static`` wraps ``paddleslim.quant.quant_post_static``. The model it writes:

* uses ``onnx_format=True`` by default: ``quantize_linear``/``dequantize_linear`` (QDQ) ops carrying the
  activation scales, and conv/matmul weights stored as int8 in ``.pdiparams`` (about 27% of the float file
  for PP-OCRv4 det when only convs are quantised). Paddle Inference runs it as real INT8 with
  ``enable_mkldnn_int8()``, TensorRT reads its scales with ``use_calib_mode=False``, and paddle2onnx converts it.
  ``onnx_format=False`` writes the old ``fake_quantize_*`` ops with float-sized weights; oneDNN INT8 runs it
  too, but paddle2onnx 1.3.1 aborts (SIGABRT) on it.
* is meant to run with oneDNN INT8 restricted to convolutions (``DeployConfig.int8_ops`` default): letting
  oneDNN also quantise ``fc``/``matmul`` (its default) broke PP-OCRv4 rec (recognised strings agreeing with
  float fell from 94% to 47%).

Paddle's PTQ needs a ``paddle.io.DataLoader`` built with a ``feed_list`` of ``paddle.static.data`` and
``return_list=False``; ``calibration_loader`` builds one from plain batches (dicts of input name -> array).
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import time

import numpy as np

from compress.errors import CompressError, ConfigError, InputError
from export.predictor import find_model_files

logger = logging.getLogger(__name__)

ALGOS = ("hist", "abs_max", "avg", "KL", "mse")
MODEL_FILENAME = "inference.pdmodel"
PARAMS_FILENAME = "inference.pdiparams"
CYCLE_ATTEMPTS = 4  # isolated PTQ runs tried on Paddle's graph-cycle error; a safety net (see quantize_post_static)
_CYCLE_ERROR = "Generated graph shouldn't contain cycle"
# weight input slot per quantisable op type: the weight's name identifies a layer in skip lists
WEIGHT_SLOTS = {"conv2d": "Filter", "depthwise_conv2d": "Filter", "conv2d_transpose": "Filter",
                "mul": "Y", "matmul": "Y", "matmul_v2": "Y"}


@dataclasses.dataclass
class QuantResult:
    """A quantised inference model and what it took.

    Attributes:
        model_dir: folder with ``inference.pdmodel`` / ``inference.pdiparams``.
        algo: activation calibration algorithm used.
        onnx_format: True for QDQ (``quantize_linear``) ops, False for ``fake_quantize_*`` ops.
        calibration_batches: number of batches used.
        skipped_layers: weight names of layers left in float.
        float_params_bytes: size of the float ``.pdiparams``.
        quant_params_bytes: size of the quantised ``.pdiparams``.
        seconds: wall time of the quantisation.
    """

    model_dir: str
    algo: str
    onnx_format: bool
    calibration_batches: int
    skipped_layers: tuple
    float_params_bytes: int
    quant_params_bytes: int
    seconds: float

    @property
    def size_ratio(self):
        """Quantised params size / float params size."""
        return self.quant_params_bytes / max(self.float_params_bytes, 1)


@contextlib.contextmanager
def static_mode():
    """Run the block in Paddle static-graph mode, restoring dygraph afterwards if it was on."""
    import paddle

    was_dynamic = paddle.in_dynamic_mode()
    paddle.enable_static()
    try:
        yield
    finally:
        if was_dynamic:
            paddle.disable_static()


def materialize_batches(calib_batches, batch_nums=None):
    """Turn an iterable, or a callable returning a generator, of ``{name: array}`` into a list.

    PTQ iterates the data more than once (``hist``/``KL`` take a range pass, then a sampling pass), so a
    one-shot generator must be stored.

    Raises:
        InputError: when no batch comes out or a batch is not a dict of arrays.
    """
    source = calib_batches() if callable(calib_batches) else calib_batches
    batches = []
    for batch in source:
        if batch_nums is not None and len(batches) >= batch_nums:
            break
        if not isinstance(batch, dict):
            raise InputError(f"calibration batch {len(batches)} is a {type(batch).__name__}; "
                             "yield dicts of input name -> numpy array")
        batches.append({name: np.ascontiguousarray(value) for name, value in batch.items()})
    if not batches:
        raise InputError("calibration data is empty: pass at least one batch (dict of input name -> array)")
    return batches


def read_feed_names(model_dir):
    """Input names of a Paddle inference model."""
    import paddle

    files = find_model_files(model_dir)
    with static_mode():
        exe = paddle.static.Executor(paddle.CPUPlace())
        with paddle.static.scope_guard(paddle.static.Scope()):
            _, feed_names, _ = paddle.static.load_inference_model(
                os.path.dirname(files.model_file), exe, model_filename=os.path.basename(files.model_file),
                params_filename=os.path.basename(files.params_file) if files.params_file else None)
    return list(feed_names)


def calibration_loader(batches, feed_names):
    """A static-mode ``paddle.io.DataLoader`` over prepared batches, as Paddle's PTQ requires.

    Args:
        batches: list of ``{input name: array}``.
        feed_names: model input names, in feed order.

    Raises:
        InputError: when a batch misses an input.
    """
    import paddle

    for index, batch in enumerate(batches):
        missing = [name for name in feed_names if name not in batch]
        if missing:
            raise InputError(f"calibration batch {index} lacks model inputs {missing}; the model's inputs are "
                             f"{feed_names}")

    class _Batches(paddle.io.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, index):
            return tuple(batches[index][name] for name in feed_names)

    with paddle.static.program_guard(paddle.static.Program(), paddle.static.Program()):
        feed_vars = [paddle.static.data(name, [-1] * batches[0][name].ndim, str(batches[0][name].dtype))
                     for name in feed_names]
    return paddle.io.DataLoader(_Batches(), feed_list=feed_vars, return_list=False, batch_size=None,
                                places=paddle.CPUPlace())


def _check_args(algo, quantizable_op_type):
    if algo not in ALGOS:
        raise ConfigError(f"PTQ algo {algo!r} is unknown; use one of {', '.join(ALGOS)}")
    unknown = [op for op in quantizable_op_type if op not in WEIGHT_SLOTS]
    if unknown:
        raise ConfigError(f"quantizable_op_type {unknown} not supported; use some of {', '.join(WEIGHT_SLOTS)}")


def make_single_assignment(program):
    """Rename variables of a static program so that each one is written by a single op (SSA form), in place.

    Why PTQ needs it: Paddle 2.6's quantisation passes key their bookkeeping by variable *name*, while the IR
    graph they edit (``IrGraph``) has one var node per write. ``AddQuantDequantForInferencePass``, the last pass
    of ``PostTrainingQuantization._update_program``, inserts one quantize/dequantize pair per output name, after
    whichever writer of that name it meets first in ``IrGraph.all_op_nodes()`` (a Python ``set`` of fresh
    wrapper objects, so the order follows memory addresses and changes from run to run), then rewires every op
    reading that name to the dequantized copy. When a name has two writers and the later one is met first, the
    earlier readers -- the later writer itself, for an in-place op -- are rewired to a value computed from that
    later writer: a cycle, which ``IrGraph.to_program`` (``graph_to_program_pass``, whose topological sort in
    ``graph_helper.cc`` enforces acyclicity) reports as "Generated graph shouldn't contain cycle".
    Our folded exports have such an op: ``save_inference_model`` (used by ``fold_affine_into_conv``) appends
    ``scale(fetch var)`` with an output named from the process-wide unique-name counter, and when that name is
    the fetch variable's own (``save_infer_model/scale_0.tmp_K``), the op is ``scale(X=v) -> Out=v``. With one
    writer per name the pass has nothing to get wrong.

    A name written more than once keeps its name at its last write (fetch targets keep their names; a fed
    variable keeps it at the feed op) and takes a fresh name ``<name>.ssa_<k>`` at each other write; the reads
    in between follow. Persistable variables (batch-norm ``MeanOut``/``VarianceOut`` are written in place; no
    quantisation pass rewires them) and variables used in sub-blocks are left alone, so the parameters file
    still matches the program.

    Args:
        program: a ``paddle.static.Program`` (changed in place; build it in static mode).

    Returns:
        list of ``(op index, op type, old name, new name)``, one per renamed write; empty when already SSA.
    """
    from paddle.base import core

    block = program.global_block()
    persistable = {var.name for var in program.list_vars() if var.persistable}
    in_sub_blocks = {name for sub in program.blocks[1:] for op in sub.ops
                     for name in op.input_arg_names + op.output_arg_names}
    writers = {}
    for index, op in enumerate(block.ops):
        if op.type == "fetch":  # every fetch op writes the one ``fetch`` list
            continue
        for name in dict.fromkeys(op.output_arg_names):
            if name not in persistable and name not in in_sub_blocks:
                writers.setdefault(name, []).append(index)
    keeper = {}  # name written several times -> index of the op whose write keeps the name
    for name, indices in writers.items():
        if len(indices) > 1:
            fed = [index for index in indices if block.ops[index].type == "feed"]
            keeper[name] = fed[0] if fed else indices[-1]
    current, renamed = {}, []
    for index, op in enumerate(block.ops):
        for name in dict.fromkeys(op.input_arg_names):
            if current.get(name, name) != name:
                op._rename_input(name, current[name])
        if op.type == "fetch":
            continue
        for name in dict.fromkeys(op.output_arg_names):
            if name not in keeper:
                continue
            if index == keeper[name]:
                current.pop(name, None)
                continue
            new_name = _unused_name(block, name)
            var = block.var(name)
            block.create_var(name=new_name, shape=var.shape, dtype=var.dtype, type=var.type,
                             lod_level=var.lod_level if var.type == core.VarDesc.VarType.LOD_TENSOR else None,
                             stop_gradient=var.stop_gradient)
            op._rename_output(name, new_name)
            current[name] = new_name
            renamed.append((index, op.type, name, new_name))
    return renamed


def _unused_name(block, name):
    k = 1
    while block.has_var(f"{name}.ssa_{k}"):
        k += 1
    return f"{name}.ssa_{k}"


def _single_assignment_model(files, folder):
    """Where PTQ should read the float model: ``files`` as they are, or an SSA copy in ``folder``.

    Applies :func:`make_single_assignment` to the program of ``files`` (a ``.pdmodel``); when it renames
    something, writes the rewritten program and the unchanged parameters into ``folder``.

    Returns:
        (model dir, model file name, params file name or None).
    """
    import paddle

    model_dir, model_name = os.path.split(files.model_file)
    params_name = os.path.basename(files.params_file) if files.params_file else None
    if not model_name.endswith(".pdmodel"):
        return model_dir, model_name, params_name
    with open(files.model_file, "rb") as handle:
        data = handle.read()
    with static_mode():
        program = paddle.static.Program.parse_from_string(data)
        renamed = make_single_assignment(program)
        if not renamed:
            return model_dir, model_name, params_name
        if params_name:
            os.makedirs(folder)
            shutil.copyfile(files.params_file, os.path.join(folder, params_name))
        else:  # one file per parameter beside the program
            shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns(model_name))
        with open(os.path.join(folder, model_name), "wb") as handle:
            handle.write(program.desc.serialize_to_string())
    logger.info("PTQ: %d variables written more than once renamed first (e.g. %s at op %d %s), see "
                "make_single_assignment", len(renamed), renamed[0][2], renamed[0][0], renamed[0][1])
    return folder, model_name, params_name


class GraphCycleError(CompressError, ValueError):
    """Paddle 2.6's PTQ failed with its graph-cycle error on every attempt (a ValueError, as Paddle raises it)."""


def quantize_post_static(float_model_dir, out_dir, calib_batches, *, isolated=True, **kwargs):
    """Quantise a float Paddle inference model with calibration data (static PTQ); see :func:`_quantize`.

    With ``isolated`` (the default) the quantisation runs in a fresh ``spawn`` process, keeping Paddle's static
    graph state out of the caller.

    Paddle 2.6's PTQ used to fail at random with "Generated graph shouldn't contain cycle" (in fresh processes and
    in processes holding a predictor alike) on models that write a variable twice, such as the in-place ``scale``
    that ``fold_affine_into_conv`` can leave before the fetch; :func:`_quantize` now rewrites such programs first
    (:func:`make_single_assignment`), which removes the cause. An isolated run hitting that error anyway is still
    retried, up to ``CYCLE_ATTEMPTS`` times, as a safety net for causes not known yet.
    """
    if not isolated:
        return _quantize(float_model_dir, out_dir, calib_batches, **kwargs)
    import multiprocessing

    batches = materialize_batches(calib_batches, kwargs.pop("batch_nums", None))
    for attempt in range(1, CYCLE_ATTEMPTS + 1):
        pool = multiprocessing.get_context("spawn").Pool(1)
        try:
            return pool.apply(_quantize, (float_model_dir, out_dir, batches), kwargs)
        except ValueError as error:
            if _CYCLE_ERROR not in str(error):
                raise
            if attempt == CYCLE_ATTEMPTS:
                raise GraphCycleError(
                    f"Paddle PTQ of {float_model_dir!r} failed {CYCLE_ATTEMPTS} times with Paddle 2.6's random "
                    f"\"{_CYCLE_ERROR}\"; run again to resume, or quantize this model with "
                    f"Quant.backends: [onnxruntime] or Quant.method: qat") from error
            logger.warning("PTQ attempt %d/%d hit Paddle's graph-cycle error; retrying in a fresh process",
                           attempt, CYCLE_ATTEMPTS)
        finally:
            pool.close()  # close + join, not terminate: Paddle prints a fatal-error banner on SIGTERM
            pool.join()


def _quantize(float_model_dir, out_dir, calib_batches, *, algo="hist", hist_percent=0.9999,
              batch_nums=None, quantizable_op_type=("conv2d", "depthwise_conv2d"),
              weight_quantize_type="channel_wise_abs_max", skip_tensor_list=None, onnx_format=True):
    """Quantise a float Paddle inference model with calibration data (static PTQ).

    A program writing some variable more than once is first rewritten into a scratch copy where each variable is
    written once (:func:`make_single_assignment`): Paddle 2.6's PTQ can build a cyclic graph from it otherwise.

    Args:
        float_model_dir: folder of the float inference model.
        out_dir: folder to write ``inference.pdmodel``/``inference.pdiparams`` into (files are replaced).
        calib_batches: iterable of ``{input name: array}`` batches, or a callable returning such a generator.
        algo: activation range algorithm: ``hist``, ``abs_max``, ``avg``, ``KL`` or ``mse``. On PP-OCRv4
            ``abs_max`` took ~20 s and ``hist`` ~2 min (it histograms every activation); ``avg`` fails on
            models holding 0-d tensors (Paddle 2.6).
        hist_percent: percentile kept by ``hist``.
        batch_nums: use at most this many batches (None: all).
        quantizable_op_type: op types whose weights and inputs are quantised.
        weight_quantize_type: ``channel_wise_abs_max`` or ``abs_max``.
        skip_tensor_list: names of tensors (e.g. a conv's weight name) whose consuming ops stay float.
        onnx_format: write QDQ ops with int8 weights (True, needed for paddle2onnx and small files) or the old
            fake-quant ops (False).

    Returns:
        QuantResult.

    Raises:
        ConfigError: unknown algo or op type.
        InputError: missing model or malformed calibration data.
    """
    import paddle
    from paddleslim.quant import quant_post_static

    _check_args(algo, quantizable_op_type)
    files = find_model_files(float_model_dir)
    batches = materialize_batches(calib_batches, batch_nums)
    start = time.time()
    feed_names = read_feed_names(float_model_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix=".ptq-", dir=parent)
    try:
        model_dir, model_name, params_name = _single_assignment_model(files, os.path.join(work_dir, "float_ssa"))
        with static_mode(), paddle.static.scope_guard(paddle.static.Scope()):
            quant_post_static(
                paddle.static.Executor(paddle.CPUPlace()), model_dir, work_dir,
                data_loader=calibration_loader(batches, feed_names),
                model_filename=model_name, params_filename=params_name,
                save_model_filename=MODEL_FILENAME, save_params_filename=PARAMS_FILENAME,
                batch_nums=len(batches), algo=algo, hist_percent=hist_percent,
                quantizable_op_type=list(quantizable_op_type), weight_quantize_type=weight_quantize_type,
                onnx_format=onnx_format, skip_tensor_list=list(skip_tensor_list or []) or None)
        _move_files_into(work_dir, out_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    result = QuantResult(
        model_dir=out_dir, algo=algo, onnx_format=onnx_format, calibration_batches=len(batches),
        skipped_layers=tuple(skip_tensor_list or ()),
        float_params_bytes=os.path.getsize(files.params_file) if files.params_file else 0,
        quant_params_bytes=os.path.getsize(os.path.join(out_dir, PARAMS_FILENAME)),
        seconds=time.time() - start)
    logger.info("PTQ %s: %d batches, %d layers kept float, params %.1f%% of float, %.1fs", algo, len(batches),
                len(result.skipped_layers), 100 * result.size_ratio, result.seconds)
    return result


def _move_files_into(work_dir, out_dir):
    """Move the finished model into ``out_dir`` file by file (each ``os.replace`` is atomic)."""
    os.makedirs(out_dir, exist_ok=True)
    for name in (PARAMS_FILENAME, MODEL_FILENAME):  # program last: a model file means the params are there
        os.replace(os.path.join(work_dir, name), os.path.join(out_dir, name))


def list_quantizable_layers(float_model_dir, quantizable_op_type=("conv2d", "depthwise_conv2d")):
    """Weight names of the layers PTQ would quantise, in program order (the keys of skip lists)."""
    import paddle

    files = find_model_files(float_model_dir)
    with static_mode(), paddle.static.scope_guard(paddle.static.Scope()):
        program, _, _ = paddle.static.load_inference_model(
            os.path.dirname(files.model_file), paddle.static.Executor(paddle.CPUPlace()),
            model_filename=os.path.basename(files.model_file),
            params_filename=os.path.basename(files.params_file) if files.params_file else None)
        persistable = {v.name for v in program.list_vars() if v.persistable}
        layers = []
        for op in program.global_block().ops:
            slot = WEIGHT_SLOTS.get(op.type)
            if op.type in quantizable_op_type and slot and op.input(slot) and op.input(slot)[0] in persistable:
                layers.append(op.input(slot)[0])
    return layers


@dataclasses.dataclass
class LayerSensitivity:
    """Metric of one quantisation variant.

    Attributes:
        layer: weight name of the layer that was treated differently.
        metric: eval_fn value of the variant.
        gain: for ``all_but_one``: metric - metric(all quantised), i.e. what keeping this layer float buys;
            for ``one_at_a_time``: metric(float) - metric, i.e. what quantising only this layer costs.
    """

    layer: str
    metric: float
    gain: float


def layer_quant_sensitivity(float_model_dir, calib_batches, eval_fn, *, mode="all_but_one", layers=None,
                            work_dir=None, **ptq_kwargs):
    """Measure how much each layer's quantisation hurts a metric, most sensitive first.

    Each variant is a full PTQ run with a skip list, so the cost is ``len(layers)`` PTQ runs plus evaluations;
    pass ``layers`` to restrict the search and ``algo='abs_max'`` to keep each run short.

    Args:
        float_model_dir: float inference model folder.
        calib_batches: calibration data, as for :func:`quantize_post_static`.
        eval_fn: ``eval_fn(model_dir) -> float``, higher is better, evaluating the model as deployed (INT8).
        mode: ``all_but_one`` (quantise everything except the layer) or ``one_at_a_time`` (quantise only it).
        layers: weight names to test (default: every quantisable layer).
        work_dir: scratch folder for the variants (default: a temporary folder, removed afterwards).
        **ptq_kwargs: passed to :func:`quantize_post_static`.

    Returns:
        list of LayerSensitivity sorted by decreasing ``gain``.
    """
    if mode not in ("all_but_one", "one_at_a_time"):
        raise ConfigError(f"sensitivity mode {mode!r} is unknown; use all_but_one or one_at_a_time")
    batches = materialize_batches(calib_batches, ptq_kwargs.pop("batch_nums", None))
    op_types = ptq_kwargs.get("quantizable_op_type", ("conv2d", "depthwise_conv2d"))
    all_layers = list_quantizable_layers(float_model_dir, op_types)
    layers = list(layers) if layers is not None else all_layers
    scratch = work_dir or tempfile.mkdtemp(prefix="quant-sensitivity-")
    try:
        variant_dir = os.path.join(scratch, "variant")
        if mode == "all_but_one":
            quantize_post_static(float_model_dir, variant_dir, batches, **ptq_kwargs)
            reference = eval_fn(variant_dir)
        else:
            reference = eval_fn(float_model_dir)
        results = []
        for layer in layers:
            skip = [layer] if mode == "all_but_one" else [name for name in all_layers if name != layer]
            try:
                quantize_post_static(float_model_dir, variant_dir, batches, skip_tensor_list=skip, **ptq_kwargs)
            except ValueError as error:  # Paddle 2.6 PTQ: "Generated graph shouldn't contain cycle" for some skips
                logger.warning("sensitivity: cannot keep %s float (%s); not a fallback candidate", layer,
                               str(error).splitlines()[0])
                continue
            metric = eval_fn(variant_dir)
            gain = metric - reference if mode == "all_but_one" else reference - metric
            results.append(LayerSensitivity(layer, metric, gain))
            logger.info("sensitivity %s %s: metric %.4f gain %+.4f", mode, layer, metric, gain)
    finally:
        if work_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return sorted(results, key=lambda item: item.gain, reverse=True)


@dataclasses.dataclass
class FallbackResult:
    """Outcome of :func:`ptq_with_fallback`.

    Attributes:
        quant: the final quantised model.
        float_metric: eval_fn of the float model.
        quant_metric: eval_fn of the final quantised model.
        skipped_layers: layers kept float, most sensitive first.
        met_budget: True when ``float_metric - quant_metric <= max_drop``.
        history: (number of skipped layers, metric) for each attempt.
    """

    quant: QuantResult
    float_metric: float
    quant_metric: float
    skipped_layers: tuple
    met_budget: bool
    history: list


def ptq_with_fallback(float_model_dir, out_dir, calib_batches, eval_fn, *, max_drop, max_skipped=5,
                      sensitivity=None, **ptq_kwargs):
    """PTQ, then keep the most sensitive layers float until the metric drop fits ``max_drop``.

    Args:
        float_model_dir: float inference model folder.
        out_dir: where the final quantised model is written.
        calib_batches: calibration data, as for :func:`quantize_post_static`.
        eval_fn: ``eval_fn(model_dir) -> float``, higher is better (run the model as deployed: INT8).
        max_drop: largest accepted ``float_metric - quant_metric``.
        max_skipped: most layers to keep float.
        sensitivity: precomputed :func:`layer_quant_sensitivity` result (computed here when needed if None).
        **ptq_kwargs: passed to :func:`quantize_post_static` (algo, quantizable_op_type, ...).

    Returns:
        FallbackResult; ``met_budget`` is False when even ``max_skipped`` float layers did not suffice
        (the caller decides whether that is a GateError).
    """
    batches = materialize_batches(calib_batches, ptq_kwargs.pop("batch_nums", None))
    float_metric = eval_fn(float_model_dir)
    quant = quantize_post_static(float_model_dir, out_dir, batches, **ptq_kwargs)
    metric = eval_fn(out_dir)
    history = [(0, metric)]
    skipped = []
    if float_metric - metric > max_drop and max_skipped > 0:
        try:
            candidates = (sensitivity or layer_quant_sensitivity(float_model_dir, batches, eval_fn,
                                                                 **ptq_kwargs))[:max_skipped]
        except GraphCycleError as error:  # the ranking's own PTQ runs: keep the INT8 model already made
            logger.warning("fallback: no sensitivity ranking, every layer stays INT8 (%s)", error)
            candidates = []
        for item in candidates:
            try:
                quant = quantize_post_static(float_model_dir, out_dir, batches, skip_tensor_list=skipped + [item.layer],
                                             **ptq_kwargs)
            except ValueError as error:  # see layer_quant_sensitivity; out_dir keeps the last good model
                logger.warning("fallback: cannot keep %s float (%s)", item.layer, str(error).splitlines()[0])
                continue
            skipped.append(item.layer)
            metric = eval_fn(out_dir)
            history.append((len(skipped), metric))
            logger.info("fallback: %d layers float, metric %.4f (float %.4f)", len(skipped), metric, float_metric)
            if float_metric - metric <= max_drop:
                break
    return FallbackResult(quant, float_metric, metric, tuple(skipped), float_metric - metric <= max_drop, history)
