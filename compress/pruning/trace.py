"""Trace a model once into the channel-dependency groups that pruning plans are computed from.

Tracing uses PaddleSlim: ``dygraph2program`` turns the dygraph forward into a static program, and the operator
workers of ``paddleslim.prune.prune_worker`` walk it from each conv's filters to every tensor that must lose the
same channels. Two things differ from ``paddleslim.dygraph.prune.DygraphPruningCollections``:

* the graph is indexed once (producers/consumers of every variable). PaddleSlim's ``VarWrapper.inputs()`` scans
  every operator of the program on each call, which made tracing PP-OCRv4 rec take minutes;
* each conv is walked with its own ``visited`` set and the reason it cannot be pruned is kept, so plans and
  ``--dry-run`` can say why a layer was skipped.

A :class:`PruningTrace` holds no reference to the model and no weights: it is computed once and reused by many
plans (sensitivity analysis, ratio search). Names in it are the model's structured names (``state_dict`` keys),
which are the same in every process, unlike Paddle's generated tensor names.
"""
import contextlib
import copy
import dataclasses
import logging
import math
import time

import numpy as np
import paddle
from paddle.jit.dy2static.program_translator import ProgramTranslator
from paddleslim.core import GraphWrapper, OpWrapper, VarWrapper, dygraph2program
from paddleslim.dygraph.prune.filter_pruner import FilterPruner
from paddleslim.prune.prune_worker import PRUNE_WORKER, UnsupportOpError

from compress.pruning.adapters import traceable

_LOG = logging.getLogger(__name__)
_CONV_OPS = ("conv2d", "depthwise_conv2d")
_LINEAR_OPS = ("matmul", "matmul_v2", "mul")


@dataclasses.dataclass(frozen=True)
class GroupMember:
    """One tensor that loses channels when the group's master conv is pruned.

    Attributes:
        name: structured name of the parameter (``state_dict`` key; BatchNorm statistics are parameters).
        axis: axis of that tensor that is sliced.
        transforms: PaddleSlim mask transforms mapping the master's channel mask onto this tensor's axis.
        op_type: type of the operator that uses the tensor (``conv2d``, ``batch_norm``, ...).
    """

    name: str
    axis: int
    transforms: tuple
    op_type: str


@dataclasses.dataclass(frozen=True)
class PruneGroup:
    """The channels of one conv's output and every tensor coupled to them."""

    master: str
    channels: int
    members: tuple
    bn_scale: str = None  # the BatchNorm scale right after the master conv, if any


@dataclasses.dataclass
class PruningTrace:
    """Result of tracing one architecture with one input shape.

    Attributes:
        groups: conv weight name -> :class:`PruneGroup`, for every conv that can be a pruning master.
        skipped: conv weight name -> reason it cannot be a pruning master.
        conv_order: conv weight names in forward order.
        shapes: shape of every parameter (BatchNorm statistics included) used by the traced forward.
        macs_per_weight: weight name -> multiply-accumulates per weight element (output pixels of a conv, rows
            of a linear layer): ``MACs = macs_per_weight * numel(weight)`` also after pruning.
        layer_of: parameter/buffer name -> structured name of the layer that owns it.
        trainable: names of the trainable parameters used by the traced forward.
        conv_groups: conv weight name -> ``groups`` of the conv.
        bn_after: conv weight name -> scale of the BatchNorm that directly follows it, for every conv that has one.
        input_shapes: shapes of the example inputs the trace was made with.
        seconds: how long tracing took.
    """

    groups: dict
    skipped: dict
    conv_order: list
    shapes: dict
    macs_per_weight: dict
    layer_of: dict
    trainable: list
    conv_groups: dict
    input_shapes: list
    seconds: float
    bn_after: dict = dataclasses.field(default_factory=dict)


class _Var(VarWrapper):
    def inputs(self):
        return list(self._graph.producers.get(self.name(), ()))

    def outputs(self):
        return list(self._graph.consumers.get(self.name(), ()))


class _IndexedGraph(GraphWrapper):
    """GraphWrapper whose variables answer ``inputs()``/``outputs()`` from an index built once."""

    def __init__(self, program):
        super().__init__(program)
        self._block_vars = {}
        for block in self.program.blocks:
            for name, var in block.vars.items():
                self._block_vars.setdefault(name, var)
        self._ops = [OpWrapper(op, self) for block in self.program.blocks for op in block.ops]
        self.producers, self.consumers = {}, {}
        for op in self._ops:
            for name in op._op.output_arg_names:
                self.producers.setdefault(name, []).append(op)
            for name in op._op.input_arg_names:
                self.consumers.setdefault(name, []).append(op)

    def ops(self):
        return list(self._ops)

    def var(self, name):
        var = self._block_vars.get(name)
        return None if var is None else _Var(var, self)

    def vars(self):
        return [_Var(var, self) for var in self._block_vars.values()]

    def leaves(self):
        """Names of variables no operator consumes (the model outputs, among others)."""
        return [name for name in self._block_vars if not self.consumers.get(name)]


def transform_mask(mask, transforms):
    """Map a mask over a group's master channels onto a member tensor's axis with the member's transforms."""
    for transform in transforms:
        # PaddleSlim's mask transform (slices/repeats for concat, depthwise, flatten...) does not use `self`.
        mask = FilterPruner._transform_mask(None, mask, transform)
    return np.asarray(mask)


def _example_arrays(example_inputs):
    inputs = example_inputs if isinstance(example_inputs, (list, tuple)) else [example_inputs]
    return [np.asarray(x.numpy() if isinstance(x, paddle.Tensor) else x, dtype="float32") for x in inputs]


def _tensor_names(model):
    """Paddle tensor name -> (structured name, owning layer name, trainable) for every parameter."""
    names = {}
    for layer_name, layer in model.named_sublayers(include_self=True):
        for local, param in layer.named_parameters(include_sublayers=False):
            structured = f"{layer_name}.{local}" if layer_name else local
            names[param.name] = (structured, layer_name, bool(param.trainable))
    return names


def _walk_group(graph, param_var, leaves):
    """Run PaddleSlim's workers from a conv filter's axis 0; return the raw (var, axis, transforms, op) list."""
    found = []
    target_op = param_var.outputs()[0]
    worker_cls = PRUNE_WORKER.get(target_op.type())
    if worker_cls is None:
        raise UnsupportOpError(f"no PaddleSlim worker for operator {target_op.type()}")
    worker = worker_cls(target_op, pruned_params=found, visited={}, skip_stranger=True)
    worker.skip_vars = leaves
    worker.prune(param_var, pruned_axis=0, transforms=[])
    return found


def _bn_scale_after(graph, conv_op, names):
    """Structured name of the BatchNorm scale that directly follows a conv (through its bias add), or None."""
    out = conv_op.outputs("Output")[0].name()
    for _ in range(2):
        consumers = graph.consumers.get(out, [])
        if len(consumers) != 1:
            return None
        op = consumers[0]
        if op.type() == "batch_norm":
            return names.get(op.inputs("Scale")[0].name(), (None,))[0]
        if op.type() != "elementwise_add":
            return None
        out = op.outputs("Out")[0].name()
    return None


def _macs_multiplier(op):
    if op.type() in _CONV_OPS:
        shape = op.outputs("Output")[0].shape()
        return int(abs(shape[0])) * int(shape[2]) * int(shape[3])
    x_shape = op.inputs("X")[0].shape()
    return int(math.prod(abs(d) for d in x_shape[:-1]))


def _grouped_conv_problem(conv_ops, members):
    for member in members:
        op = conv_ops.get(member.name)
        if op is None:
            continue
        groups = op.attr("groups") or 1
        in_channels = op.inputs("Input")[0].shape()[1]
        if groups > 1 and groups != in_channels:
            return f"touches grouped (non depth-wise) conv {member.name}"
    return None


@contextlib.contextmanager
def forget_traced_parameters():
    """Drop the parameter records a PaddleSlim trace leaves in Paddle's ``to_static`` bookkeeping.

    ``dygraph2program`` builds its program under ``to_static`` mode, and Paddle 2.6 records every parameter it
    reads in ``ProgramTranslator._params_recorder`` keyed by ``id(program)``; only ``paddle.jit``'s own tracer pops
    those records. The leftover ones keep the traced model's parameters alive and, once the program is freed and a
    later ``paddle.jit.save`` builds its program at the same address, are handed to that save as its parameters:
    ``KeyError: 'conv2d_148.w_0'`` in ``paddle/jit/api.py``, at random, in any process that traced for pruning
    before it exported. Records made inside this context are removed when it exits, also when the trace raises.
    """
    records = ProgramTranslator.get_instance()._params_recorder.params_dict
    before = set(records)
    try:
        yield
    finally:
        for key in set(records) - before:
            del records[key]


def trace_model(model, example_inputs):
    """Trace ``model`` once and return its pruning groups.

    The model is traced in eval mode (the deploy forward) and every layer's training flag is restored afterwards;
    its weights and structure are not changed. Tracing takes about a second for PP-OCRv4 det or rec.

    Args:
        model: a ``paddle.nn.Layer``.
        example_inputs: one array/tensor or a list of them (the arguments of ``model.forward``). Only their
            shapes matter; FLOPs in plans are counted at these shapes.

    Returns:
        PruningTrace: reusable by any number of :func:`compress.pruning.plan.make_plan` calls.
    """
    started = time.perf_counter()
    arrays = _example_arrays(example_inputs)
    names = _tensor_names(model)
    training_flags = [(layer, layer.training) for layer in model.sublayers(include_self=True)]
    model.eval()
    try:
        with traceable(), forget_traced_parameters():
            program = dygraph2program(model, inputs=arrays, dtypes=["float32"] * len(arrays))
            graph = _IndexedGraph(program)
            trace = _build_trace(graph, names)
    finally:
        if not paddle.in_dynamic_mode():  # dygraph2program leaves static mode on when the forward raises
            paddle.disable_static()
        for layer, training in training_flags:
            layer.training = training
    trace.input_shapes = [list(a.shape) for a in arrays]
    trace.seconds = time.perf_counter() - started
    _LOG.info("traced %d prunable convs (%d skipped) in %.1fs", len(trace.groups), len(trace.skipped),
              trace.seconds)
    return trace


def _used_tensors(graph, names):
    """Shapes, owning layers and trainable names of the parameters the traced forward reads."""
    shapes, layer_of, trainable = {}, {}, []
    for var_name, (structured, layer_name, is_trainable) in names.items():
        var = graph.var(var_name)
        if var is not None and graph.consumers.get(var_name):
            shapes[structured] = [int(d) for d in var.shape()]
            layer_of[structured] = layer_name
            if is_trainable:
                trainable.append(structured)
    return shapes, layer_of, trainable


def _weighted_ops(graph, names):
    """MACs per weight element of every conv/Linear weight, and the conv ops in forward order."""
    macs, conv_ops = {}, {}
    for op in graph.ops():
        if op.type() not in _CONV_OPS + _LINEAR_OPS:
            continue
        weights = op.inputs("Filter" if op.type() in _CONV_OPS else "Y")
        if not weights or weights[0].name() not in names:
            continue  # a matmul between two activations (attention)
        weight = names[weights[0].name()][0]
        macs[weight] = macs.get(weight, 0) + _macs_multiplier(op)
        if op.type() in _CONV_OPS:
            conv_ops.setdefault(weight, op)
    return macs, conv_ops


def _group_or_reason(graph, names, conv_ops, weight, channels, leaves, bn_after):
    op = conv_ops[weight]
    if (op.attr("groups") or 1) > 1:
        return None, "depth-wise/grouped conv: follows its input channels, never a master"
    try:
        found = _walk_group(graph, op.inputs("Filter")[0], leaves)
    except UnsupportOpError as error:
        return None, _reason(error)
    except AssertionError as error:
        return None, f"PaddleSlim worker assertion: {error}"
    members = _members(found, names)
    problem = _grouped_conv_problem(conv_ops, members)
    if problem:
        return None, problem
    return PruneGroup(master=weight, channels=channels, members=members,
                      bn_scale=bn_after.get(weight)), None


def _build_trace(graph, names):
    shapes, layer_of, trainable = _used_tensors(graph, names)
    macs, conv_ops = _weighted_ops(graph, names)
    leaves = graph.leaves()
    bn_after = {weight: bn for weight, op in conv_ops.items() if (bn := _bn_scale_after(graph, op, names)) is not None}
    groups, skipped = {}, {}
    for weight in conv_ops:
        group, reason = _group_or_reason(graph, names, conv_ops, weight, shapes[weight][0], leaves, bn_after)
        if group is None:
            skipped[weight] = reason
        else:
            groups[weight] = group
    return PruningTrace(groups=groups, skipped=skipped, conv_order=list(conv_ops), shapes=shapes,
                        macs_per_weight=macs, layer_of=layer_of, trainable=trainable,
                        conv_groups={weight: int(op.attr("groups") or 1) for weight, op in conv_ops.items()},
                        input_shapes=[], seconds=0.0, bn_after=bn_after)


def _reason(error):
    text = str(error.args[0] if error.args else error)
    if text.startswith("Variable ") and text.endswith("was skipped."):
        return "its channels reach a model output"
    return text


def _members(found, names):
    members, seen = [], set()
    for var, axis, transforms, op in found:
        var_name = var[0].name() if isinstance(var, list) else var.name()
        if var_name not in names:
            continue  # an activation, not a parameter or buffer
        member = GroupMember(name=names[var_name][0], axis=int(axis),
                             transforms=tuple(copy.deepcopy(transforms)), op_type=op.type())
        key = (member.name, member.axis, repr(member.transforms))
        if key not in seen:
            seen.add(key)
            members.append(member)
    return tuple(members)
