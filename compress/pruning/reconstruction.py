"""Closed-form reconstruction of the layers that read pruned channels, and the statistics it is built from.

Bias compensation (:mod:`compress.pruning.compensation`) restores the *mean* of what a consumer loses when its
input channels are removed. Reconstruction restores as much of the rest as a linear layer can: every dense
consumer (conv with ``groups == 1``, 1x1 or kxk through its patches, SE convs, Linear) is re-solved by ridge least
squares so that, on calibration images, its output matches the unpruned model's output of the same layer::

    W = (X^T X + lambda I)^-1 X^T Y,     lambda = damp * mean(diag(X^T X))

``X`` are the layer's inputs in the *pruned* network (after the layers before it were re-solved, so errors do not
pile up), one row per output position, with a ones column for the bias; ``Y`` the unpruned network's outputs of
that layer at the same positions, restricted to the kept output channels. Layers are solved one after the other
in execution order (as in the layer-wise reconstruction of ThiNet / "Channel Pruning" (He et al. 2017) and of
Optimal Brain Compression / ZipLM). Only forward passes, no labels, no gradients. ``X^T X`` and ``X^T Y`` are
accumulated over batches in float64; spatial positions are subsampled (``max_rows`` per batch) on large maps.
The unpruned model's sampled outputs of every layer come from one forward pass per batch, kept in memory up to
:data:`TARGET_CACHE_BYTES`; the pruned model is run again for each layer (det's default plan: 64 s instead of 136 s).

Where a layer's output goes:

* a conv / Linear with a bias (PP-LCNetV3's re-parameterised ``reparam_conv``, whose ``LearnableAffineBlock`` and
  activation follow): the conv output itself is the target; weight and bias are replaced;
* a bias-free conv followed by BatchNorm (det head, rec SVTR neck): the target is the conv output *before* the
  BatchNorm; the solved bias is folded into the BatchNorm's running mean (``BN(y + b)`` with mean ``m`` equals
  ``BN(y)`` with mean ``m - b``), which is exact;
* a bias-free conv with nothing to fold into (det RSEFPN ``in_conv``): solved without a ones column.

Depth-wise convs need nothing: removing a channel removes its input and its output together, exactly.

:func:`measure_input_grams` measures the same Gram matrices ``X^T X`` on the *unpruned* model in one pass; they
serve the ``obs`` criterion (:mod:`compress.pruning.criteria`) and :func:`local_reconstruction_deltas`, the cheap
variant used by the sensitivity analysis (each consumer re-solved from the unpruned model's own input statistics,
assuming its kept inputs are unchanged, which holds for a consumer right after the pruned layer).

The new weights are written before the model is saved, so a pruned checkpoint carries them in its ``state_dict``
and restoring it needs only the plan.
"""
import dataclasses
import time

import numpy as np
import paddle
from tqdm import tqdm

from compress.errors import ConfigError
from compress.models import batch_norm_layers
from finetune.fast_ops import fast_cpu_ops


# memory for the unpruned model's sampled layer outputs, measured once per batch instead of once per layer and batch
# (det default plan: 24 layers x 16 pages, about 0.5 GiB)
TARGET_CACHE_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class ReconstructionConfig:
    """How :func:`reconstruct` re-solves layers.

    Attributes:
        damp: relative ridge damping, ``lambda = damp * mean(diag(X^T X))`` (the bias entry is not damped).
        layers: ``"pruned_inputs"``: only the layers whose input channels were removed; ``"all"``: every dense
            layer that runs after the first of those too (error correction of everything downstream).
        max_rows: output positions sampled per batch and layer (all of them when fewer).
        seed: seed of the position sampling.
        stats_correction: after solving, scale each kept output channel so its standard deviation on the
            calibration rows matches the unpruned model's (least squares shrinks it) and re-centre its mean;
            folded into the same weight and bias.
        solve: False skips the least-squares solve (only ``stats_correction``, if on).
    """

    damp: float = 0.01
    layers: str = "pruned_inputs"
    max_rows: int = 4096
    seed: int = 0
    stats_correction: bool = False
    solve: bool = True

    def validate(self, where="reconstruction"):
        if self.layers not in ("pruned_inputs", "all"):
            raise ConfigError(f"{where}.layers: {self.layers!r} is not allowed; use one of: pruned_inputs, all")
        if not self.damp >= 0.0:
            raise ConfigError(f"{where}.damp: must be >= 0, got {self.damp}")
        if self.max_rows < 1:
            raise ConfigError(f"{where}.max_rows: must be >= 1, got {self.max_rows}")


@dataclasses.dataclass
class LayerReconstruction:
    """One re-solved layer: relative output error ``||Y_pruned - Y||^2 / ||Y||^2`` on the calibration rows."""

    layer: str
    rows: int
    columns: int
    error_before: float
    error_after: float
    bias: str  # "bias" | "batchnorm mean" | "none"


@dataclasses.dataclass
class ReconstructionReport:
    """What :func:`reconstruct` did: solved layers in order, skipped layers and why, time, samples."""

    layers: list
    skipped: dict
    seconds: float
    samples: int

    def summary(self):
        """Mean relative error before -> after over the solved layers (for a stage's summary line)."""
        if not self.layers:
            return "no layer re-solved"
        before = float(np.mean([layer.error_before for layer in self.layers]))
        after = float(np.mean([layer.error_after for layer in self.layers]))
        return f"{len(self.layers)} layers re-solved, rel. error {before:.3f} -> {after:.3f}"

    def to_json(self):
        return {"layers": [dataclasses.asdict(layer) for layer in self.layers], "skipped": dict(self.skipped),
                "seconds": round(self.seconds, 1), "samples": self.samples}


# ------------------------------------------------------------------------------------------ layer geometry


@dataclasses.dataclass(frozen=True)
class _Geometry:
    kind: str  # "conv" | "linear"
    kernel: tuple = (1, 1)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)  # top, bottom, left, right
    dilation: tuple = (1, 1)

    @property
    def pointwise(self):
        return self.kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0, 0, 0)


def _pair(value):
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value), int(value))


def layer_geometry(layer):
    """How a dense layer maps inputs to output rows, or a string saying why it cannot be re-solved."""
    if isinstance(layer, paddle.nn.Linear):
        return _Geometry("linear")
    if not isinstance(layer, paddle.nn.Conv2D) or isinstance(layer, paddle.nn.Conv2DTranspose):
        return f"{type(layer).__name__} is not a dense conv or Linear"
    if layer._groups != 1:
        return "grouped / depth-wise conv (channel removal is exact there)"
    if layer._data_format != "NCHW" or layer._padding_mode != "zeros":
        return f"conv with data format {layer._data_format} / padding mode {layer._padding_mode}"
    padding = layer._padding
    if isinstance(padding, str):
        return f"conv with padding {padding!r}"
    padding = [int(p) for p in padding] if isinstance(padding, (list, tuple)) else [int(padding)]
    if len(padding) == 1:
        padding = padding * 4
    elif len(padding) == 2:
        padding = [padding[0], padding[0], padding[1], padding[1]]
    elif len(padding) != 4:
        return f"conv with padding {layer._padding!r}"
    return _Geometry("conv", _pair(layer._kernel_size), _pair(layer._stride), tuple(padding),
                     _pair(layer._dilation))


def dense_layers(model):
    """Structured name -> layer of every conv with ``groups == 1`` and every Linear (the layers re-solved)."""
    return {name: layer for name, layer in model.named_sublayers()
            if (isinstance(layer, paddle.nn.Conv2D) and not isinstance(layer, paddle.nn.Conv2DTranspose)
                and layer._groups == 1) or isinstance(layer, paddle.nn.Linear)}


def _row_count(geometry, shape):
    return shape[0] * shape[2] * shape[3] if geometry.kind == "conv" else int(np.prod(shape[:-1]))


def _sample_rows(total, max_rows, rng):
    if total <= max_rows:
        return None
    return np.sort(rng.choice(total, size=max_rows, replace=False))


def input_rows(geometry, x, output_shape, rows=None):
    """The layer's input as a matrix, one row per output position (conv: its kxk patch, channel-major like the
    weight's ``reshape(O, -1)``); ``rows`` selects positions (indices into N*Ho*Wo), None = all."""
    x = np.asarray(x, dtype="float64")
    if geometry.kind == "linear":
        flat = x.reshape(-1, x.shape[-1])
        return flat if rows is None else flat[rows]
    n_out, _, h_out, w_out = output_shape
    if geometry.pointwise:
        flat = x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
        return flat if rows is None else flat[rows]
    rows = np.arange(n_out * h_out * w_out) if rows is None else rows
    n, i, j = rows // (h_out * w_out), (rows // w_out) % h_out, rows % w_out
    top, bottom, left, right = geometry.padding
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel, geometry.stride, geometry.dilation
    hs = i[:, None] * sh + np.arange(kh)[None, :] * dh  # (R, kh)
    ws = j[:, None] * sw + np.arange(kw)[None, :] * dw  # (R, kw)
    patches = padded[n[:, None, None, None], np.arange(x.shape[1])[None, :, None, None],
                     hs[:, None, :, None], ws[:, None, None, :]]
    return patches.reshape(len(rows), -1)


def output_rows(geometry, y, rows=None):
    """The layer's output as a matrix [rows, output channels]."""
    y = np.asarray(y, dtype="float64")
    flat = y.reshape(-1, y.shape[-1]) if geometry.kind == "linear" else y.transpose(0, 2, 3, 1).reshape(-1, y.shape[1])
    return flat if rows is None else flat[rows]


def weight_matrix(geometry, weight):
    """A layer weight as ``[input columns, outputs]`` (conv OIHW -> [I*kh*kw, O]; Linear is already [in, out])."""
    weight = np.asarray(weight, dtype="float64")
    return weight if geometry.kind == "linear" else weight.reshape(weight.shape[0], -1).T


def _matrix_to_weight(geometry, matrix, shape):
    return matrix if geometry.kind == "linear" else matrix.T.reshape(shape)


def _column_channels(geometry, weight_shape):
    """Input channel of each column of :func:`weight_matrix`."""
    if geometry.kind == "linear":
        return np.arange(weight_shape[0])
    return np.repeat(np.arange(weight_shape[1]), weight_shape[2] * weight_shape[3])


# ------------------------------------------------------------------------------------------ Gram statistics


@dataclasses.dataclass
class InputGram:
    """``sum x x^T`` of one layer's input rows (patches for a kxk conv) with a ones column appended last.

    Attributes:
        gram: float64 [columns + 1, columns + 1]; the last row/column is the ones column (its diagonal entry is
            the number of rows).
        channels: input channel of each column (kxk conv: each channel spans kh*kw columns).
    """

    gram: np.ndarray
    channels: np.ndarray

    @property
    def rows(self):
        return int(round(self.gram[-1, -1]))


def _with_ones(matrix):
    return np.concatenate([matrix, np.ones((matrix.shape[0], 1))], axis=1)


def measure_input_grams(model, batches, max_rows=1024, seed=0, layers=None):
    """Gram matrices of the inputs of every dense layer (or ``layers``) of ``model`` over ``batches``, one pass.

    Args:
        model: the (unpruned) model; its mode is restored.
        batches: iterable of NCHW float arrays.
        max_rows: output positions sampled per batch and layer call.
        seed: sampling seed.
        layers: names to measure (default: :func:`dense_layers`).

    Returns:
        dict: layer name -> :class:`InputGram` (layers whose geometry is unsupported are left out).
    """
    targets = {name: layer for name, layer in dense_layers(model).items() if layers is None or name in layers}
    grams, calls, hooks = {}, {}, []

    def recorder(name, geometry):
        def hook(layer, inputs, output):
            calls[name] = calls.get(name, 0) + 1
            rng = np.random.default_rng([seed, calls[name]])
            rows = _sample_rows(_row_count(geometry, output.shape), max_rows, rng)
            x = _with_ones(input_rows(geometry, inputs[0].numpy(), output.shape, rows))
            grams[name] = grams.get(name, 0.0) + x.T @ x
        return hook

    geometries = {}
    for name, layer in targets.items():
        geometry = layer_geometry(layer)
        if isinstance(geometry, _Geometry):
            geometries[name] = geometry
            hooks.append(layer.register_forward_post_hook(recorder(name, geometry)))
    _forward_all(model, batches, hooks)
    return {name: InputGram(gram, _column_channels(geometries[name], list(targets[name].weight.shape)))
            for name, gram in grams.items()}


def _forward_all(model, batches, hooks):
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            for batch in batches:
                model(paddle.to_tensor(batch))
    finally:
        for hook in hooks:
            hook.remove()
        if was_training:
            model.train()


# ------------------------------------------------------------------------------------------ solving

# Statistics correction scales a channel's std by at most this much either way: a channel the pruned network
# cannot reproduce (nearly constant now) is not blown up.
STD_SCALE_LIMITS = (0.25, 4.0)


def ridge_solve(gram, cross, damp, bias_column):
    """``(G + lambda I)^-1 C`` with ``lambda = damp * mean(diag(G))`` over the weight columns (the ones column,
    last when ``bias_column``, is not damped: the mean is matched exactly)."""
    weights = gram.shape[0] - (1 if bias_column else 0)
    damped = gram.copy()
    diagonal = np.arange(weights)
    scale = float(np.mean(np.diag(gram)[:weights])) if weights else 0.0
    damped[diagonal, diagonal] += damp * scale if scale > 0 else 1e-8
    try:
        return np.linalg.solve(damped, cross)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(damped, cross, rcond=None)[0]


def _relative_error(matrix, gram, cross, target_square):
    """``||X W - Y||^2 / ||Y||^2`` from the normal-equation sums (no rows kept)."""
    error = np.einsum("ij,ik,kj->", matrix, gram, matrix) - 2.0 * np.sum(matrix * cross) + target_square
    return float(max(error, 0.0) / target_square) if target_square > 0 else 0.0


def _match_statistics(matrix, gram, column_sums, target_sums, target_squares, rows, bias_column):
    """Scale (and re-centre, with a bias column) each output so its mean/std on the rows match the target's."""
    mean = column_sums @ matrix / rows
    variance = np.maximum(np.einsum("ij,ik,kj->j", matrix, gram, matrix) / rows - mean ** 2, 0.0)
    target_mean = target_sums / rows
    target_variance = np.maximum(target_squares / rows - target_mean ** 2, 0.0)
    scale = np.where(variance > 1e-12, np.sqrt(target_variance / np.maximum(variance, 1e-12)), 1.0)
    scale = np.clip(scale, *STD_SCALE_LIMITS)
    corrected = matrix * scale[None, :]
    if bias_column:
        corrected[-1] = (matrix[-1] - mean) * scale + target_mean
    return corrected


# ------------------------------------------------------------------------------------------ sequential passes


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the layer of interest has run."""


def _capture(model, layer, batch):
    """Run ``model`` on ``batch`` until ``layer`` has run once; return its (input, output) as numpy arrays."""
    captured = {}

    def hook(_, inputs, output):
        captured["x"], captured["y"] = inputs[0].numpy(), output.numpy()
        raise _Stop()

    handle = layer.register_forward_post_hook(hook)
    try:
        with paddle.no_grad():
            model(paddle.to_tensor(batch))
    except _Stop:
        pass
    finally:
        handle.remove()
    if "x" not in captured:
        raise RuntimeError(f"layer {type(layer).__name__} did not run in the forward pass")
    return captured["x"], captured["y"]


def execution_order(model, batch):
    """Dense layer names in the order the forward runs them, and how many times each ran."""
    order, calls, hooks = [], {}, []
    for name, layer in dense_layers(model).items():
        def hook(_, inputs, output, name=name):
            if name not in calls:
                order.append(name)
            calls[name] = calls.get(name, 0) + 1
        hooks.append(layer.register_forward_post_hook(hook))
    _forward_all(model, [batch], hooks)
    return order, calls


def _input_pruned_layers(plan, layers):
    changed = set()
    for name, layer in layers.items():
        change = plan.tensors.get(f"{name}.weight")
        in_axis = 0 if isinstance(layer, paddle.nn.Linear) else 1
        if change is not None and in_axis in change.kept:
            changed.add(name)
    return changed


def _kept_outputs(plan, name, layer):
    change = plan.tensors.get(f"{name}.weight")
    out_axis = 1 if isinstance(layer, paddle.nn.Linear) else 0
    if change is None or out_axis not in change.kept:
        return None
    return np.asarray(change.kept[out_axis], dtype="int64")


def _batchnorm_after(trace, name):
    """Structured name of the BatchNorm layer right after a bias-free conv (from the trace), or None."""
    if trace is None:
        return None
    scale = trace.bn_after.get(f"{name}.weight")
    return scale.rsplit(".", 1)[0] if scale else None


def reconstruct(model, teacher, plan, batches, config=ReconstructionConfig(), trace=None, show_progress=False,
                cache_bytes=TARGET_CACHE_BYTES):
    """Re-solve, in place, the dense layers of the pruned ``model`` so their outputs match ``teacher``'s.

    Args:
        model: the pruned model (``apply_plan`` done); changed in place.
        teacher: the same model before pruning (e.g. a ``copy.deepcopy`` taken before ``apply_plan``).
        plan: the applied :class:`compress.pruning.plan.PrunePlan` (which layers lost inputs, kept outputs).
        batches: calibration inputs (NCHW arrays); iterated once per re-solved layer.
        config: :class:`ReconstructionConfig`.
        trace: the unpruned model's trace, to find the BatchNorm after a bias-free conv (without it such convs
            are solved with no bias).
        show_progress: one tqdm bar over the layers.
        cache_bytes: memory for the unpruned model's sampled outputs, measured in one pass per batch for all the
            layers that fit (the others are re-run per layer, as the pruned model is); the result is the same.

    Returns:
        ReconstructionReport
    """
    config.validate()
    started = time.perf_counter()
    batches = [np.asarray(b, dtype="float32") for b in batches]
    if not batches:
        raise ConfigError("reconstruction needs at least one calibration batch")
    layers, teacher_layers = dense_layers(model), dict(teacher.named_sublayers())
    order, calls = execution_order(model, batches[0])
    changed = _input_pruned_layers(plan, layers)
    first = next((i for i, name in enumerate(order) if name in changed), len(order))
    targets = [name for i, name in enumerate(order)
               if name in changed or (config.layers == "all" and i > first)]
    skipped = {name: "did not run in the forward pass" for name in changed if name not in calls}
    report = []
    reasons = {name: _reason_to_skip(layers[name], teacher_layers.get(name), calls.get(name, 0)) for name in targets}
    was_training, teacher_training = model.training, teacher.training
    model.eval()
    teacher.eval()
    # forward passes through the faster CPU formulations of finetune.fast_ops (the same values to float
    # rounding): rec's reconstruction on 256 lines is mostly these passes
    with fast_cpu_ops(model), fast_cpu_ops(teacher):
        try:
            cached = _teacher_targets(teacher, [(i, name) for i, name in enumerate(targets) if not reasons[name]],
                                      layers, plan, batches, config, cache_bytes)
            for index, name in enumerate(tqdm(targets, desc="reconstruct", unit="layer", disable=not show_progress)):
                if reasons[name]:
                    skipped[name] = reasons[name]
                    continue
                result = _reconstruct_layer(model, teacher, name, index, plan, batches, config, trace,
                                            cached.pop(name, None))
                if isinstance(result, str):
                    skipped[name] = result
                else:
                    report.append(result)
        finally:
            if was_training:
                model.train()
            if teacher_training:
                teacher.train()
    samples = sum(len(b) for b in batches)
    return ReconstructionReport(report, skipped, time.perf_counter() - started, samples)


def _teacher_sample(geometry, y_teacher, config, index, batch_index, kept_out):
    """What the ``index``-th target layer is solved against on batch ``batch_index``: (the teacher's output shape,
    the sampled output positions (None: all), the teacher's outputs there on the kept channels, float32 as the
    teacher computed them)."""
    rng = np.random.default_rng([config.seed, index, batch_index])
    rows = _sample_rows(_row_count(geometry, y_teacher.shape), config.max_rows, rng)
    target = output_rows(geometry, y_teacher, rows)
    target = target if kept_out is None else target[:, kept_out]
    return y_teacher.shape, rows, target.astype("float32")


def _teacher_targets(teacher, indexed_names, layers, plan, batches, config, cache_bytes):
    """:func:`_teacher_sample` of every layer in ``indexed_names`` ((target index, name) pairs) that fits in
    ``cache_bytes``, from one forward pass per batch: {name: [sample per batch]}, the same samples
    :func:`_reconstruct_layer` takes when it captures the teacher itself. The bound counts ``max_rows`` rows of the
    kept outputs per batch in float32."""
    teacher_layers = dict(teacher.named_sublayers())
    chosen, used = [], 0
    for index, name in indexed_names:
        kept_out = _kept_outputs(plan, name, layers[name])
        channels = len(kept_out) if kept_out is not None else _output_channels(layers[name])
        size = 4 * config.max_rows * channels * len(batches)
        if used + size > cache_bytes:
            break
        chosen.append((index, name, kept_out, layer_geometry(layers[name])))
        used += size
    cached = {name: [] for _, name, _, _ in chosen}
    if not chosen:
        return cached
    passes = []  # one entry per forward pass started: the batch index is len(passes) - 1

    def count_pass(_, inputs):
        passes.append(None)

    hooks = [teacher.register_forward_pre_hook(count_pass)]
    for index, name, kept_out, geometry in chosen:
        def record(_, inputs, output, index=index, name=name, kept_out=kept_out, geometry=geometry):
            batch_index = len(passes) - 1
            if len(cached[name]) == batch_index:  # its first call in this pass
                cached[name].append(_teacher_sample(geometry, output.numpy(), config, index, batch_index, kept_out))
        hooks.append(teacher_layers[name].register_forward_post_hook(record))
    _forward_all(teacher, batches, hooks)
    return {name: samples for name, samples in cached.items() if len(samples) == len(batches)}  # others: re-run


def _output_channels(layer):
    return int(layer.weight.shape[1 if isinstance(layer, paddle.nn.Linear) else 0])


def _reason_to_skip(layer, teacher_layer, calls):
    geometry = layer_geometry(layer)
    if isinstance(geometry, str):
        return geometry
    if teacher_layer is None:
        return "no layer of that name in the teacher"
    if calls != 1:
        return f"runs {calls} times per forward (shared weights): one least-squares target per call is ambiguous"
    return None


def _reconstruct_layer(model, teacher, name, index, plan, batches, config, trace, cached=None):
    layer, teacher_layer = dict(model.named_sublayers())[name], dict(teacher.named_sublayers())[name]
    geometry = layer_geometry(layer)
    kept_out = _kept_outputs(plan, name, layer)
    bn_name = None if layer.bias is not None else _batchnorm_after(trace, name)
    bias_column = layer.bias is not None or bn_name is not None
    gram = cross = column_sums = target_sums = target_squares = None
    rows_total = 0
    for batch_index, batch in enumerate(batches):
        teacher_shape, rows, target = cached[batch_index] if cached is not None else _teacher_sample(
            geometry, _capture(teacher, teacher_layer, batch)[1], config, index, batch_index, kept_out)
        x, y = _capture(model, layer, batch)
        if y.shape[2:] != teacher_shape[2:] or y.shape[0] != teacher_shape[0]:
            return f"output shape {list(y.shape)} differs from the teacher's {list(teacher_shape)}"
        inputs = input_rows(geometry, x, y.shape, rows)  # the same positions: the shapes match
        if bias_column:
            inputs = _with_ones(inputs)
        target = target.astype("float64")  # float32 is the teacher's own precision: exact
        if target.shape[1] != y.shape[1 if geometry.kind == "conv" else -1]:
            return f"{target.shape[1]} teacher outputs for {y.shape[1]} pruned outputs"
        if gram is None:
            gram = np.zeros((inputs.shape[1], inputs.shape[1]))
            cross = np.zeros((inputs.shape[1], target.shape[1]))
            column_sums, target_sums = np.zeros(inputs.shape[1]), np.zeros(target.shape[1])
            target_squares = np.zeros(target.shape[1])
        gram += inputs.T @ inputs
        cross += inputs.T @ target
        column_sums += inputs.sum(axis=0)
        target_sums += target.sum(axis=0)
        target_squares += (target ** 2).sum(axis=0)
        rows_total += inputs.shape[0]
    current = _current_matrix(model, teacher, layer, geometry, name, bn_name, kept_out)
    error_before = _relative_error(current, gram, cross, target_squares.sum())
    solved = ridge_solve(gram, cross, config.damp, bias_column) if config.solve else current
    if config.stats_correction:
        solved = _match_statistics(solved, gram, column_sums, target_sums, target_squares, rows_total, bias_column)
    error_after = _relative_error(solved, gram, cross, target_squares.sum())
    if config.solve and not config.stats_correction and error_after >= error_before:
        return f"least squares did not lower the error ({error_before:.4f} -> {error_after:.4f}); kept"
    _write_matrix(model, teacher, layer, geometry, name, bn_name, kept_out, solved)
    return LayerReconstruction(name, rows_total, gram.shape[0] - int(bias_column), error_before, error_after,
                               "bias" if layer.bias is not None else ("batchnorm mean" if bn_name else "none"))


def _bn_layers(model, teacher, bn_name):
    return dict(model.named_sublayers())[bn_name], dict(teacher.named_sublayers())[bn_name]


def _current_matrix(model, teacher, layer, geometry, name, bn_name, kept_out):
    """The layer's present weights as [columns (+ bias), outputs], the bias relative to the teacher's output."""
    matrix = weight_matrix(geometry, layer.weight.numpy())
    if layer.bias is not None:
        return np.concatenate([matrix, layer.bias.numpy().astype("float64")[None]], axis=0)
    if bn_name is None:
        return matrix
    bn, teacher_bn = _bn_layers(model, teacher, bn_name)
    teacher_mean = teacher_bn._mean.numpy().astype("float64")
    teacher_mean = teacher_mean if kept_out is None else teacher_mean[kept_out]
    # BN(y) with mean m equals BN(y + (m_teacher - m)) with the teacher's mean m_teacher
    return np.concatenate([matrix, (teacher_mean - bn._mean.numpy().astype("float64"))[None]], axis=0)


def _write_matrix(model, teacher, layer, geometry, name, bn_name, kept_out, matrix):
    shape = list(layer.weight.shape)
    bias_column = layer.bias is not None or bn_name is not None
    weights = matrix[:-1] if bias_column else matrix
    layer.weight.set_value(_matrix_to_weight(geometry, weights, shape).astype(layer.weight.numpy().dtype))
    if layer.bias is not None:
        layer.bias.set_value(matrix[-1].astype(layer.bias.numpy().dtype))
    elif bn_name is not None:
        bn, teacher_bn = _bn_layers(model, teacher, bn_name)
        teacher_mean = teacher_bn._mean.numpy().astype("float64")
        teacher_mean = teacher_mean if kept_out is None else teacher_mean[kept_out]
        bn._mean.set_value((teacher_mean - matrix[-1]).astype(bn._mean.numpy().dtype))


# ------------------------------------------------------------------------------------------ local (sensitivity)


def local_reconstruction_deltas(model, plan, grams, damp=0.01, trace=None):
    """Parameter deltas that re-solve each layer whose inputs ``plan`` removes, from the unpruned model's input
    Gram matrices alone: ``W_K = (H_KK + lambda I)^-1 H_K: W`` (kept columns ``K``, ones column included).

    Exact when the layer's kept inputs are what they were before pruning (a consumer right after the pruned conv,
    through depth-wise convs and residual sums of the same group); SE-scaled inputs are approximated. No forward
    pass: this is what the sensitivity analysis uses per (layer, ratio).

    Args:
        model: the unpruned model (read only).
        plan: a plan for it.
        grams: :func:`measure_input_grams` of the model.
        damp: relative damping.
        trace: the model's trace (finds the BatchNorm after a bias-free conv).

    Returns:
        tuple: ``(deltas, layers)``: parameter name -> array to add (unpruned shapes; the removed slices are
        zeroed or sliced away afterwards), and the layers re-solved.
    """
    layers = dense_layers(model)
    deltas, solved = {}, []
    for name in sorted(_input_pruned_layers(plan, layers)):
        layer, gram = layers[name], grams.get(name)
        geometry = layer_geometry(layer)
        if gram is None or isinstance(geometry, str):
            continue
        bn_name = None if layer.bias is not None else _batchnorm_after(trace, name)
        bias_column = layer.bias is not None or bn_name is not None
        in_axis = 0 if geometry.kind == "linear" else 1
        kept_channels = np.asarray(plan.tensors[f"{name}.weight"].kept[in_axis])
        columns = np.flatnonzero(np.isin(gram.channels, kept_channels))
        weight = layer.weight.numpy()
        full = weight_matrix(geometry, weight)
        all_columns = np.arange(full.shape[0])
        if bias_column:
            bias = layer.bias.numpy().astype("float64") if layer.bias is not None else np.zeros(full.shape[1])
            full = np.concatenate([full, bias[None]], axis=0)
            columns = np.append(columns, gram.gram.shape[0] - 1)
            all_columns = np.append(all_columns, gram.gram.shape[0] - 1)
        h = gram.gram[np.ix_(all_columns, all_columns)]
        position = {c: i for i, c in enumerate(all_columns)}
        kept = np.array([position[c] for c in columns])
        new = ridge_solve(h[np.ix_(kept, kept)], h[kept] @ full, damp, bias_column)
        updated = np.zeros_like(full)
        updated[kept] = new
        new_weight = _matrix_to_weight(geometry, updated[:full.shape[0] - int(bias_column)], list(weight.shape))
        deltas[f"{name}.weight"] = (new_weight - weight).astype(weight.dtype)
        if layer.bias is not None:
            deltas[f"{name}.bias"] = (updated[-1] - full[-1]).astype("float32")
        elif bn_name is not None:
            deltas[f"{bn_name}._mean"] = (-updated[-1]).astype("float32")
        solved.append(name)
    return deltas, solved


# ------------------------------------------------------------------------------------------ BatchNorm statistics


def reestimate_batchnorm(model, batches, layer_names=None):
    """Set the running mean / variance of BatchNorm layers to their inputs' statistics over ``batches``.

    The statistics are measured in eval mode in one pass (what each BatchNorm sees at inference with the other
    BatchNorms as they were), averaged over all positions; the model's mode is restored.

    Returns:
        list[str]: the BatchNorm layers updated.
    """
    targets = {name: layer for name, layer in batch_norm_layers(model)
               if layer_names is None or name in layer_names}
    sums, squares, counts, hooks = {}, {}, {}, []

    def recorder(name):
        def hook(_, inputs):
            x = inputs[0].numpy().astype("float64")
            axes = (0, 2, 3) if x.ndim == 4 else (0,)
            sums[name] = sums.get(name, 0.0) + x.sum(axis=axes)
            squares[name] = squares.get(name, 0.0) + (x ** 2).sum(axis=axes)
            counts[name] = counts.get(name, 0) + x.size // x.shape[1]
        return hook

    for name, layer in targets.items():
        hooks.append(layer.register_forward_pre_hook(recorder(name)))
    _forward_all(model, batches, hooks)
    for name in sums:
        mean = sums[name] / counts[name]
        variance = np.maximum(squares[name] / counts[name] - mean ** 2, 0.0)
        layer = targets[name]
        layer._mean.set_value(mean.astype("float32"))
        layer._variance.set_value(variance.astype("float32"))
    return sorted(sums)
