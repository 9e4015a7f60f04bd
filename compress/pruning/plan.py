"""Structured filter pruning in two steps: compute a plan, then apply it.

``make_plan`` decides, for each conv named in ``ratios``, which output channels to keep, and follows the traced
dependency groups to every coupled tensor (BatchNorm after the conv, the depth-wise conv and next convs' input
axis, residual and concat partners, SE convs, a following Linear). It reads the weights and never changes the
model. ``apply_plan`` slices the model's tensors by the recorded indices and fixes the layer attributes; it needs
only the plan (no tracing, no criterion, no data), so a fresh process rebuilds a pruned architecture from the
plan's JSON and then loads the pruned ``state_dict``.

FLOPs are multiply-accumulates (MACs) of ``conv2d``/``depthwise_conv2d`` and of matmuls with a weight parameter
(Linear), at the example input shape used for tracing, bias adds excluded. Activations, BatchNorm, pooling,
upsampling and attention matmuls between two activations are not counted. Parameter counts are the trainable
parameters used by the traced forward (BatchNorm running statistics and the unused branches of a re-parameterised
``LearnableRepLayer`` are not counted).

Coupled channels: when a listed conv shares its output channels with one listed earlier in forward order (a
residual or SE partner), the earlier one's mask prunes both and the later one's ratio is ignored; the plan says so.
"""
import dataclasses
import json
import math

import numpy as np
import paddle

from compress.errors import CheckpointError, ConfigError
from compress.pruning.criteria import bind_criterion, criterion_name
from compress.pruning.trace import trace_model, transform_mask

PLAN_FORMAT_VERSION = 1
FLOPS_COUNTED = ("MACs of conv2d/depthwise_conv2d and Linear matmuls at the traced input shape, batch included; "
                 "bias adds, activations, BatchNorm, pooling, upsampling and attention matmuls not counted")


@dataclasses.dataclass
class TensorChange:
    """How one parameter/buffer is sliced: ``kept[axis]`` = indices kept along that axis, ascending."""

    shape_before: list
    shape_after: list
    kept: dict


@dataclasses.dataclass
class GroupDecision:
    """What happened to one conv listed in the ratios."""

    master: str
    ratio: float
    channels_before: int
    channels_after: int
    status: str  # "pruned", "coupled to <conv>", "unchanged: <why>"
    score_source: str = ""


@dataclasses.dataclass
class LayerRow:
    """One conv/Linear layer whose weight shape changes (a row of :func:`format_plan`)."""

    layer: str
    out_before: int
    out_after: int
    in_before: int
    in_after: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int


@dataclasses.dataclass
class PrunePlan:
    """A complete, serialisable pruning decision for one architecture.

    Attributes:
        criterion: name of the criterion that scored the filters.
        round_to: kept channel counts are multiples of this (and never below it).
        input_shapes: example input shapes FLOPs were counted at.
        decisions: one :class:`GroupDecision` per conv listed in the ratios.
        tensors: structured name -> :class:`TensorChange`, for every tensor that changes shape.
        layers: one :class:`LayerRow` per conv/Linear layer that changes.
        flops_before, flops_after: MACs, see ``FLOPS_COUNTED``.
        params_before, params_after: trainable parameters used by the forward.
    """

    criterion: str
    round_to: int
    input_shapes: list
    decisions: list
    tensors: dict
    layers: list
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    flops_counted: str = FLOPS_COUNTED
    version: int = PLAN_FORMAT_VERSION

    @property
    def flops_reduction(self):
        """Fraction of FLOPs removed (0.35 = 35 % fewer)."""
        return 1.0 - self.flops_after / self.flops_before if self.flops_before else 0.0

    @property
    def params_reduction(self):
        """Fraction of parameters removed."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_json(self):
        """Serialise to a JSON string (axis keys become strings)."""
        data = dataclasses.asdict(self)
        for change in data["tensors"].values():
            change["kept"] = {str(axis): list(map(int, kept)) for axis, kept in change["kept"].items()}
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        """Parse a plan written by :meth:`to_json`.

        Raises:
            CheckpointError: when the text is not a plan of a supported version.
        """
        try:
            data = json.loads(text)
            if data.get("version") != PLAN_FORMAT_VERSION:
                raise CheckpointError(f"pruning plan has version {data.get('version')!r}, expected "
                                      f"{PLAN_FORMAT_VERSION}: recreate it with this version of compress")
            data["decisions"] = [GroupDecision(**d) for d in data["decisions"]]
            data["layers"] = [LayerRow(**row) for row in data["layers"]]
            data["tensors"] = {
                name: TensorChange(shape_before=c["shape_before"], shape_after=c["shape_after"],
                                   kept={int(axis): kept for axis, kept in c["kept"].items()})
                for name, c in data["tensors"].items()}
            return cls(**data)
        except (ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"not a valid pruning plan ({error}): the plan JSON is corrupt or "
                                  "was not written by PrunePlan.to_json") from error


def kept_channel_count(channels, ratio, round_to):
    """Channels left after pruning ``ratio`` of ``channels``, rounded to a multiple of ``round_to`` (>= it)."""
    kept = math.floor((1.0 - ratio) * channels / round_to + 0.5) * round_to
    return min(channels, max(round_to, kept))


def _check_ratios(ratios, trace):
    for name, ratio in ratios.items():
        if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise ConfigError(f"pruning ratio of {name} is {ratio!r}: it must be a number in [0, 1)")
        if name not in trace.groups:
            why = trace.skipped.get(name, "not a conv weight used by this model's forward")
            raise ConfigError(f"cannot prune {name}: {why}. List prunable layers with "
                              "compress.pruning.prunable_layers(model, skip_patterns, trace)")


class _LazyWeights(dict):
    """Parameter name -> numpy value, read from the model only when a criterion asks for it."""

    def __init__(self, model):
        super().__init__()
        self._params = dict(model.named_parameters())

    def __missing__(self, name):
        value = self._params[name].numpy()
        self[name] = value
        return value

    def __contains__(self, name):
        return name in self._params


def _group_masks(group, kept, trace):
    mask = np.zeros(group.channels, dtype="int64")
    mask[kept] = 1
    masks = {}
    for member in group.members:
        member_mask = transform_mask(mask.copy(), member.transforms).astype(bool)
        size = trace.shapes[member.name][member.axis]
        if member_mask.shape != (size,):
            raise RuntimeError(f"traced mask for {member.name} axis {member.axis} has length {member_mask.size}, "
                               f"the tensor has {size}: the trace does not match the model")
        key = (member.name, member.axis)
        masks[key] = masks[key] & member_mask if key in masks else member_mask
    return masks


def make_plan(model, example_inputs, ratios, criterion="l1_norm", round_to=8, trace=None):
    """Compute which channels to keep; the model is read, never modified.

    Args:
        model: the ``paddle.nn.Layer`` whose weights score the filters.
        example_inputs: inputs of ``model.forward`` used for tracing when ``trace`` is None (else unused).
        ratios: conv weight structured name (e.g. ``backbone.blocks3.0.pw_conv.reparam_conv.weight``) -> fraction
            of its output channels to remove, in [0, 1).
        criterion: a registered criterion name or a criterion callable (a data-driven one bound to its statistics
            with :func:`compress.pruning.criteria.bind_criterion`).
        round_to: kept channel counts are multiples of ``round_to`` and at least ``round_to``.
        trace: a :class:`compress.pruning.trace.PruningTrace` of this architecture and input shape, to avoid
            re-tracing when many plans are made.

    Returns:
        PrunePlan

    Raises:
        ConfigError: unknown criterion, a ratio outside [0, 1), a conv that cannot be pruned, bad ``round_to``.
    """
    if not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to is {round_to!r}: it must be a positive integer")
    score = bind_criterion(criterion, None)
    trace = trace if trace is not None else trace_model(model, example_inputs)
    _check_ratios(ratios, trace)
    weights = _LazyWeights(model)
    masks, owner, decisions = {}, {}, []
    for master in [name for name in trace.conv_order if name in ratios]:
        group = trace.groups[master]
        ratio = float(ratios[master])
        decision = GroupDecision(master, ratio, group.channels, group.channels, "pruned")
        decisions.append(decision)
        kept_count = kept_channel_count(group.channels, ratio, round_to)
        if (master, 0) in owner:
            decision.status = f"coupled to {owner[(master, 0)]}"
            decision.channels_after = int(masks[(master, 0)].sum())
            continue
        if kept_count >= group.channels:
            decision.status = f"unchanged: {group.channels} channels, ratio {ratio:g} with round_to {round_to}"
            continue
        scores = score(group, weights)
        decision.score_source = scores.source
        kept = np.sort(np.argsort(-np.asarray(scores.scores), kind="stable")[:kept_count])
        decision.channels_after = kept_count
        for key, mask in _group_masks(group, kept, trace).items():
            masks[key] = masks[key] & mask if key in masks else mask
            owner.setdefault(key, master)
    plan = _assemble_plan(trace, masks, decisions, criterion_name(criterion), round_to)
    _mirror_training_branches(plan, weights)
    return plan


# Branches the eval-mode trace never sees because they run only in training, paired with the traced conv that
# reads the same input: PP-OCR's DBHead computes its threshold map from the head input only in train mode.
TRAINING_ONLY_MIRRORS = {"head.thresh.conv1.weight": "head.binarize.conv1.weight"}


def _mirror_training_branches(plan, weights):
    """Give each training-only conv the input-channel slicing of its traced twin (so the pruned model trains)."""
    for hidden, twin in TRAINING_ONLY_MIRRORS.items():
        change = plan.tensors.get(twin)
        if change is None or 1 not in change.kept or hidden not in weights:
            continue
        shape = list(weights[hidden].shape)
        if shape[1] != change.shape_before[1]:
            continue
        after = list(shape)
        after[1] = len(change.kept[1])
        plan.tensors[hidden] = TensorChange(shape, after, {1: list(change.kept[1])})


def _assemble_plan(trace, masks, decisions, criterion, round_to):
    tensors = {}
    for (name, axis), mask in sorted(masks.items()):
        if mask.all():
            continue
        change = tensors.setdefault(name, TensorChange(list(trace.shapes[name]), list(trace.shapes[name]), {}))
        change.kept[axis] = [int(i) for i in np.flatnonzero(mask)]
        change.shape_after[axis] = len(change.kept[axis])
    shape_after = {name: tensors[name].shape_after if name in tensors else shape
                   for name, shape in trace.shapes.items()}
    return PrunePlan(
        criterion=criterion, round_to=round_to, input_shapes=trace.input_shapes, decisions=decisions,
        tensors=tensors, layers=_layer_rows(trace, tensors, shape_after),
        flops_before=_macs(trace, trace.shapes), flops_after=_macs(trace, shape_after),
        params_before=_param_count(trace, trace.shapes), params_after=_param_count(trace, shape_after))


def _macs(trace, shapes):
    return int(sum(per_element * math.prod(shapes[weight]) for weight, per_element in trace.macs_per_weight.items()))


def _param_count(trace, shapes):
    return int(sum(math.prod(shapes[name]) for name in trace.trainable))


def _channels(trace, weight, shape):
    """(out, in) channels of a conv (OIHW) or Linear ([in, out]) weight of the given shape."""
    if len(shape) == 2:
        return shape[1], shape[0]
    original = trace.shapes[weight]
    groups = trace.conv_groups.get(weight, 1)
    if groups > 1:  # depth-wise: groups follow the channels
        groups = shape[0] // (original[0] // groups)
    return shape[0], shape[1] * groups


def _layer_rows(trace, tensors, shape_after):
    rows = []
    for weight in trace.macs_per_weight:
        if weight not in tensors:
            continue
        layer = trace.layer_of[weight]
        layer_tensors = [n for n in trace.trainable if trace.layer_of[n] == layer]
        out_before, in_before = _channels(trace, weight, trace.shapes[weight])
        out_after, in_after = _channels(trace, weight, shape_after[weight])
        rows.append(LayerRow(
            layer=layer, out_before=out_before, out_after=out_after, in_before=in_before, in_after=in_after,
            macs_before=int(trace.macs_per_weight[weight] * math.prod(trace.shapes[weight])),
            macs_after=int(trace.macs_per_weight[weight] * math.prod(shape_after[weight])),
            params_before=int(sum(math.prod(trace.shapes[n]) for n in layer_tensors)),
            params_after=int(sum(math.prod(shape_after[n]) for n in layer_tensors))))
    return rows


def _human(count):
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f}{unit}"
    return str(int(count))


def format_plan(plan):
    """Human-readable table of a plan (for ``--dry-run``): one row per changed conv/Linear layer, then totals."""
    ratio_of = {d.master.rsplit(".", 1)[0]: d.ratio for d in plan.decisions if d.status == "pruned"}
    width = max([len(row.layer) for row in plan.layers] + [5])
    header = (f"{'layer':<{width}}  {'ratio':>5}  {'out ch':>11}  {'in ch':>11}  "
              f"{'MACs before -> after':>22}  {'params before -> after':>22}")
    lines = [header, "-" * len(header)]
    for row in plan.layers:
        ratio = f"{ratio_of[row.layer]:.2f}" if row.layer in ratio_of else ""
        lines.append(f"{row.layer:<{width}}  {ratio:>5}  {row.out_before:>4} -> {row.out_after:<4}  "
                     f"{row.in_before:>4} -> {row.in_after:<4}  "
                     f"{_human(row.macs_before):>9} -> {_human(row.macs_after):<9}  "
                     f"{_human(row.params_before):>9} -> {_human(row.params_after):<9}")
    lines.append("-" * len(header))
    lines.append(f"FLOPs (MACs) {_human(plan.flops_before)} -> {_human(plan.flops_after)} "
                 f"(-{100 * plan.flops_reduction:.1f}%), params {_human(plan.params_before)} -> "
                 f"{_human(plan.params_after)} (-{100 * plan.params_reduction:.1f}%), criterion {plan.criterion}, "
                 f"round_to {plan.round_to}, input {plan.input_shapes}")
    lines.extend(f"note: {d.master}: {d.status}" for d in plan.decisions if d.status != "pruned")
    lines.extend(f"note: {d.master}: scored by {d.score_source}" for d in plan.decisions
                 if d.status == "pruned" and d.score_source != plan.criterion)
    lines.append(f"FLOPs counted: {plan.flops_counted}")
    return "\n".join(lines)


def _replace_value(tensor, value):
    """Give a parameter a value of a different shape, in place (``set_value`` refuses shape changes)."""
    place = tensor.place
    if place.is_gpu_place():
        place = paddle.CUDAPlace(place.gpu_device_id())
    elif place.is_cpu_place():
        place = paddle.CPUPlace()
    tensor.value().get_tensor().set(np.ascontiguousarray(value), place)


def _fix_layer_attributes(layer, original_weight_shape):
    """Make a layer's size attributes agree with its (sliced) tensors."""
    if isinstance(layer, paddle.nn.Conv2DTranspose):
        shape = layer.weight.shape
        layer._in_channels = shape[0]
        layer._out_channels = shape[1] * layer._groups
    elif isinstance(layer, paddle.nn.Conv2D):
        shape = layer.weight.shape
        if layer._groups > 1:  # depth-wise (grouped convs are never in a plan): groups follow the channels
            per_group = original_weight_shape[0] // layer._groups
            layer._groups = shape[0] // per_group
            layer._in_channels = layer._groups * shape[1]
        else:
            layer._in_channels = shape[1]
        layer._out_channels = shape[0]
    elif isinstance(layer, paddle.nn.layer.norm._BatchNormBase):
        layer._num_features = layer.weight.shape[0]


def apply_plan(model, plan):
    """Prune ``model`` in place from ``plan`` alone: slice every listed tensor and fix layer attributes.

    Args:
        model: a model of the architecture the plan was made for, not yet pruned (weights may differ, e.g. a
            freshly built model that will then load a pruned ``state_dict``).
        plan: a :class:`PrunePlan` (e.g. ``PrunePlan.from_json(text)``).

    Raises:
        CheckpointError: when a tensor named in the plan is missing or has another shape than the plan expects
            (a different architecture, or a model that is already pruned).
    """
    named = dict(model.named_parameters())
    for name, change in plan.tensors.items():
        if name not in named:
            raise CheckpointError(f"pruning plan names {name}, which this model does not have: the plan was made "
                                  "for another architecture")
        if list(named[name].shape) != list(change.shape_before):
            raise CheckpointError(f"pruning plan expects {name} with shape {change.shape_before}, the model has "
                                  f"{list(named[name].shape)}: another architecture, or the model is already pruned")
    layers = dict(model.named_sublayers(include_self=True))
    changed_layers = {name.rsplit(".", 1)[0] if "." in name else "" for name in plan.tensors}
    original_weight_shapes = {name: list(layers[name].weight.shape) for name in changed_layers
                              if name in layers and getattr(layers[name], "weight", None) is not None}
    for name, change in plan.tensors.items():
        tensor = named[name]
        value = tensor.numpy()
        for axis, kept in sorted(change.kept.items()):
            value = np.take(value, np.asarray(kept, dtype="int64"), axis=axis)
        _replace_value(tensor, value)
        tensor.clear_gradient()
    for layer_name, original_shape in original_weight_shapes.items():
        _fix_layer_attributes(layers[layer_name], original_shape)
