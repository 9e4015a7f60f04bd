"""Compare two runs or checkpoints: ``python tools/compare.py RUN_DIR [--against OTHER_RUN_DIR] [--out DIR]``.

Reads each run's manifest, config.yml and export checkpoints; measures the exported models side by side (metric on
the Eval split through the real predictor, size, latency p50/p90/p99, throughput, peak RSS of a fresh process; all
timings interleaved between the models) and writes report.json / report.md / report.html into ``--out``.

* one run: every stage and exported model of the run against its baseline (what the compare stage reports);
* ``--against OTHER``: both runs' rows, deltas against OTHER's baseline rows, OTHER's Eval data for both.

A path may also be a checkpoint inside a run (``<run>/stages/<stage>/<model>/v<N>``): it selects that model and,
for an export checkpoint, that version's exported models. Settings default to the run's ``Compare`` section.
Errors are one line with exit code 2; a failed ``--max-metric-drop`` gate exits with 3.
"""
import zlib  # noqa: F401  (before paddle: see compress/__init__.py)
import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compress.errors import GateError, InputError, run_cli  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory (Global.run_dir) or a checkpoint inside one")
    parser.add_argument("--against", metavar="OTHER_RUN_DIR", help="reference run or checkpoint to compare with")
    parser.add_argument("--out", metavar="DIR", help="report folder (default: RUN_DIR/compare[_vs_<other>])")
    parser.add_argument("--threads", type=int, help="CPU threads for every model (default: Compare.threads)")
    parser.add_argument("--repeats", type=int, help="interleaved timed runs per model")
    parser.add_argument("--warmup", type=int, help="untimed runs per model first")
    parser.add_argument("--batch", type=int, help="throughput batch")
    parser.add_argument("--eval-limit", type=int, help="evaluate on the first N Eval samples")
    parser.add_argument("--backends", help="comma-separated, e.g. paddle_cpu,onnxruntime")
    parser.add_argument("--e2e-limit", type=int, help="pages for the end-to-end OCR A/B")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end OCR A/B")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--max-metric-drop", type=float, help="gate in points: exit 3 when a compressed model "
                                                              "loses more (default: Compare.max_metric_drop)")
    return parser.parse_args(argv)


def compare_settings(run_config, args):
    """The run's ``Compare`` section (per-model entries ignored) with the command-line overrides applied."""
    from compress.config import parse_section
    from compress.stages.compare import CompareConfig

    raw = dict(run_config.stage_sections.get("Compare") or {})
    raw.pop("per_model", None)
    cfg = parse_section(CompareConfig, raw, f"{run_config.source_file}: Compare")
    overrides = {"threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "batch": args.batch,
                 "eval_limit": args.eval_limit, "e2e_limit": args.e2e_limit,
                 "max_metric_drop": args.max_metric_drop}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if args.backends:
        overrides["backends"] = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if args.no_e2e:
        overrides["e2e"] = False
    if args.no_rss:
        overrides["rss"] = False
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.validate("command line")
    return cfg


def run_labels(run_dir, other_dir):
    """Row labels of the two runs: their folder names (prefixed A/B when equal)."""
    names = [os.path.basename(os.path.normpath(p)) for p in (run_dir, other_dir)]
    if names[0] == names[1]:
        names = [f"B-{names[0]}", f"A-{names[1]}"]
    return names


def compare(args):
    """Measure and write the reports; returns (rows, gate dict, written paths)."""
    from compress.report import summary_text, write_reports
    from compress.compare.rows import run_gate
    from compress.compare.runs import compare_sources, open_source
    from compress.timing import machine_info

    if args.against:
        label, other_label = run_labels(args.run_dir, args.against)
        sources = [open_source(args.against, other_label), open_source(args.run_dir, label)]
        out_name, title = f"compare_vs_{other_label}", f"A/B report: {label} vs {other_label}"
    else:
        sources = [open_source(args.run_dir)]
        out_name, title = "compare", f"A/B report: {os.path.basename(os.path.normpath(args.run_dir))}"
    out_dir = args.out or os.path.join(sources[-1].manifest.run_dir, out_name)
    cfg = compare_settings(sources[0].config, args)
    rows, notes = compare_sources(sources, cfg, reference=0)
    if not rows:
        raise InputError(f"{args.run_dir}: nothing to compare (no finished stage with metrics, nothing exported)")
    setting = "--max-metric-drop" if args.max_metric_drop is not None else "Compare.max_metric_drop"
    # only the compared run is gated, never the reference
    gated = [dict(r, gated=r["gated"] and r.get("run") == sources[-1].label) for r in rows]
    gate = run_gate(gated, cfg, setting)
    info = machine_info()
    info.update(threads=cfg.threads or sources[0].config.Global.threads, warmup=cfg.warmup, repeats=cfg.repeats,
                batch=cfg.batch)
    written = write_reports(rows, [out_dir], info, title, gate=gate, notes=notes)
    print(summary_text(rows))
    for note in notes:
        print(f"note: {note}")
    print(f"reports: {', '.join(written)}")
    return rows, gate, written


def main(argv=None):
    args = parse_args(argv)
    return run_cli(lambda: _run(args), "interrupted")


def _run(args):
    _, gate, _ = compare(args)
    if not gate["passed"]:
        raise GateError(gate["message"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
