"""A/B comparison reports: rows with deltas against a baseline row, the quality gate, and report.json / .md / .html.

A *row* is one model variant measured (or read from the run manifest): a plain dict with the keys of
``ROW_FIELDS``. Every row names its ``reference`` (the key of the baseline row it is compared with);
:func:`apply_deltas` fills ``metric_diff`` (in the metric's own units, e.g. 0.012 hmean), ``metric_diff_pt``
(the same in points, x100), ``speedup_p50`` (reference p50 / row p50) and ``size_ratio``.

``report.html`` is self-contained: tables, charts as base64 PNGs (matplotlib) and the pruning sensitivity plot,
no external assets.
"""
import base64
import html
import io
import json
import math
import os

from compress.checkpoint import atomic_write_text
from compress.stats import difference_interval

ROW_FIELDS = (
    "model", "stage", "variant", "backend", "precision", "run", "source",
    "metric_name", "metric", "metric_diff", "metric_diff_pt", "metric_diff_ci95_pt", "eval_records",
    "params", "flops", "size_bytes", "size_ratio",
    "latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "speedup_p50",
    "throughput_ips", "throughput_batch", "peak_rss_mb",
    "reference", "gated", "metrics", "note",
)
BASELINE_STAGE = "baseline"
REPORT_FILES = ("report.json", "report.md", "report.html")


def new_row(model, stage, **values):
    """A row with every field of ``ROW_FIELDS`` (None when not given).

    Args:
        model: model name (``det``, ``rec``, ``e2e``).
        stage: pipeline stage the variant comes from (``baseline``, ``prune``, ``export``...).
        **values: other fields: ``variant`` (e.g. ``int8``), ``backend``, ``precision``, ``metric`` ...

    Raises:
        TypeError: on a field name not in ``ROW_FIELDS``.
    """
    unknown = sorted(set(values) - set(ROW_FIELDS))
    if unknown:
        raise TypeError(f"unknown report row fields {unknown}; valid: {', '.join(ROW_FIELDS)}")
    row = dict.fromkeys(ROW_FIELDS)
    row.update(model=model, stage=stage, run="", source="manifest", gated=False, metrics={}, note="")
    row.update(values)
    return row


def row_key(row):
    """Unique name of a row: ``[run:]model/stage/variant@backend``."""
    prefix = f"{row['run']}:" if row.get("run") else ""
    return f"{prefix}{row['model']}/{row['stage']}/{row.get('variant') or '-'}@{row.get('backend') or '-'}"


def assign_references(rows, reference_run=None):
    """Point every row at its baseline row: same model, stage ``baseline``, same backend when there is one.

    Args:
        rows: rows (modified in place).
        reference_run: take baseline rows from this run (``--against``); default: each row's own run.

    Returns:
        ``rows``.
    """
    for row in rows:
        run = row.get("run") if reference_run is None else reference_run
        baselines = [r for r in rows if r["model"] == row["model"] and r["stage"] == BASELINE_STAGE
                     and r.get("run") == run and r.get("metric_name") == row.get("metric_name")]
        same_backend = [r for r in baselines if r.get("backend") == row.get("backend")]
        from_manifest = [r for r in baselines if r.get("source") == "manifest"]
        pick = (same_backend or from_manifest or baselines or [None])[0]
        row["reference"] = row_key(pick) if pick is not None else None
    return rows


def apply_deltas(rows):
    """Fill ``metric_diff``, ``metric_diff_pt``, ``speedup_p50`` and ``size_ratio`` from each row's reference, and
    ``metric_diff_ci95_pt`` (the paired bootstrap interval, :mod:`compress.stats`) when both rows carry the per-sample
    records of the same Eval samples (``eval_records``).

    Returns:
        ``rows`` (modified in place).
    """
    by_key = {row_key(r): r for r in rows}
    for row in rows:
        ref = by_key.get(row.get("reference"))
        if ref is None:
            continue
        if _number(row.get("metric")) and _number(ref.get("metric")):
            row["metric_diff"] = row["metric"] - ref["metric"]
            row["metric_diff_pt"] = 100.0 * row["metric_diff"]
        if row.get("eval_records") and ref.get("eval_records"):
            row["metric_diff_ci95_pt"] = difference_interval(ref["eval_records"], row["eval_records"])
        if _number(row.get("latency_ms_p50")) and _number(ref.get("latency_ms_p50")) and row["latency_ms_p50"] > 0:
            row["speedup_p50"] = ref["latency_ms_p50"] / row["latency_ms_p50"]
        if _number(row.get("size_bytes")) and _number(ref.get("size_bytes")) and ref["size_bytes"] > 0:
            row["size_ratio"] = row["size_bytes"] / ref["size_bytes"]
    return rows


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def gate_failures(rows, max_drop_pt):
    """Gated rows whose main metric fell more than ``max_drop_pt`` points below their reference.

    Returns:
        list of (row, drop in points), worst first; empty when the gate passes or is off (``max_drop_pt`` None).
    """
    if max_drop_pt is None:
        return []
    failing = [(row, -row["metric_diff_pt"]) for row in rows
               if row.get("gated") and _number(row.get("metric_diff_pt")) and -row["metric_diff_pt"] > max_drop_pt]
    return sorted(failing, key=lambda item: -item[1])


def gate_message(failures, max_drop_pt, by_key, setting="Compare.max_metric_drop"):
    """One line naming the worst failing model variant, its metric, the drop and the limit."""
    row, drop = failures[0]
    ref = by_key.get(row["reference"], {})
    text = (f"{row['model']} {row.get('variant') or row['stage']} on {row.get('backend')}: {row['metric_name']} "
            f"{_fmt_metric(ref.get('metric'))} -> {_fmt_metric(row['metric'])} ({-drop:+.2f} pt), more than the "
            f"{max_drop_pt:.2f} pt allowed by {setting}")
    if len(failures) > 1:
        others = ", ".join(f"{r['model']} {r.get('variant') or r['stage']}@{r.get('backend')}"
                           for r, _ in failures[1:4])
        text += f" ({len(failures) - 1} more over it: {others}{', ...' if len(failures) > 4 else ''})"
    return text + "; recover accuracy (finetune longer, prune less, skip sensitive layers in quant) or raise the limit"


# --------------------------------------------------------------------------------------------- formatting

def _fmt_metric(value):
    return f"{value:.4f}" if _number(value) else "-"


def _fmt_count(value):
    if not _number(value):
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:g}"


def _fmt(value, spec, suffix=""):
    return f"{value:{spec}}{suffix}" if _number(value) else "-"


def _fmt_interval(interval):
    """`` [-0.4, +1.9]`` for a 95% interval in points; empty when there is none."""
    return f" [{interval[0]:+.1f}, {interval[1]:+.1f}]" if interval else ""


def _fmt_scripts(metrics):
    """Per-script agreement with the baseline (rec), e.g. ``0.95/0.97/0.93``; ``-`` when not measured."""
    values = [metrics.get(f"fidelity_{script}") for script in ("latin", "cjk", "mixed")]
    return "/".join(_fmt(v, ".2f") for v in values) if any(_number(v) for v in values) else "-"


COLUMNS = (
    ("stage", lambda r: r["stage"]),
    ("variant", lambda r: r.get("variant") or "-"),
    ("backend", lambda r: r.get("backend") or "-"),
    ("precision", lambda r: r.get("precision") or "-"),
    ("metric", lambda r: f"{r['metric_name']} {_fmt_metric(r.get('metric'))}" if r.get("metric_name") else "-"),
    ("Δ pt", lambda r: _fmt(r.get("metric_diff_pt"), "+.2f") + _fmt_interval(r.get("metric_diff_ci95_pt"))),
    ("fidelity", lambda r: _fmt((r.get("metrics") or {}).get("fidelity"), ".4f")),
    ("latin/cjk/mixed", lambda r: _fmt_scripts(r.get("metrics") or {})),
    ("params", lambda r: _fmt_count(r.get("params"))),
    ("FLOPs", lambda r: _fmt_count(r.get("flops"))),
    ("size MB", lambda r: _fmt((r.get("size_bytes") or 0) / 1e6 if r.get("size_bytes") else None, ".2f")),
    ("size x", lambda r: _fmt(r.get("size_ratio"), ".2f")),
    ("p50 ms", lambda r: _fmt(r.get("latency_ms_p50"), ".1f")),
    ("p99 ms", lambda r: _fmt(r.get("latency_ms_p99"), ".1f")),
    ("speedup", lambda r: _fmt(r.get("speedup_p50"), ".2f", "x")),
    ("img/s", lambda r: (_fmt(r.get("throughput_ips"), ".1f") + (f" @{r['throughput_batch']}"
                                                                  if r.get("throughput_batch") else ""))),
    ("RSS MB", lambda r: _fmt(r.get("peak_rss_mb"), ".0f")),
)
E2E_COLUMNS = (
    ("word P", lambda r: _fmt(r["metrics"].get("word_precision"), ".4f")),
    ("word R", lambda r: _fmt(r["metrics"].get("word_recall"), ".4f")),
    ("CER", lambda r: _fmt(r["metrics"].get("char_error_rate"), ".4f")),
    ("line acc", lambda r: _fmt(r["metrics"].get("line_accuracy"), ".4f")),
    ("pages", lambda r: _fmt(r["metrics"].get("pages"), "d")),
)
SUMMARY_COLUMNS = ("stage", "variant", "backend", "metric", "Δ pt", "fidelity", "latin/cjk/mixed", "size MB",
                   "p50 ms", "speedup", "img/s")
E2E_SUMMARY_COLUMNS = ("stage", "variant", "backend", "metric", "Δ pt", "word P", "word R", "CER", "fidelity",
                       "size MB", "p50 ms", "speedup")
E2E_TABLE = ("stage", "variant", "backend", "precision", "metric", "Δ pt", "word P", "word R", "CER", "line acc",
             "pages", "fidelity", "size MB", "size x", "p50 ms", "p99 ms", "speedup", "img/s")


def _columns_for(rows):
    """All columns, or the end-to-end ones (word precision/recall, CER) for ``e2e`` rows."""
    return E2E_TABLE if rows and all(r["model"] == "e2e" for r in rows) else None


def table_cells(rows, columns=None):
    """Header and cell strings of ``rows`` for the chosen column titles (default: all but the e2e ones)."""
    every = COLUMNS + E2E_COLUMNS
    if columns is None:
        chosen = list(COLUMNS)
    else:
        by_title = dict(every)
        chosen = [(title, by_title[title]) for title in columns]
    header = [title for title, _ in chosen]
    return header, [[cell(row) for _, cell in chosen] for row in rows]


def markdown_table(rows, columns=None):
    header, cells = table_cells(rows, columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return "\n".join(lines)


def text_table(rows, columns=None):
    """Fixed-width table for the console."""
    header, cells = table_cells(rows, columns)
    widths = [max(len(x) for x in [h] + [c[i] for c in cells]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def models_in(rows):
    """Model names in first-seen order, ``e2e`` last."""
    names = list(dict.fromkeys(r["model"] for r in rows))
    return [n for n in names if n != "e2e"] + [n for n in names if n == "e2e"]


def summary_rows(rows):
    """The rows worth a glance: each model's baseline rows and its gated (final) rows, plus every e2e row."""
    return [r for r in rows if r["model"] == "e2e" or r["gated"] or (r["stage"] == BASELINE_STAGE and (
        r.get("source") == "measured" or not any(x["model"] == r["model"] and x.get("source") == "measured"
                                                  for x in rows)))]


def summary_text(rows):
    """Console summary: one block per model (det, rec, e2e) with the baseline and final rows."""
    blocks = []
    chosen = summary_rows(rows)
    for model in models_in(chosen):
        model_rows = [r for r in chosen if r["model"] == model]
        columns = E2E_SUMMARY_COLUMNS if model == "e2e" else SUMMARY_COLUMNS
        blocks.append(f"== {model} ==\n" + text_table(model_rows, columns))
    return "\n".join(blocks)


def _machine_lines(info):
    keys = ("cpu_model", "logical_cpus", "cpu_flags", "threads", "warmup", "repeats", "batch", "paddle_version",
            "onnxruntime_version", "python", "platform")
    return [f"{k}: {', '.join(map(str, info[k])) if isinstance(info[k], list) else info[k]}"
            for k in keys if k in info and info[k] not in (None, "")]


def render_markdown(rows, info, title="Compression A/B report", notes=()):
    """report.md: machine facts, one table per model, notes."""
    parts = [f"# {title}", ""]
    parts += [f"- {line}" for line in _machine_lines(info)] + [""]
    for model in models_in(rows):
        model_rows = [r for r in rows if r["model"] == model]
        parts += [f"## {model}", "", markdown_table(model_rows, _columns_for(model_rows)), ""]
    parts += [_legend(), ""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(parts)


def _legend():
    return ("Δ pt: main metric minus the baseline row's (same backend when measured), in points. fidelity: agreement "
            "with the baseline model's own outputs on the unlabelled Fidelity split (rec: share of lines read exactly "
            "as the baseline reads them; det: box hmean with the baseline's boxes as reference, IoU 0.5); "
            "latin/cjk/mixed: the same per script of the baseline's reading; e2e fidelity: word hmean of the det+rec "
            "system against the baseline system's words on the det Fidelity pages. speedup: baseline "
            "p50 / p50. size x: size / baseline size. Latency at batch 1; img/s at the batch shown; RSS: peak "
            "resident memory of a fresh process loading and running the model. Rows without timings come from the "
            "run manifest (dygraph evaluation during the pipeline).")


# --------------------------------------------------------------------------------------------- charts

def _figure(width=7.0, height=4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure):
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def chart_metric_vs_latency(rows, model):
    """PNG: main metric vs p50 latency of every timed row of ``model`` (None when nothing is timed)."""
    timed = [r for r in rows if r["model"] == model and _number(r.get("latency_ms_p50")) and _number(r.get("metric"))]
    if not timed:
        return None
    figure = _figure()
    axes = figure.add_subplot(1, 1, 1)
    for backend in dict.fromkeys(r.get("backend") for r in timed):
        points = [r for r in timed if r.get("backend") == backend]
        axes.scatter([r["latency_ms_p50"] for r in points], [r["metric"] for r in points], label=backend, s=40)
        for r in points:
            axes.annotate(r.get("variant") or r["stage"], (r["latency_ms_p50"], r["metric"]), fontsize=8,
                          xytext=(4, 4), textcoords="offset points")
    axes.margins(x=0.2, y=0.1)  # room for the labels
    axes.set_xlabel("latency p50, batch 1 (ms)")
    axes.set_ylabel(timed[0]["metric_name"])
    axes.set_title(f"{model}: {timed[0]['metric_name']} vs latency (up and left is better)")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    return _png(figure)


def chart_sizes(rows, model):
    """PNG: horizontal bars of size on disk (MB) of every row of ``model`` with a size (None when none)."""
    sized = [r for r in rows if r["model"] == model and _number(r.get("size_bytes")) and r["size_bytes"] > 0]
    if not sized:
        return None
    labels = [f"{r['stage']}/{r.get('variant') or '-'}@{r.get('backend') or '-'}" for r in sized]
    figure = _figure(7.0, 0.8 + 0.35 * len(sized))
    axes = figure.add_subplot(1, 1, 1)
    values = [r["size_bytes"] / 1e6 for r in sized]
    axes.barh(range(len(sized)), values, color=["#7a7a7a" if r["stage"] == BASELINE_STAGE else "#2b6cb0"
                                                for r in sized])
    axes.set_yticks(range(len(sized)))
    axes.set_yticklabels(labels, fontsize=8)
    axes.invert_yaxis()
    for index, value in enumerate(values):
        axes.annotate(f"{value:.2f}", (value, index), fontsize=8, xytext=(3, -3), textcoords="offset points")
    axes.set_xlabel("size on disk (MB)")
    axes.set_title(f"{model}: model size")
    return _png(figure)


def chart_stages(rows, model):
    """PNG: main metric and FLOPs after each pipeline stage (manifest rows; None when fewer than two)."""
    staged = [r for r in rows if r["model"] == model and r.get("source") == "manifest" and _number(r.get("metric"))]
    if len(staged) < 2:
        return None
    figure = _figure(7.0, 3.5)
    axes = figure.add_subplot(1, 1, 1)
    positions = range(len(staged))
    axes.plot(positions, [r["metric"] for r in staged], marker="o", color="#2b6cb0")
    axes.set_xticks(list(positions))
    axes.set_xticklabels([r["stage"] for r in staged], fontsize=8)
    axes.set_ylabel(staged[0]["metric_name"], color="#2b6cb0")
    if any(_number(r.get("flops")) for r in staged):
        twin = axes.twinx()
        twin.bar(positions, [(r.get("flops") or 0) / 1e9 for r in staged], alpha=0.25, color="#dd6b20")
        twin.set_ylabel("GFLOPs (MACs)", color="#dd6b20")
    axes.set_title(f"{model}: metric and FLOPs per stage")
    axes.grid(True, alpha=0.3)
    return _png(figure)


def _img_tag(png_bytes, alt):
    data = base64.b64encode(png_bytes).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


# --------------------------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1a202c;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #cbd5e0}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #cbd5e0;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#edf2f7}td:nth-child(-n+4){text-align:left}
tr.baseline td{background:#f7fafc;color:#4a5568}tr.fail td{background:#fed7d7}tr.gated td{font-weight:600}
.charts{display:flex;flex-wrap:wrap;align-items:flex-start}
.charts img{max-width:560px;margin:6px 12px 6px 0;border:1px solid #e2e8f0}figure{margin:0}
.gate{padding:8px 12px;border-radius:4px;margin:12px 0}.pass{background:#c6f6d5}.failed{background:#fed7d7}
.off{background:#edf2f7}
.small{color:#4a5568;font-size:12px}
"""


def _html_table(rows, failing_keys):
    header, cells = table_cells(rows, _columns_for(rows))
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row, row_cells in zip(rows, cells):
        classes = []
        if row["stage"] == BASELINE_STAGE:
            classes.append("baseline")
        if row.get("gated"):
            classes.append("gated")
        if row_key(row) in failing_keys:
            classes.append("fail")
        attr = f' class="{" ".join(classes)}"' if classes else ""
        out.append(f"<tr{attr}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row_cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def render_html(rows, info, title="Compression A/B report", images=None, gate=None, notes=()):
    """report.html: self-contained page with the tables, charts (base64 PNG) and extra images.

    Args:
        rows: report rows (with deltas applied).
        info: machine and settings facts.
        title: page title.
        images: model name -> list of (caption, PNG bytes) shown under that model (e.g. sensitivity curves).
        gate: dict with ``passed``, ``message`` and ``limits`` (model -> its ``max_metric_drop``,
            ``max_fidelity_drop``, ``max_script_fidelity_drop``), or None when there is no gate.
        notes: extra lines.
    """
    images = images or {}
    failing = set((gate or {}).get("failing", ()))
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if gate is not None:
        state = "pass" if gate["passed"] else "failed"
        limits = {model: [f"{own[key]:g} pt of {what}" for key, what in (
            ("max_metric_drop", "its baseline's metric"), ("max_fidelity_drop", "fidelity to the baseline"),
            ("max_script_fidelity_drop", "fidelity per script")) if own.get(key) is not None]
            for model, own in (gate.get("limits") or {}).items()}
        if not any(limits.values()):
            state, title, text = "off", "Gate off", "no max_metric_drop or max_fidelity_drop set: nothing is gated"
        else:
            title = "Gate passed" if gate["passed"] else "Gate FAILED"
            text = gate.get("message") or "every gated row is within its model's limits: " + "; ".join(
                f"{model} {', '.join(own) or 'not gated'}" for model, own in limits.items())
        parts.append(f'<div class="gate {state}"><b>{title}:</b> {html.escape(text)}</div>')
    parts.append('<p class="small">' + "<br>".join(html.escape(line) for line in _machine_lines(info)) + "</p>")
    for model in models_in(rows):
        model_rows = [r for r in rows if r["model"] == model]
        parts += [f"<h2>{html.escape(model)}</h2>", _html_table(model_rows, failing), '<div class="charts">']
        for chart in (chart_metric_vs_latency, chart_stages, chart_sizes):
            png = chart(rows, model)
            if png is not None:
                parts.append(_img_tag(png, f"{model} {chart.__name__}"))
        for caption, png in images.get(model, []):
            parts.append(f"<figure>{_img_tag(png, caption)}<figcaption class='small'>{html.escape(caption)}"
                         "</figcaption></figure>")
        parts.append("</div>")
    parts.append(f'<p class="small">{html.escape(_legend())}</p>')
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- files

def write_reports(rows, out_dirs, info, title="Compression A/B report", images=None, gate=None, notes=()):
    """Write report.json, report.md and report.html into every folder of ``out_dirs`` (atomically, file by file).

    report.json holds ``{"title", "machine", "gate", "notes", "rows": [...]}`` with every row field.

    Returns:
        list of written paths.
    """
    payload = {"title": title, "machine": info, "gate": gate, "notes": list(notes),
               "rows": [{k: _json_value(row.get(k)) for k in ROW_FIELDS} for row in rows]}
    texts = {"report.json": json.dumps(payload, indent=2, ensure_ascii=False) + "\n",
             "report.md": render_markdown(rows, info, title, notes),
             "report.html": render_html(rows, info, title, images, gate, notes)}
    written = []
    for folder in dict.fromkeys(out_dirs):
        for name in REPORT_FILES:
            path = os.path.join(folder, name)
            atomic_write_text(path, texts[name])
            written.append(path)
    return written


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def read_report_rows(path):
    """Rows of a report.json written by :func:`write_reports`."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["rows"]
