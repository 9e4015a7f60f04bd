"""Filter-importance criteria: callables that score the output channels of a pruning group (higher = keep).

A criterion is called as ``criterion(group, weights)`` with a :class:`compress.pruning.trace.PruneGroup` and a
mapping from structured parameter name to its current value (``numpy`` array), and returns
:class:`FilterScores` with one score per output channel of ``group.master``. New criteria are added with
``@register_criterion("name")``.
"""
import dataclasses

import numpy as np

from compress.errors import ConfigError

_CRITERIA = {}


@dataclasses.dataclass(frozen=True)
class FilterScores:
    """Scores of a group's channels and what produced them (recorded in the plan)."""

    scores: np.ndarray
    source: str


def register_criterion(name):
    """Class/function decorator adding a criterion under ``name``; a name can be registered once."""

    def add(criterion):
        if name in _CRITERIA:
            raise ValueError(f"pruning criterion {name!r} is already registered")
        _CRITERIA[name] = criterion
        return criterion

    return add


def criterion_names():
    """Names of the registered criteria, sorted."""
    return sorted(_CRITERIA)


def get_criterion(name):
    """Return the criterion registered under ``name``.

    Raises:
        ConfigError: when the name is unknown; the message lists the valid names.
    """
    if callable(name):
        return name
    if name not in _CRITERIA:
        raise ConfigError(f"unknown pruning criterion {name!r}: valid criteria are {', '.join(criterion_names())}")
    return _CRITERIA[name]


def criterion_name(criterion):
    """Registered name of a criterion (or its ``__name__`` for an unregistered callable)."""
    if isinstance(criterion, str):
        return criterion
    for name, registered in _CRITERIA.items():
        if registered is criterion:
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
