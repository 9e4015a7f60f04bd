"""Per-layer pruning sensitivity, resumable, and the ratio schedules derived from it.

``analyze_sensitivity`` prunes one conv group at a time, evaluates, and restores. Pruning is simulated by zeroing
the removed slices of every tensor in the group (conv filters, their biases, BatchNorm parameters and statistics,
the next convs' input slices): each removed channel then reaches the next layers only through zero weights, so the
model computes what the really pruned model computes (checked against ``apply_plan`` in the tests). Zeroing costs
milliseconds and needs no copy of the model; the model is traced once for all layers.

Results are ``sens[layer][ratio] = metric`` (higher is better) with ``sens[layer][0.0]`` the unpruned baseline.
Losses are ``baseline - metric`` in the metric's own units (e.g. hmean points).
"""
import contextlib
import hashlib
import io
import json
import math
import os

import numpy as np
from tqdm import tqdm

from compress.checkpoint import atomic_write_bytes, atomic_write_text
from compress.errors import CheckpointError, ConfigError
from compress.pruning.compensation import add_deltas, plan_compensation
from compress.pruning.criteria import bind_criterion, criterion_name
from compress.pruning.plan import make_plan
from compress.pruning.reconstruction import local_reconstruction_deltas
from compress.pruning.trace import trace_model

STATE_FORMAT_VERSION = 1


def _ratio_key(ratio):
    return f"{float(ratio):.6g}"


def model_fingerprint(model):
    """sha256 of the names, shapes and values of a model's parameters."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        value = np.ascontiguousarray(param.numpy())
        digest.update(f"{name}:{list(value.shape)}:{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def pruned_by_zeroing(model, plan, deltas=None):
    """Temporarily zero, in ``model``, every slice that ``plan`` would remove; restore the values on exit.

    ``deltas`` (parameter name -> array to add, e.g. ``plan_compensation(...).deltas``) are added first, so the
    model computes what the compensated, really pruned model computes.
    """
    params = dict(model.named_parameters())
    backups = {}
    try:
        if deltas:
            backups.update(add_deltas(model, deltas))
        for name, change in plan.tensors.items():
            value = params[name].numpy()
            backups.setdefault(name, value.copy())
            for axis, kept in change.kept.items():
                removed = np.setdiff1d(np.arange(value.shape[axis]), kept)
                index = [slice(None)] * value.ndim
                index[axis] = removed
                value[tuple(index)] = 0
            params[name].set_value(value)
        yield model
    finally:
        for name, value in backups.items():
            params[name].set_value(value)


def _write_json_atomically(path, data):
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


def _load_state(state_path, settings):
    if not os.path.exists(state_path):
        return {"version": STATE_FORMAT_VERSION, "settings": settings, "baseline": None, "results": {}}
    try:
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"sensitivity state {state_path} is unreadable ({error}): delete it to start over")
    if state.get("version") != STATE_FORMAT_VERSION:
        raise CheckpointError(f"sensitivity state {state_path} has version {state.get('version')!r}, expected "
                              f"{STATE_FORMAT_VERSION}: delete it or choose another state path")
    for key, value in settings.items():
        if state.get("settings", {}).get(key) != value:
            raise CheckpointError(f"sensitivity state {state_path} was made with another {key} "
                                  f"({state.get('settings', {}).get(key)!r}, now {value!r}): delete it or choose "
                                  "another state path")
    return state


def analyze_sensitivity(model, example_inputs, layers, ratios_grid, criterion, eval_fn, state_path,
                        show_progress=True, *, trace=None, round_to=8, settings_tag=None, stats=None,
                        compensate=False, reconstruct_damp=None):
    """Metric after pruning each layer alone at each ratio; resumable.

    Progress is saved to ``state_path`` (JSON, replaced atomically) after every (layer, ratio) pair. A re-run
    evaluates only the missing pairs; the layers and the grid may change between runs (results are per pair),
    but a state made with another model (weights), criterion, ``round_to``, input shape or ``settings_tag`` is
    refused.

    Args:
        model: the model; it is left unchanged (values restored after each evaluation, also on error).
        example_inputs: inputs of ``model.forward`` for tracing (unused when ``trace`` is given).
        layers: conv weight names, e.g. from :func:`compress.pruning.selection.prunable_layers`.
        ratios_grid: pruning ratios to try, each in (0, 1).
        criterion: criterion name or callable used to choose the pruned filters.
        eval_fn: ``eval_fn(model) -> float``, higher is better.
        state_path: JSON file for progress and results.
        show_progress: show a tqdm bar with ETA.
        trace: optional :class:`compress.pruning.trace.PruningTrace` of the model.
        round_to: channel rounding (as in plans). A pair whose rounding keeps every channel is not evaluated.
        settings_tag: any JSON value describing the evaluation (data subset, metric); part of the settings.
        stats: :class:`compress.pruning.compensation.ActivationStats` of the model, for a data-driven criterion
            and for ``compensate``.
        compensate: give each pruned layer's consumers bias compensation, as the prune stage does.
        reconstruct_damp: when set, re-solve each pruned layer's consumers by ridge least squares (this damping)
            from the unpruned model's input Gram matrices (``stats.grams``), so the loss measured is what
            reconstruction leaves (:func:`compress.pruning.reconstruction.local_reconstruction_deltas`: local
            consumers only, no forward pass); replaces the compensation of the layers it re-solves.

    Returns:
        dict: ``{layer: {0.0: baseline, ratio: metric, ...}}`` for the requested layers and grid.
    """
    grid = sorted({float(r) for r in ratios_grid})
    if not grid or grid[0] <= 0.0 or grid[-1] >= 1.0:
        raise ConfigError(f"sensitivity ratios must be in (0, 1), got {list(ratios_grid)}")
    score = bind_criterion(criterion, stats)
    if compensate and stats is None:
        raise ConfigError("bias compensation needs the model's activation statistics (stats=...)")
    if reconstruct_damp is not None and (stats is None or not stats.grams):
        raise ConfigError("reconstruction in the sensitivity analysis needs the consumers' input Gram matrices: "
                          "measure the statistics with measure_activation_stats(..., grams=True)")
    trace = trace if trace is not None else trace_model(model, example_inputs)
    unknown = [layer for layer in layers if layer not in trace.groups]
    if unknown:
        raise ConfigError(f"cannot analyse {unknown[0]}: "
                          f"{trace.skipped.get(unknown[0], 'not a prunable conv weight of this model')}")
    settings = {"model": model_fingerprint(model), "criterion": criterion_name(criterion), "round_to": round_to,
                "compensate": bool(compensate),
                "input_shapes": trace.input_shapes, "tag": settings_tag}
    if reconstruct_damp is not None:  # only when on: states written before reconstruction existed stay valid
        settings["reconstruct_damp"] = float(reconstruct_damp)
    state = _load_state(state_path, settings)
    results = state["results"]
    todo = [(layer, ratio) for layer in layers for ratio in grid if _ratio_key(ratio) not in results.get(layer, {})]
    with tqdm(total=len(todo) + (state["baseline"] is None), desc="sensitivity", unit="eval",
              disable=not show_progress) as bar:
        if state["baseline"] is None:
            state["baseline"] = float(eval_fn(model))
            _write_json_atomically(state_path, state)
            bar.update(1)
        for layer, ratio in todo:
            bar.set_postfix_str(f"{layer.rsplit('.', 2)[0]} @ {ratio:g}")
            plan = make_plan(model, None, {layer: ratio}, score, round_to=round_to, trace=trace)
            if plan.tensors:
                deltas = plan_compensation(model, plan, stats, trace).deltas if compensate else {}
                if reconstruct_damp is not None:
                    deltas.update(local_reconstruction_deltas(model, plan, stats.grams, reconstruct_damp, trace)[0])
                with pruned_by_zeroing(model, plan, deltas):
                    metric = float(eval_fn(model))
            else:
                metric = state["baseline"]
            results.setdefault(layer, {})[_ratio_key(ratio)] = metric
            _write_json_atomically(state_path, state)
            bar.update(1)
    baseline = state["baseline"]
    return {layer: {0.0: baseline, **{ratio: results[layer][_ratio_key(ratio)] for ratio in grid}}
            for layer in layers}


def _losses(curve, baseline, grid):
    baseline = curve.get(0.0) if baseline is None else baseline
    ratios = sorted(r for r in curve if r > 0.0 and (grid is None or any(math.isclose(r, g) for g in grid)))
    return [(0.0, 0.0)] + [(r, baseline - curve[r]) for r in ratios]


def ratios_from_loss_budget(sens, baseline, max_loss, grid=None):
    """Per layer, the largest ratio whose (interpolated) loss stays within ``max_loss``.

    Losses are linearly interpolated between grid points, starting from (0, 0); the first grid point beyond the
    budget ends the search (a later, luckier point is not trusted).

    Args:
        sens: result of :func:`analyze_sensitivity`.
        baseline: unpruned metric; None uses ``sens[layer][0.0]``.
        max_loss: allowed ``baseline - metric`` per layer, in metric units.
        grid: ratios to use (default: all in ``sens``).

    Returns:
        dict: layer -> ratio (0.0 when even the smallest ratio loses too much).
    """
    ratios = {}
    for layer, curve in sens.items():
        points = _losses(curve, baseline, grid)
        chosen = points[-1][0]
        for (r0, l0), (r1, l1) in zip(points, points[1:]):
            if l1 > max_loss:
                chosen = r0 + (max_loss - l0) * (r1 - r0) / (l1 - l0) if l1 > l0 else r0
                chosen = min(max(chosen, r0), r1)
                break
        ratios[layer] = float(chosen)
    return ratios


def ratios_for_flops_target(sens, baseline, target_reduction, grid, model, trace, criterion="l1_norm",
                            round_to=8):
    """Smallest per-layer loss budget whose ratios remove at least ``target_reduction`` of the FLOPs.

    Bisection on the loss threshold of :func:`ratios_from_loss_budget`; each step makes a plan from the trace
    (milliseconds, no re-tracing) and reads its FLOPs.

    Returns:
        tuple: ``(ratios, plan, max_loss)``.

    Raises:
        ConfigError: when even the largest ratios of the grid do not reach the target.
    """
    if not 0.0 < target_reduction < 1.0:
        raise ConfigError(f"FLOPs reduction target must be in (0, 1), got {target_reduction!r}")

    def plan_for(max_loss):
        ratios = {k: v for k, v in ratios_from_loss_budget(sens, baseline, max_loss, grid).items() if v > 0}
        return ratios, make_plan(model, None, ratios, criterion, round_to=round_to, trace=trace)

    losses = [loss for curve in sens.values() for _, loss in _losses(curve, baseline, grid)]
    low, high = 0.0, max(losses) + 1e-9
    ratios, plan = plan_for(low)
    if plan.flops_reduction > target_reduction:
        # Layers that lost nothing up to the largest grid ratio already overshoot at a zero budget: scale those
        # ratios down together until the target is met.
        return _scaled_to_target(ratios, target_reduction, model, trace, criterion, round_to)
    ratios, plan = plan_for(high)
    if plan.flops_reduction < target_reduction:
        raise ConfigError(f"FLOPs reduction target {target_reduction:.1%} is out of reach: the largest ratios of "
                          f"the sensitivity grid remove {plan.flops_reduction:.1%}; lower the target or extend "
                          "the grid/layers")
    best = (ratios, plan, high)
    for _ in range(40):
        middle = (low + high) / 2
        ratios, plan = plan_for(middle)
        if plan.flops_reduction >= target_reduction:
            best, high = (ratios, plan, middle), middle
        else:
            low = middle
        if high - low < 1e-6 * max(1.0, high):
            break
    return best


def _scaled_to_target(ratios, target_reduction, model, trace, criterion, round_to):
    """One factor applied to every ratio, bisected: the smallest scaling that reaches the FLOPs target."""
    scaled, plan = blend_to_target(dict.fromkeys(ratios, 0.0), ratios,
                                   lambda plan: plan.flops_reduction >= target_reduction,
                                   lambda r: make_plan(model, None, r, criterion, round_to=round_to, trace=trace))
    return scaled, plan, 0.0


def blend_to_target(below, above, reaches, plan_of):
    """Ratios ``below + t * (above - below)`` with the smallest ``t`` in [0, 1] whose plan ``reaches`` the target
    (bisection; ``plan_of(ratios) -> plan``): ``(ratios, plan)``. With ``below`` all zeros: ``above`` scaled down."""
    low, high = 0.0, 1.0
    best = (above, plan_of(above))
    for _ in range(30):
        middle = (low + high) / 2
        ratios = {layer: below[layer] + middle * (above[layer] - below[layer]) for layer in above}
        plan = plan_of(ratios)
        if reaches(plan):
            best, high = (ratios, plan), middle
        else:
            low = middle
        if high - low < 1e-4:
            break
    return best


def _mean_loss(curve, baseline):
    losses = [loss for ratio, loss in _losses(curve, baseline, None) if ratio > 0]
    return sum(losses) / len(losses) if losses else 0.0


def rank_layers(sens, baseline=None):
    """Layers sorted most sensitive first (largest mean loss over the analysed ratios)."""
    return sorted(sens, key=lambda layer: _mean_loss(sens[layer], baseline), reverse=True)


def plot_sensitivity(sens, png_path, top_k=5, baseline=None):
    """Plot metric loss vs pruning ratio, one line per layer, the ``top_k`` most sensitive in colour and labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    ranked = rank_layers(sens, baseline)
    for layer in reversed(ranked):
        points = _losses(sens[layer], baseline, None)
        highlighted = layer in ranked[:top_k]
        axes.plot([r for r, _ in points], [loss for _, loss in points], marker="o" if highlighted else None,
                  linewidth=1.8 if highlighted else 0.8, color=None if highlighted else "0.75",
                  label=layer.rsplit(".", 1)[0] if highlighted else None, zorder=3 if highlighted else 1)
    axes.set_xlabel("pruning ratio (fraction of output channels removed)")
    axes.set_ylabel("metric loss (baseline - metric)")
    axes.set_title(f"Pruning sensitivity of {len(sens)} layers ({min(top_k, len(sens))} most sensitive labelled)")
    axes.grid(True, alpha=0.3)
    if ranked:
        axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    atomic_write_bytes(png_path, png.getvalue())
