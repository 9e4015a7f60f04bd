"""Which convs may be listed in pruning ratios."""
import fnmatch

import paddle

DEFAULT_SKIP_PATTERNS = ("head.*",)


def _matches(name, patterns):
    layer = name.rsplit(".", 1)[0]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(layer, p) for p in patterns)


def _conv_weights_in_layer_order(model):
    """Weights of the Conv2D layers the deploy forward uses, in definition order (no re-param leftovers)."""
    leftovers = set()
    for name, layer in model.named_sublayers():
        if getattr(layer, "is_repped", False):
            leftovers.update(f"{name}.{child}" for child, _ in layer.named_sublayers() if
                             not child.startswith("reparam_conv"))
    names = []
    for name, layer in model.named_sublayers():
        if isinstance(layer, paddle.nn.Conv2D) and name not in leftovers and layer._groups == 1:
            names.append(f"{name}.weight")
    return names


def _follows_earlier_master(group, earlier):
    return any(member.axis == 0 and member.name in earlier for member in group.members
               if member.name != group.master)


def prunable_layers(model, skip_patterns=DEFAULT_SKIP_PATTERNS, trace=None, round_to=8):
    """Conv weight names (``state_dict`` keys) worth listing in pruning ratios, in forward order.

    Always left out: the first conv, depth-wise/grouped and transposed convs, and names matching a
    ``skip_patterns`` glob (``fnmatch``, tried on the weight name and on its layer name; the default skips the
    output heads). With a ``trace`` (:func:`compress.pruning.trace.trace_model`) the result is exact: convs the
    tracer cannot prune, convs with at most ``round_to`` channels, and convs whose channels are already decided by
    an earlier listed conv (residual/SE partners, see ``plan.py``) are left out too.

    Args:
        model: the model.
        skip_patterns: globs such as ``"head.*"`` or ``"neck.encoder.*"``.
        trace: optional trace of the model.
        round_to: channel rounding that plans will use.

    Returns:
        list[str]
    """
    patterns = list(skip_patterns or ())
    candidates = list(trace.conv_order) if trace is not None else _conv_weights_in_layer_order(model)
    first_conv = candidates[0] if candidates else None
    selected = []
    for name in candidates:
        if name == first_conv or _matches(name, patterns):
            continue
        if trace is not None:
            group = trace.groups.get(name)
            if group is None or group.channels <= round_to or _follows_earlier_master(group, set(selected)):
                continue
        selected.append(name)
    return selected
