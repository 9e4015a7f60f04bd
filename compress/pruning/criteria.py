"""Filter-importance criteria: callables that score the output channels of a pruning group (higher = keep).

A criterion is called as ``criterion(group, weights)`` with a :class:`compress.pruning.trace.PruneGroup` and a
mapping from structured parameter name to its current value (``numpy`` array), and returns
:class:`FilterScores` with one score per output channel of ``group.master``. New criteria are added with
``@register_criterion("name")``.

A criterion that needs measured activations (``activation``, ``obs``) carries ``needs_stats = True`` and takes a
third argument; :func:`bind_criterion` gives it the statistics of the model being pruned. ``obs`` also needs the
consumers' input Gram matrices (``needs_grams = True``: measure with ``measure_activation_stats(..., grams=True)``).
"""
import dataclasses
import functools

import numpy as np

from compress.errors import ConfigError
from compress.pruning.trace import transform_mask
from compress.registry import Registry

_CRITERIA = Registry("pruning criterion")


@dataclasses.dataclass(frozen=True)
class FilterScores:
    """Scores of a group's channels and what produced them (recorded in the plan)."""

    scores: np.ndarray
    source: str


def register_criterion(name):
    """Class/function decorator adding a criterion under ``name``; a name can be registered once."""
    return _CRITERIA.register(name)


def criterion_names():
    """Names of the registered criteria, sorted."""
    return _CRITERIA.names()


def get_criterion(name):
    """Return the criterion registered under ``name`` (a callable is returned as it is).

    Raises:
        ConfigError: when the name is unknown; the message lists the valid names.
    """
    return name if callable(name) else _CRITERIA.get(name)


def criterion_name(criterion):
    """Registered name of a criterion (or its ``__name__`` for an unregistered callable)."""
    if isinstance(criterion, str):
        return criterion
    if getattr(criterion, "criterion_name", None):
        return criterion.criterion_name
    for name in _CRITERIA.names():
        if _CRITERIA.get(name) is criterion:
            return name
    return getattr(criterion, "__name__", type(criterion).__name__)


def needs_stats(criterion):
    """True when the criterion scores filters from measured activations (see :func:`bind_criterion`)."""
    return bool(getattr(get_criterion(criterion), "needs_stats", False))


def bind_criterion(criterion, stats):
    """The criterion ready to call as ``criterion(group, weights)``: data-driven ones get ``stats``.

    Args:
        criterion: name or callable.
        stats: :class:`compress.pruning.compensation.ActivationStats` of the model to prune, or None.

    Raises:
        ConfigError: the criterion needs statistics and ``stats`` is None.
    """
    score = get_criterion(criterion)
    if not getattr(score, "needs_stats", False):
        return score
    name = criterion_name(score)
    if stats is None:
        raise ConfigError(f"pruning criterion {name!r} scores filters from measured activations: measure them with "
                          "compress.pruning.compensation.measure_activation_stats and pass them")
    bound = functools.partial(score, stats=stats)
    bound.criterion_name = name
    return bound


def _master_filters(group, weights):
    return np.asarray(weights[group.master], dtype="float64").reshape(group.channels, -1)


@register_criterion("l1_norm")
def l1_norm(group, weights):
    """Mean absolute value of each filter of the master conv (PaddleSlim ``L1NormFilterPruner``)."""
    return FilterScores(np.abs(_master_filters(group, weights)).mean(axis=1), "l1_norm")


@register_criterion("bn_scale")
def bn_scale(group, weights):
    """|gamma| of the BatchNorm right after the master conv (network slimming); L1 norm when there is none."""
    if group.bn_scale is None or group.bn_scale not in weights:
        return FilterScores(l1_norm(group, weights).scores, "l1_norm (no BatchNorm after the conv)")
    return FilterScores(np.abs(np.asarray(weights[group.bn_scale], dtype="float64")), "bn_scale")


@register_criterion("fpgm")
def fpgm(group, weights):
    """Sum of Euclidean distances to the other filters (PaddleSlim ``FPGMFilterPruner``): near the geometric
    median = replaceable = low score."""
    filters = _master_filters(group, weights)
    squared = (filters ** 2).sum(axis=1)
    gram = filters @ filters.T
    distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2.0 * gram, 0.0))
    return FilterScores(distances.sum(axis=1), "fpgm")


def _measured_consumers(group, weights, measured):
    """(layer, float64 weight, input axis, origin) for each member of ``group`` that consumes its channels on the
    input axis and whose layer is in ``measured``; ``origin`` maps each consumer input channel to the master channel
    it carries (-1: not from this group, e.g. another concat input)."""
    for member in group.members:
        layer, _, leaf = member.name.rpartition(".")
        if leaf != "weight" or layer not in measured:
            continue
        weight = np.asarray(weights[member.name], dtype="float64")
        axis = 1 if weight.ndim == 4 else 0  # conv OIHW / Linear [in, out]
        if member.axis != axis:
            continue
        origin = transform_mask(np.arange(group.channels) + 2.0, member.transforms).astype("int64") - 2
        if origin.shape == (weight.shape[axis],):
            yield layer, weight, axis, origin


@register_criterion("activation")
def activation(group, weights, stats):
    """How much each channel moves its consumers: ``std(x_c) * ||W[:, c]||`` summed over the dense convs and
    Linear layers that read channel ``c`` (statistics measured on calibration data, see
    :mod:`compress.pruning.compensation`). Pairs with bias compensation, which restores a removed channel's mean:
    what is lost is then its variation. L1 norm when no consumer was measured (e.g. the group feeds only a head)."""
    scores, consumers = np.zeros(group.channels), 0
    for layer, weight, axis, origin in _measured_consumers(group, weights, stats.stds):
        norms = np.sqrt((np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1) ** 2).sum(axis=1))
        carried = origin >= 0
        np.add.at(scores, origin[carried], (stats.stds[layer] * norms)[carried])
        consumers += 1
    if not consumers:
        return FilterScores(l1_norm(group, weights).scores, "l1_norm (no measured consumer)")
    return FilterScores(scores, "activation")


activation.needs_stats = True


OBS_DAMP = 0.01  # relative damping of the consumers' input Gram matrices (as reconstruction's default)
OBS_GREEDY_FRACTION = 0.9  # channels removed one by one with OBS updates; the rest ranked by their last cost


def _obs_consumers(group, weights, stats):
    """(inverse damped Gram, weight matrix with a bias row, master channel -> its columns) per measured consumer."""
    consumers = []
    for layer, weight, _axis, origin in _measured_consumers(group, weights, stats.grams):
        gram = stats.grams[layer]
        matrix = weight if weight.ndim == 2 else weight.reshape(weight.shape[0], -1).T
        if matrix.shape[0] + 1 != gram.gram.shape[0]:
            continue
        h = gram.gram.copy()
        diagonal = np.arange(matrix.shape[0])
        h[diagonal, diagonal] += OBS_DAMP * max(float(np.mean(np.diag(gram.gram)[:-1])), 1e-12)
        column_origin = origin[gram.channels]
        columns = {int(m): np.flatnonzero(column_origin == m) for m in np.unique(column_origin[column_origin >= 0])}
        # the ones column (last) is never removed: the OBS update moves a removed channel's mean into the bias
        consumers.append((np.linalg.inv(h), np.concatenate([matrix, np.zeros((1, matrix.shape[1]))]), columns))
    return consumers


def _obs_costs(consumers, channels, removed):
    """Output error each remaining channel's removal adds, summed over consumers: tr(W_G^T [H^-1_GG]^-1 W_G)."""
    costs = np.zeros(channels)
    for inverse, matrix, columns in consumers:
        for master, cols in columns.items():
            if removed[master]:
                continue
            if len(cols) == 1:
                costs[master] += float((matrix[cols[0]] ** 2).sum() / inverse[cols[0], cols[0]])
            else:
                block = inverse[np.ix_(cols, cols)]
                costs[master] += float(np.sum(matrix[cols] * np.linalg.solve(block, matrix[cols])))
    return costs


def _obs_remove(consumers, master):
    """OBS update of every consumer's weights and inverse Gram after removing ``master``'s columns."""
    for index, (inverse, matrix, columns) in enumerate(consumers):
        cols = columns.get(master)
        if cols is None:
            continue
        block_inverse = np.linalg.inv(inverse[np.ix_(cols, cols)])
        left = inverse[:, cols] @ block_inverse
        matrix = matrix - left @ matrix[cols]
        inverse = inverse - left @ inverse[cols]
        matrix[cols] = 0.0
        consumers[index] = (inverse, matrix, columns)


@register_criterion("obs")
def obs(group, weights, stats):
    """Structured Optimal Brain Surgeon over the consumers (Optimal Brain Compression, ZipLM): a channel's cost is
    the increase of its consumers' output error ``tr(W_G^T [H^-1_GG]^-1 W_G)`` (``‖W[:, j]‖² / [H^-1]_jj`` for a
    1x1 conv or Linear) when the consumers are re-solved without it, ``H = X^T X + damping`` being the input Gram
    matrix (with a ones column, so a removed channel's mean goes into the bias) measured on calibration data.
    Channels are removed greedily, cheapest first, each removal updating ``H^-1`` and the weights (OBS update),
    costs summed over the consumers of the group. A kxk consumer removes a channel's whole kxk block of patch
    columns at once. Score = removal order (removed last = highest). Pairs with :mod:`compress.pruning.reconstruction`,
    which does the re-solving this criterion assumes. L1 norm when no consumer has a Gram matrix."""
    key = ("obs", group.master)
    if key in stats.cache:
        return stats.cache[key]
    if not stats.grams:
        raise ConfigError("pruning criterion 'obs' needs the consumers' input Gram matrices: measure the statistics "
                          "with measure_activation_stats(..., grams=True)")
    consumers = _obs_consumers(group, weights, stats)
    if not consumers:
        result = FilterScores(l1_norm(group, weights).scores, "l1_norm (no measured consumer)")
    else:
        removed = np.zeros(group.channels, dtype=bool)
        scores = np.zeros(group.channels)
        greedy = int(OBS_GREEDY_FRACTION * group.channels)
        for step in range(greedy):
            costs = _obs_costs(consumers, group.channels, removed)
            costs[removed] = np.inf
            master = int(np.argmin(costs))
            removed[master], scores[master] = True, step
            _obs_remove(consumers, master)
        costs = _obs_costs(consumers, group.channels, removed)
        rest = np.flatnonzero(~removed)
        scores[rest] = greedy + np.argsort(np.argsort(costs[rest]))
        result = FilterScores(scores, "obs")
    stats.cache[key] = result
    return result


obs.needs_stats = True
obs.needs_grams = True


def needs_grams(criterion):
    """True when the criterion scores filters from the consumers' input Gram matrices (``obs``)."""
    return bool(getattr(get_criterion(criterion), "needs_grams", False))
