"""Run a compression pipeline: ``python tools/run.py -c configs/ppocr_prune_quant.yml [-o Section.key=value ...]``.

Other commands on the same config: ``--list`` (stages, status, metrics), ``--rollback-to STAGE`` (move the head
back; later stages become stale, nothing is deleted), ``--dry-run`` (print what would run, and the plan of the next
stage, writing nothing). Errors the user can fix are printed as one line; exit code 2 (3 for a failed quality gate).
"""
import zlib  # noqa: F401  (before paddle: see compress/__init__.py)
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compress.errors import run_cli  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", required=True, help="pipeline config (YAML)")
    parser.add_argument("-o", "--opt", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                        help="override config values; values are parsed as YAML")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--list", action="store_true", help="show stages, status and metrics of the run")
    group.add_argument("--rollback-to", metavar="STAGE", help="move the head back to STAGE (nothing is deleted)")
    group.add_argument("--dry-run", action="store_true", help="print what would run and the next plan; write nothing")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return run_cli(lambda: _run(args), "interrupted: finished stages are kept; run the same command again to resume")


def _run(args):
    from compress.backoff import describe, load_attempts, run_with_backoff
    from compress.config import load_config
    from compress.runner import Runner, format_seconds, is_writer, print_listing
    from compress.stages import stage_sections

    cfg = load_config(args.config, args.opt, stage_sections=stage_sections())
    runner = Runner(cfg)
    if args.list:
        print_listing(runner)
        for attempt in load_attempts(runner.run_dir):
            print(f"back-off {describe(attempt)}")
        return 0
    if args.rollback_to:
        runner.rollback(args.rollback_to)
        return 0
    started = time.time()
    try:
        if cfg.Global.demo_data and not args.dry_run and is_writer():
            from compress.data.demo import generate_demo_data
            generate_demo_data(cfg.Global.demo_data, show_progress=cfg.Global.show_progress)
        run_with_backoff(args.config, args.opt, stage_sections(), dry_run=args.dry_run)
    finally:
        if not args.dry_run and is_writer():
            print(f"total {format_seconds(time.time() - started)} (run dir {runner.run_dir})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
