"""Filter-importance criteria: callables that score the output channels of a pruning group (higher = keep).

A criterion is called as ``criterion(group, weights)`` with a :class:`compress.pruning.trace.PruneGroup` and a
mapping from structured parameter name to its current value (``numpy`` array), and returns
:class:`FilterScores` with one score per output channel of ``group.master``. New criteria are added with
``@register_criterion("name")``.
"""
import dataclasses

import numpy as np

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
    for name in _CRITERIA.names():
        if _CRITERIA.get(name) is criterion:
            return name
    return getattr(criterion, "__name__", type(criterion).__name__)


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
