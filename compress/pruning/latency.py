"""Pruning by measured latency: a per-layer latency table of the target backend, and ratios chosen against it.

FLOPs are a poor proxy for CPU latency: on OpenVINO, PP-OCRv4 det spends a third of its time in depth-wise convs
and in the reorders around them (memory-bound, few FLOPs) and in its high-resolution neck and head, while the
FLOPs-driven plan prunes the low-resolution backbone stages that cost little time. This module:

* profiles the model once on the backend (:func:`measure_latency_table`: OpenVINO's per-node counters of the
  compiled model, FP32 or NNCF INT8, at the config's example input) and charges every node's time to the conv /
  Linear weight it computes with, or, for weightless nodes (reorders, activations, adds, resizes), to the weight
  whose output they read (walking up the compiled graph);
* estimates a plan's latency from that table (:meth:`LatencyTable.estimate`): a weight's own time scales with its
  element count (in x out channels), the time charged to its output with its output channels, the rest is fixed;
* chooses per-layer ratios from the sensitivity curves for a latency target (:func:`ratios_for_latency_target`):
  each layer takes the grid ratio that maximises ``lambda * latency saved - metric loss`` (the Lagrangian of a
  multiple-choice knapsack, as in hardware-aware latency pruning, HALP, Shen et al. 2022); ``lambda`` is bisected
  to the smallest value whose joint plan meets the target, so layers that buy much latency for little loss go
  first, which a single loss threshold (``flops_target``) does not do.
"""
import dataclasses
import functools
import hashlib
import json
import math
import os
import shutil
import statistics
import tempfile
import time

from compress.errors import ConfigError
from compress.pruning.plan import make_plan

LATENCY_BACKENDS = ("openvino",)  # backends with per-node profiling here
_AFFINE_OPS = ("elementwise_add", "batch_norm", "scale", "elementwise_mul")
_WEIGHTED_OPS = {"conv2d": ("Filter", 0), "depthwise_conv2d": ("Filter", 0), "conv2d_transpose": ("Filter", 1),
                 "matmul_v2": ("Y", 1), "matmul": ("Y", 1), "mul": ("Y", 1)}  # weight slot, its output axis


@dataclasses.dataclass
class LatencyTable:
    """Measured time per weight of one model on one backend.

    Attributes:
        backend / precision / threads / input_shape: what was measured.
        total_ms: the model's time (sum of the profiled nodes, median over the repeats).
        weight_ms: structured weight name -> time of the compiled nodes computing with it (their own work).
        output_ms: structured weight name -> time of the weightless nodes reading its output.
        out_axis: structured weight name -> the axis of its output channels (0 for convs, 1 for Linear and
            transposed convs).
        other_ms: time charged to no weight (input conversion, nodes above the first conv).
        shapes: structured weight name -> its shape when measured.
        seconds: how long measuring took.
    """

    backend: str
    precision: str
    threads: int
    input_shape: list
    total_ms: float
    weight_ms: dict
    output_ms: dict
    out_axis: dict
    other_ms: float
    shapes: dict
    seconds: float = 0.0

    def estimate(self, shapes):
        """Estimated time (ms) of the model with parameter shapes ``shapes`` (structured name -> shape; names
        missing from it keep their measured shape)."""
        total = self.other_ms
        for weight, ms in self.weight_ms.items():
            total += ms * self._ratio(weight, shapes, None)
        for weight, ms in self.output_ms.items():
            total += ms * self._ratio(weight, shapes, self.out_axis[weight])
        return total

    def _ratio(self, weight, shapes, axis):
        before, after = self.shapes[weight], shapes.get(weight, self.shapes[weight])
        if axis is None:
            return math.prod(after) / max(math.prod(before), 1)
        return after[axis] / max(before[axis], 1)

    def to_json(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data):
        return cls(**data)

    def summary(self, top=3):
        ranked = sorted(self.weight_ms, key=lambda w: -(self.weight_ms[w] + self.output_ms.get(w, 0.0)))[:top]
        charged = sum(self.weight_ms.values()) + sum(self.output_ms.values())
        return (f"{self.backend} {self.precision} {self.total_ms:.1f} ms at {self.input_shape} "
                f"({100 * charged / max(self.total_ms, 1e-9):.0f}% charged to {len(self.weight_ms)} weights; "
                f"most: {', '.join(w.rsplit('.', 1)[0] for w in ranked)})")


def _weighted_outputs(program, names):
    """{variable name: (structured weight name, output axis)} for a Paddle program's conv / matmul ops whose weight
    is a model parameter (``names``: Paddle tensor name -> structured name): their outputs, and the outputs and
    parameters of the affine ops right after them (bias add, BatchNorm, scale), which OpenVINO fuses into the conv
    under those ops' names."""
    block = program.global_block()
    ops = block.ops
    consumers = {}
    for op in ops:
        for name in op.input_arg_names:
            consumers.setdefault(name, []).append(op)
    found = {}
    for op in ops:
        slot = _WEIGHTED_OPS.get(op.type)
        if slot is None or not op.input(slot[0]):
            continue
        weight = names.get(op.input(slot[0])[0])
        if weight is None:
            continue  # e.g. attention matmuls: both inputs are activations
        entry = (weight, slot[1])
        for out in op.output_arg_names:
            found[out] = entry
        out = op.output_arg_names[0] if len(op.output_arg_names) == 1 else None
        for _ in range(3):  # conv -> bias add -> BatchNorm / scale
            following = consumers.get(out, [])
            if len(following) != 1 or following[0].type not in _AFFINE_OPS:
                break
            affine = following[0]
            # its parameters, not the other input of a residual add
            constants = [n for n in affine.input_arg_names
                         if n != out and block.has_var(n) and block.var(n).persistable]
            for name in affine.output_arg_names + constants:
                found.setdefault(name, entry)
            out = affine.output("Y" if affine.type == "batch_norm" else "Out")[0]
    return found


def _lookup(weighted, original):
    """The weight of an OpenVINO original-layer name: exact, or without the ``_<n>`` suffix OpenVINO appends to
    constants it copies."""
    if original in weighted:
        return weighted[original]
    stem, _, suffix = original.rpartition("_")
    return weighted.get(stem) if suffix.isdigit() else None


def _charge(runtime_ops, times, weighted):
    """Charge each compiled node's time to a weight: (weight_ms, output_ms, out_axis, other_ms)."""
    owner, weight_ms, output_ms, out_axis, other = {}, {}, {}, {}, 0.0
    for op in runtime_ops:  # topological order: producers first
        name = op.get_friendly_name()
        originals = str(op.get_rt_info()["originalLayersNames"].astype(str)).split(",")
        hits = [hit for hit in map(functools.partial(_lookup, weighted), originals) if hit]
        if hits:
            weight, axis = hits[-1]  # a fused node ends with the op whose output it produces
            owner[name] = weight
            out_axis[weight] = axis
            share = times.get(name, 0.0) / len({w for w, _ in hits})
            for hit in {w for w, _ in hits}:
                weight_ms[hit] = weight_ms.get(hit, 0.0) + share
            continue
        parents = [op.input_value(i).get_node().get_friendly_name() for i in range(op.get_input_size())]
        weight = next((owner[p] for p in parents if p in owner), None)
        if weight is None:
            other += times.get(name, 0.0)
            continue
        owner[name] = weight
        output_ms[weight] = output_ms.get(weight, 0.0) + times.get(name, 0.0)
    for weight in output_ms:
        out_axis.setdefault(weight, 0)
    return weight_ms, output_ms, out_axis, other


def measure_latency_table(model, model_cfg, backend="openvino", precision="fp32", threads=2, repeats=20,
                          calibration=None):
    """Profile ``model`` (a dygraph layer) on ``backend`` at its config's example input and charge the time.

    Args:
        model_cfg: the model's config (``Input``, ``Global.task``).
        precision: ``fp32``, or ``int8`` (NNCF quantization with ``calibration`` first, as the quant stage does).
        repeats: profiled calls after 3 unprofiled ones; per node the median is kept.
        calibration: ``[{input name: batch}]`` for ``int8``.

    Raises:
        ConfigError: for a backend without per-node profiling, or ``int8`` without calibration batches.
    """
    import numpy as np
    import openvino
    import openvino.properties as props
    import openvino.properties.hint as hints
    import paddle

    from compress.pruning.trace import _tensor_names
    from compress.quant.fold import fold_affine_into_conv
    from compress.quant.ptq import static_mode
    from export.backends.openvino_runtime import nncf_quantize, ov_core
    from export.exporter import export_inference_model

    if backend not in LATENCY_BACKENDS:
        raise ConfigError(f"Prune.latency_backend: {backend} has no per-layer profiling here; use "
                          f"{', '.join(LATENCY_BACKENDS)}")
    if precision == "int8" and not calibration:
        raise ConfigError("Prune.latency_precision int8: the Calibration split gave no batch to quantize with")
    started = time.time()
    task, input_cfg = model_cfg.task, model_cfg.Input
    shape = [1] + list(input_cfg.example_shape)
    folder = tempfile.mkdtemp(prefix="latency-")
    try:
        export_inference_model(model, os.path.join(folder, "float"), input_cfg, task)
        # as the quant stage deploys it: affine blocks folded into the convs (OpenVINO otherwise fuses them into
        # the convs under names of its own, and the conv's name is lost)
        model_dir = fold_affine_into_conv(os.path.join(folder, "float"), os.path.join(folder, "folded")).model_dir
        names = {tensor: structured for tensor, (structured, _, _) in _tensor_names(model).items()}
        shapes = {structured: list(param.shape) for structured, param in model.named_parameters()}
        with static_mode(), open(os.path.join(model_dir, "inference.pdmodel"), "rb") as handle:
            weighted = _weighted_outputs(paddle.static.Program.parse_from_string(handle.read()), names)
        ov_model = ov_core().read_model(os.path.join(model_dir, "inference.pdmodel"))
        if precision == "int8":  # on the dynamic-shape model: calibration pages differ in size
            ov_model, _ = nncf_quantize(ov_model, calibration, task)
        ov_model.reshape({ov_model.inputs[0]: shape})
        compiled = ov_core().compile_model(ov_model, "CPU", {
            props.inference_num_threads: threads, props.enable_profiling: True,
            hints.inference_precision: openvino.Type.f32,
            hints.performance_mode: hints.PerformanceMode.LATENCY})
        request = compiled.create_infer_request()
        feed = np.random.default_rng(0).random(shape, dtype=np.float32)
        samples = {}
        for call in range(3 + repeats):
            request.infer({0: feed})
            if call >= 3:
                for info in request.profiling_info:
                    samples.setdefault(info.node_name, []).append(info.real_time.total_seconds() * 1000.0)
        times = {node: statistics.median(values) for node, values in samples.items()}
        weight_ms, output_ms, out_axis, other = _charge(compiled.get_runtime_model().get_ordered_ops(), times,
                                                        weighted)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return LatencyTable(backend=backend, precision=precision, threads=threads, input_shape=shape,
                        total_ms=round(sum(times.values()), 4), weight_ms=weight_ms, output_ms=output_ms,
                        out_axis=out_axis, other_ms=other, seconds=round(time.time() - started, 1),
                        shapes={w: shapes[w] for w in set(weight_ms) | set(output_ms)})


def parameters_digest(model):
    """sha256 (16 hex digits) of a model's parameter names, shapes and values: which weights a table was measured
    on."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        value = param.numpy()
        digest.update(f"{name}:{value.shape}:{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


def cached_latency_table(cache_dir, model, model_cfg, write=True, **settings):
    """:func:`measure_latency_table`, measured once per model weights and settings and kept in ``cache_dir``.

    Timings vary from run to run, and the plan follows them: a resumed run, a back-off attempt or a ``--dry-run``
    must plan against the same table, so it is stored (atomically) and read back. ``write=False`` (``--dry-run``)
    reads a stored table but stores none.
    """
    from compress.checkpoint import atomic_write_json
    from compress.config import stable_hash

    calibration = hashlib.sha256()
    for batch in settings.get("calibration") or ():
        for name in sorted(batch):
            calibration.update(name.encode() + batch[name].tobytes())
    key = stable_hash("latency-table", list(model_cfg.Input.example_shape), calibration.hexdigest(),
                      {k: v for k, v in settings.items() if k != "calibration"}, parameters_digest(model))
    path = os.path.join(cache_dir, f"{key}.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            try:
                return LatencyTable.from_json(json.load(handle))
            except (ValueError, TypeError):
                pass  # unreadable: measured again below
    table = measure_latency_table(model, model_cfg, **settings)
    if write:
        os.makedirs(cache_dir, exist_ok=True)
        atomic_write_json(path, table.to_json())
    return table


def _plan_shapes(plan):
    return {name: change.shape_after for name, change in plan.tensors.items()}


def latency_reduction(table, plan):
    """Fraction of the table's estimated latency a plan removes."""
    before = table.estimate({})
    return 1.0 - table.estimate(_plan_shapes(plan)) / before if before else 0.0


def ratios_for_latency_target(sens, target_reduction, table, model, trace, criterion="l1_norm", round_to=8,
                              grid=None):
    """Per-layer ratios from the sensitivity curves whose plan removes ``target_reduction`` of the estimated latency
    at the least summed metric loss (see the module docstring).

    Returns:
        tuple: ``(ratios, plan, lambda)``; ``lambda`` is 0 when layers that lose nothing already reach the target
        (their ratios are then scaled down together to just meet it).

    Raises:
        ConfigError: when even the largest ratios of the grid do not reach the target.
    """
    from compress.pruning.sensitivity import _losses, blend_to_target

    if not 0.0 < target_reduction < 1.0:
        raise ConfigError(f"latency reduction target must be in (0, 1), got {target_reduction!r}")

    def plan_of(ratios):
        return make_plan(model, None, {k: v for k, v in ratios.items() if v > 0}, criterion, round_to=round_to,
                         trace=trace)

    def reaches(plan):
        return latency_reduction(table, plan) >= target_reduction

    unpruned = table.estimate({})
    options = {}  # layer -> [(ratio, loss, latency saved alone)]
    for layer, curve in sens.items():
        options[layer] = [(ratio, max(loss, 0.0), 0.0 if ratio == 0 else
                           unpruned - table.estimate(_plan_shapes(plan_of({layer: ratio}))))
                          for ratio, loss in _losses(curve, None, grid)]

    def choose(lam):
        return {layer: max(points, key=lambda p: (lam * p[2] - p[1], -p[0]))[0] for layer, points in options.items()}

    plan = plan_of({layer: points[-1][0] for layer, points in options.items()})
    if not reaches(plan):
        raise ConfigError(f"latency reduction target {target_reduction:.1%} is out of reach: the largest ratios of "
                          f"the sensitivity grid remove {latency_reduction(table, plan):.1%} of the estimated "
                          f"latency; lower Prune.latency_target or extend the grid / layers")
    free = choose(1e-12)  # layers that lose nothing take their largest saving
    if reaches(plan_of(free)):
        return (*blend_to_target(dict.fromkeys(free, 0.0), free, reaches, plan_of), 0.0)
    low, high = 1e-12, 1.0
    while not reaches(plan_of(choose(high))):
        high *= 4.0
    for _ in range(60):
        middle = math.sqrt(low * high)
        if reaches(plan_of(choose(middle))):
            high = middle
        else:
            low = middle
        if high / low < 1.0001:
            break
    # layers switch ratio in steps as lambda grows (several at the same lambda when their curves are alike): the
    # step at ``high`` is taken only as far as the target needs
    below, above = choose(low), choose(high)
    ratios, plan = blend_to_target(below, above, reaches, plan_of)
    return ratios, plan, high
