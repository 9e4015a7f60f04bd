"""Data-aware pruning: input statistics of every consumer layer, and bias compensation from them.

When a conv loses output channels, every layer that reads them (the next dense conv, an SE conv, a Linear) loses
the term ``sum_c W[:, c] * x_c`` of those channels. A channel whose activation is nearly constant over the data is
common after re-parameterisation: PP-LCNetV3's ``LearnableRepLayer`` folds its BatchNorm shifts into a conv bias,
so a filter with small weights can still carry a large constant. Weight-norm criteria score such a filter as
unimportant, yet removing it shifts every output of the consumer: on PP-OCRv4 rec, pruning 30% of one pointwise
conv by L1 norm took the recognition accuracy from 0.92 to 0.

Two remedies, both from statistics measured once on the unpruned model over a few calibration batches:

* **compensation**: add ``sum_c mean(x_c) * sum_k W[:, c, k]`` of the removed channels to the consumer's bias (for
  a bias-free conv followed by BatchNorm, subtract it from the BatchNorm's running mean). This keeps the expected
  value of the consumer's output; it is exact for constant channels and 1x1 convs (conv borders with zero
  padding see the mean only partially).
* the ``activation`` criterion (:mod:`compress.pruning.criteria`): a channel matters by how much it *varies*,
  ``std(x_c) * ||W[:, c]||`` summed over its consumers; once its mean is compensated, a low-variance channel can
  go at little cost.

The corrections are applied to the weights before slicing, so a pruned checkpoint carries them in its
``state_dict`` and ``restore`` (plan + weights) needs nothing else.
"""
import dataclasses

import numpy as np
import paddle


@dataclasses.dataclass
class ActivationStats:
    """Per-input-channel mean and standard deviation of every dense conv / Linear layer of a model.

    Attributes:
        means, stds: layer name -> float64 array of length C_in (conv: over N, H, W; Linear: over leading axes).
        samples: number of input samples (images / text lines) measured.
        grams: layer name -> :class:`compress.pruning.reconstruction.InputGram` (input Gram matrix with a ones
            column) when measured with ``grams=True``; the ``obs`` criterion and the sensitivity analysis's
            reconstruction need them.
        cache: per-statistics memo of criteria that are costly to score (``obs``); never serialised.
    """

    means: dict
    stds: dict
    samples: int
    grams: dict = dataclasses.field(default_factory=dict)
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def input_axis(self, weight):
        """The input-channel axis of a consumer's weight array (conv OIHW: 1, Linear [in, out]: 0)."""
        return 1 if np.ndim(weight) == 4 else 0


@dataclasses.dataclass
class Compensation:
    """Corrections for one plan.

    Attributes:
        deltas: parameter name -> value to add (same shape as the unpruned parameter).
        layers: consumer layers that were compensated.
        skipped: consumer layer -> why it could not be compensated.
    """

    deltas: dict
    layers: list
    skipped: dict


def dense_consumers(model):
    """Structured name -> layer for every layer whose removed input channels can be compensated: convs with
    ``groups == 1`` and Linear layers (a depth-wise conv loses its output channel together with its input)."""
    return {name: layer for name, layer in model.named_sublayers()
            if (isinstance(layer, paddle.nn.Conv2D) and layer._groups == 1) or isinstance(layer, paddle.nn.Linear)}


def measure_activation_stats(model, batches, grams=False, gram_rows=1024):
    """Mean and standard deviation of every input channel of every dense consumer over ``batches``.

    Args:
        model: the unpruned model (its train/eval mode is restored afterwards).
        batches: iterable of NCHW float arrays (model inputs), e.g. ``task.input_batches("calibration")``.
        grams: also measure each dense layer's input Gram matrix (a second pass over the same batches).
        gram_rows: output positions sampled per batch and layer for the Gram matrices.

    Returns:
        ActivationStats
    """
    batches = list(batches)
    sums, squares, counts, hooks = {}, {}, {}, []

    def recorder(name):
        def hook(layer, inputs):
            x = inputs[0].astype("float64")
            if isinstance(layer, paddle.nn.Conv2D):
                axes, count = [0, 2, 3], x.shape[0] * x.shape[2] * x.shape[3]
            else:
                x = x.reshape([-1, x.shape[-1]])
                axes, count = [0], x.shape[0]
            sums[name] = sums.get(name, 0.0) + x.sum(axis=axes).numpy()
            squares[name] = squares.get(name, 0.0) + (x * x).sum(axis=axes).numpy()
            counts[name] = counts.get(name, 0) + count
        return hook

    for name, layer in dense_consumers(model).items():
        hooks.append(layer.register_forward_pre_hook(recorder(name)))
    was_training, samples = model.training, 0
    model.eval()
    try:
        with paddle.no_grad():
            for batch in batches:
                model(paddle.to_tensor(batch))
                samples += len(batch)
    finally:
        for hook in hooks:
            hook.remove()
        if was_training:
            model.train()
    means = {name: sums[name] / counts[name] for name in sums}
    stds = {name: np.sqrt(np.maximum(squares[name] / counts[name] - means[name] ** 2, 0.0)) for name in sums}
    input_grams = {}
    if grams:
        from compress.pruning.reconstruction import measure_input_grams
        input_grams = measure_input_grams(model, batches, max_rows=gram_rows)
    return ActivationStats(means=means, stds=stds, samples=samples, grams=input_grams)


def _following_batchnorm_mean(trace, weight_name, layers):
    """Name of the running mean of the BatchNorm right after a bias-free conv, or None."""
    bn_scale = trace.bn_after.get(weight_name) if trace is not None else None
    if bn_scale is None:
        return None
    bn_layer = bn_scale.rsplit(".", 1)[0]
    return f"{bn_layer}._mean" if hasattr(layers.get(bn_layer), "_mean") else None


def plan_compensation(model, plan, stats, trace=None):
    """Bias / running-mean corrections that keep each consumer's expected output when ``plan`` is applied.

    Args:
        model: the unpruned model the plan was made for (read only).
        plan: a :class:`compress.pruning.plan.PrunePlan`.
        stats: :func:`measure_activation_stats` of the same model.
        trace: the model's :class:`compress.pruning.trace.PruningTrace`, to find the BatchNorm after a bias-free
            conv; without it such convs are skipped.

    Returns:
        Compensation
    """
    consumers = dense_consumers(model)
    layers = dict(model.named_sublayers())
    params = dict(model.named_parameters())
    deltas, done, skipped = {}, [], {}
    for name, change in plan.tensors.items():
        layer_name, _, leaf = name.rpartition(".")
        layer = consumers.get(layer_name)
        if layer is None or leaf != "weight":
            continue
        weight = params[name].numpy().astype("float64")
        in_axis = stats.input_axis(weight)
        if in_axis not in change.kept:
            continue
        if layer_name not in stats.means:
            skipped[layer_name] = "no input statistics (the layer did not run on the calibration batches)"
            continue
        removed = np.setdiff1d(np.arange(weight.shape[in_axis]), change.kept[in_axis])
        mean = stats.means[layer_name][removed]
        delta = np.einsum("ockl,c->o", weight[:, removed], mean) if in_axis == 1 else mean @ weight[removed]
        if layer.bias is not None:
            target, sign = f"{layer_name}.bias", 1.0
        else:
            target, sign = _following_batchnorm_mean(trace, name, layers), -1.0
            if target is None:
                skipped[layer_name] = "no bias and no BatchNorm right after it"
                continue
        deltas[target] = deltas.get(target, 0.0) + sign * delta
        done.append(layer_name)
    return Compensation(deltas={k: v.astype("float32") for k, v in deltas.items()}, layers=done, skipped=skipped)


def add_deltas(model, deltas):
    """Add ``deltas`` (parameter name -> array) to the model's parameters in place; returns the old values."""
    params = dict(model.named_parameters())
    backups = {}
    for name, delta in deltas.items():
        value = params[name].numpy()
        backups[name] = value.copy()
        params[name].set_value((value + delta).astype(value.dtype))
    return backups
