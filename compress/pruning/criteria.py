"""Filter-importance criteria: callables that score the output channels of a pruning group (higher = keep).

A criterion is called as ``criterion(group, weights)`` with a :class:`compress.pruning.trace.PruneGroup` and a
mapping from structured parameter name to its current value (``numpy`` array), and returns
:class:`FilterScores` with one score per output channel of ``group.master``. New criteria are added with
``@register_criterion("name")``.

A criterion that needs measured activations (``activation``) carries ``needs_stats = True`` and takes a third
argument; :func:`bind_criterion` gives it the statistics of the model being pruned.
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


@register_criterion("activation")
def activation(group, weights, stats):
    """How much each channel moves its consumers: ``std(x_c) * ||W[:, c]||`` summed over the dense convs and
    Linear layers that read channel ``c`` (statistics measured on calibration data, see
    :mod:`compress.pruning.compensation`). Pairs with bias compensation, which restores a removed channel's mean:
    what is lost is then its variation. L1 norm when no consumer was measured (e.g. the group feeds only a head)."""
    scores, consumers = np.zeros(group.channels), 0
    for member in group.members:
        layer, _, leaf = member.name.rpartition(".")
        if leaf != "weight" or layer not in stats.stds:
            continue
        weight = np.asarray(weights[member.name], dtype="float64")
        axis = stats.input_axis(weight)
        if member.axis != axis:
            continue
        # consumer input channel -> master channel it carries (-1: not from this group, e.g. another concat input)
        origin = transform_mask(np.arange(group.channels) + 2.0, member.transforms).astype("int64") - 2
        if origin.shape != (weight.shape[axis],):
            continue
        norms = np.sqrt((np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1) ** 2).sum(axis=1))
        carried = origin >= 0
        np.add.at(scores, origin[carried], (stats.stds[layer] * norms)[carried])
        consumers += 1
    if not consumers:
        return FilterScores(l1_norm(group, weights).scores, "l1_norm (no measured consumer)")
    return FilterScores(scores, "activation")


activation.needs_stats = True
