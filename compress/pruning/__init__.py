"""Structured filter pruning for PP-OCR models: trace once, plan, apply (see ``plan.py``), sensitivity analysis.

Typical use::

    trace = trace_model(model, [example_image])
    layers = prunable_layers(model, DEFAULT_SKIP_PATTERNS, trace)
    plan = make_plan(model, None, {name: 0.3 for name in layers}, "l1_norm", trace=trace)
    print(format_plan(plan))          # --dry-run
    apply_plan(model, plan)           # and, in a fresh process: apply_plan(model, PrunePlan.from_json(text))
"""
from compress.pruning.criteria import FilterScores, criterion_names, get_criterion, register_criterion
from compress.pruning.plan import PrunePlan, apply_plan, format_plan, kept_channel_count, make_plan
from compress.pruning.selection import DEFAULT_SKIP_PATTERNS, prunable_layers
from compress.pruning.sensitivity import (analyze_sensitivity, plot_sensitivity, pruned_by_zeroing, rank_layers,
                                          ratios_for_flops_target, ratios_from_loss_budget)
from compress.pruning.trace import PruningTrace, trace_model

__all__ = [
    "DEFAULT_SKIP_PATTERNS", "FilterScores", "PrunePlan", "PruningTrace", "analyze_sensitivity", "apply_plan",
    "criterion_names", "format_plan", "get_criterion", "kept_channel_count", "make_plan", "plot_sensitivity",
    "prunable_layers", "pruned_by_zeroing", "rank_layers", "ratios_for_flops_target", "ratios_from_loss_budget",
    "register_criterion", "trace_model",
]
