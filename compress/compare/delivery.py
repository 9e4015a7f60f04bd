"""What the run hands over: per model, the fastest measured variant that passes every gate, in ``delivered/``.

Candidates are the measured rows of a model (every exported folder x backend, the baseline's included). A
compressed row passes when its main metric is within ``max_metric_drop`` points of its baseline row and its
fidelity within ``max_fidelity_drop`` / ``max_script_fidelity_drop``; a baseline row always passes, so there is
always an answer. The chosen one is the fastest (p50 at batch 1), ties broken by size. Its exported folder is copied
into ``delivered/<model>/`` with ``deploy.yml`` defaulting to the chosen backend and a model card (``model_card.json``,
``MODEL_CARD.md``): metric and fidelity against the baseline, latency, size, memory, the gates, every candidate with
why it was or was not chosen, and the stage chain with the command that rolls back to each stage.
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import dataclasses
import json
import os
import shutil

import yaml

from compress.checkpoint import atomic_write_text
from compress.compare.rows import fidelity_failures
from compress.report import gate_failures, row_key
from export.backends import REFERENCE_BACKEND

DELIVERED = "delivered"
CARD_JSON, CARD_MD = "model_card.json", "MODEL_CARD.md"


@dataclasses.dataclass
class Choice:
    """The delivery decision for one model.

    Attributes:
        model: model name.
        chosen: the chosen row.
        candidates: ``[(row, reason)]`` for every candidate, fastest first; reason is None for a passing one.
        compressed: True when the chosen row is not a baseline row.
    """

    model: str
    chosen: dict
    candidates: list
    compressed: bool

    @property
    def tried(self):
        """Some compressed variant of the model was measured."""
        return any(r["stage"] != "baseline" for r, _ in self.candidates)

    @property
    def compressed_passed(self):
        """Some compressed variant passed the gates (even when a baseline row was faster)."""
        return any(r["stage"] != "baseline" and reason is None for r, reason in self.candidates)


def choose(model, rows, cfg):
    """The fastest measured row of ``model`` that passes ``cfg``'s gates (see the module docstring).

    Returns:
        Choice, or None when nothing of the model was measured.
    """
    measured = [r for r in rows if r["model"] == model and r["source"] == "measured"
                and r.get("latency_ms_p50") is not None]
    if not measured:
        return None
    ranked = sorted(measured, key=lambda r: (r["latency_ms_p50"], r.get("size_bytes") or 0))
    metric = dict((row_key(r), f"{r['metric_name']} {-drop:+.2f} pt vs the baseline, more than the "
                                 f"{cfg.max_metric_drop:g} pt of Compare.max_metric_drop")
                  for r, drop in gate_failures(ranked, cfg.max_metric_drop))
    fidelity = dict((row_key(r), reason.split(": ", 1)[-1]) for r, reason in
                    fidelity_failures(ranked, cfg.max_fidelity_drop, cfg.max_script_fidelity_drop))
    candidates = [(r, "; ".join(filter(None, [metric.get(row_key(r)), fidelity.get(row_key(r))])) or None)
                  for r in ranked]
    chosen = next(r for r, reason in candidates if reason is None or r["stage"] == "baseline")
    return Choice(model, chosen, candidates, chosen["stage"] != "baseline")


def paddle_baseline(rows, model):
    """The model's baseline row on Paddle Inference CPU (what a PaddleOCR user runs today), or None."""
    return next((r for r in rows if r["model"] == model and r["stage"] == "baseline" and r["source"] == "measured"
                 and r.get("backend") == REFERENCE_BACKEND), None)


def write_delivered(choice, variant, rows, out_dir, card_extras):
    """Copy the chosen variant's exported folder into ``out_dir/delivered/<model>/`` with its model card.

    Args:
        choice: a :class:`Choice`.
        variant: the chosen row's :class:`compress.compare.variants.Variant` (its folder and deploy key).
        rows: every row of the run (for the baseline rows the card quotes).
        out_dir: the compare checkpoint being written.
        card_extras: more model-card fields (gates, stage chain, rollback commands, eval resolution).

    Returns:
        the delivered folder.
    """
    dest = os.path.join(out_dir, DELIVERED, choice.model)
    shutil.copytree(variant.folder, dest)
    deploy_file = os.path.join(dest, "deploy.yml")
    if os.path.exists(deploy_file) and variant.deploy_key:
        with open(deploy_file, encoding="utf-8") as handle:
            bundle = yaml.safe_load(handle)
        bundle.setdefault("Deploy", {})["default"] = variant.deploy_key
        atomic_write_text(deploy_file, yaml.safe_dump(bundle, sort_keys=False, allow_unicode=True))
    card = model_card(choice, rows, card_extras)
    atomic_write_text(os.path.join(dest, CARD_JSON), json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(os.path.join(dest, CARD_MD), card_markdown(card))
    return dest


def _row_facts(row):
    metrics = row.get("metrics") or {}
    return {"stage": row["stage"], "variant": row.get("variant"), "backend": row.get("backend"),
            "precision": row.get("precision"), "metric": {row["metric_name"]: row.get("metric")},
            "metric_diff_pt": row.get("metric_diff_pt"), "metric_diff_ci95_pt": row.get("metric_diff_ci95_pt"),
            "fidelity": metrics.get("fidelity"),
            "fidelity_by_script": {k: v for k, v in metrics.items() if k.startswith("fidelity_")
                                   and not k.startswith(("fidelity_ned", "fidelity_lines", "fidelity_boxes"))},
            "latency_ms_p50": row.get("latency_ms_p50"), "latency_ms_p99": row.get("latency_ms_p99"),
            "throughput_ips": row.get("throughput_ips"), "throughput_batch": row.get("throughput_batch"),
            "size_bytes": row.get("size_bytes"), "peak_rss_mb": row.get("peak_rss_mb")}


def model_card(choice, rows, extras):
    """The model card of a delivery (plain JSON-able dict)."""
    chosen = choice.chosen
    reference = next((r for r in rows if row_key(r) == chosen.get("reference")), None)
    paddle = paddle_baseline(rows, choice.model)
    card = {"model": choice.model, "compressed": choice.compressed, "chosen": _row_facts(chosen),
            "baseline_same_backend": _row_facts(reference) if reference else None,
            "speedup_vs_baseline_same_backend": chosen.get("speedup_p50"),
            "speedup_vs_paddle_baseline": (paddle["latency_ms_p50"] / chosen["latency_ms_p50"]
                                           if paddle and chosen.get("latency_ms_p50") else None),
            "size_ratio_vs_baseline": chosen.get("size_ratio"),
            "candidates": [dict(_row_facts(r), chosen=r is chosen, passed=reason is None,
                                why_not=None if r is chosen else reason or "slower than the chosen one")
                           for r, reason in choice.candidates]}
    card.update(extras)
    return card


def card_markdown(card):
    """``MODEL_CARD.md``: the card as a short page."""
    chosen = card["chosen"]
    (name, value), = chosen["metric"].items()
    interval = chosen.get("metric_diff_ci95_pt")
    lines = [f"# {card['model']}: {chosen['stage']}/{chosen['variant']} on {chosen['backend']}", "",
             f"- {name} {value:.4f} ({(chosen['metric_diff_pt'] or 0.0):+.2f} pt vs the baseline on the same backend"
             + (f"; 95% interval {interval[0]:+.2f} to {interval[1]:+.2f} pt, paired bootstrap over the Eval samples"
                if interval else "") + ")"
             if value is not None else f"- {name}: not measured",
             f"- fidelity to the baseline: {chosen['fidelity']:.4f}" if chosen.get("fidelity") is not None
             else "- fidelity to the baseline: not measured",
             f"- latency p50 {chosen['latency_ms_p50']:.1f} ms, p99 {chosen['latency_ms_p99']:.1f} ms at batch 1 "
             f"({card.get('threads')} threads)",
             f"- {(card['speedup_vs_paddle_baseline'] or 0):.2f}x the speed of the baseline on Paddle Inference CPU, "
             f"{(card['speedup_vs_baseline_same_backend'] or 0):.2f}x the baseline on {chosen['backend']}",
             f"- size {chosen['size_bytes'] / 1e6:.2f} MB" if chosen.get("size_bytes") else "- size: -",
             "", "## Candidates (fastest first)", "", "| stage | variant | backend | p50 ms | passed | why not |",
             "|---|---|---|---|---|---|"]
    for c in card["candidates"]:
        lines.append(f"| {c['stage']} | {c['variant']} | {c['backend']} | {c['latency_ms_p50']:.1f} | "
                     f"{'yes' if c['passed'] else 'no'} | {'(chosen)' if c['chosen'] else c['why_not']} |")
    lines += ["", "## Gates", ""] + [f"- {k}: {v}" for k, v in (card.get("gates") or {}).items()]
    samples = card.get("eval_samples") or 0
    resolution = (f"; one line is {100.0 / samples:.2f} points of {name}" if name == "acc" and samples else
                  "; hmean counts the text boxes of these pages" if name == "hmean" else "")
    lines += ["", f"Eval split: {samples} samples{resolution}.", "", "## Stages and rollback", ""]
    lines += [f"- {s['stage']}: `{s['dir']}`; roll back: `{s['rollback']}`" for s in card.get("chain", [])]
    return "\n".join(lines) + "\n"


def summary_line(choices, rows):
    """The run's last line, e.g. ``delivered det: export/int8 on openvino, hmean +0.8 pt, fidelity 0.974, 4.9x the
    Paddle baseline, 24% size; rec: ...``."""
    parts = []
    for choice in choices:
        row = choice.chosen
        text = f"{choice.model}: {row['stage']}/{row.get('variant')} on {row.get('backend')}"
        if row.get("metric_diff_pt") is not None:
            text += f", {row['metric_name']} {row['metric_diff_pt']:+.1f} pt"
        if (row.get("metrics") or {}).get("fidelity") is not None:
            text += f", fidelity {row['metrics']['fidelity']:.3f}"
        paddle = paddle_baseline(rows, choice.model)
        if paddle and row.get("latency_ms_p50"):
            text += f", {paddle['latency_ms_p50'] / row['latency_ms_p50']:.1f}x the speed of the Paddle baseline"
        if paddle and row.get("size_bytes") and paddle.get("size_bytes"):
            text += f", {row['size_bytes'] / paddle['size_bytes']:.0%} size"
        if not choice.compressed:
            text += (" (the baseline: the pipeline made no compressed variant)" if not choice.tried else
                     " (the baseline: faster than every compressed variant that passed)" if choice.compressed_passed
                     else " (the baseline: no compressed variant passed the gates)")
        parts.append(text)
    return "delivered " + "; ".join(parts)
