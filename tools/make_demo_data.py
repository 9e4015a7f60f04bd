"""Write the deterministic synthetic OCR demo data set (PaddleOCR det + rec label formats).

Usage (from the repository root):
    python tools/make_demo_data.py --out data/demo --seed 0
    python tools/make_demo_data.py --out data/tiny --det-train 4 --rec-train 32 --rec-fidelity 0 --rec-unlabeled 0 --force
"""
import argparse
import dataclasses
import os
import sys
import time

# Run as a script, Python puts tools/ (not the repository root) on sys.path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compress.data.demo import (  # noqa: E402
    COVERAGE_REPEATS, DEFAULT_DICTIONARY, SPLITS, DemoCounts, generate_demo_data)
from compress.errors import run_cli  # noqa: E402

_SPLIT_HELP = {"fidelity": " (agreement with the baseline, never trained on)",
               "unlabeled": " (label-free distillation)"}


def parse_args(argv=None):
    """Parse the command line; every count defaults to ``DemoCounts()``."""
    defaults = DemoCounts()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo", help="output folder (default: data/demo)")
    parser.add_argument("--seed", type=int, default=0, help="base random seed (default: 0)")
    for task in ("det", "rec"):
        for split in SPLITS:
            name = f"{task}_{split}"
            unit = "pages" if task == "det" else "text lines"
            parser.add_argument(f"--{task}-{split}", dest=name, type=int, default=getattr(defaults, name),
                                help=f"{split} {unit} for {task}{_SPLIT_HELP.get(split, '')} "
                                     f"(default: {getattr(defaults, name)})")
    parser.add_argument("--dictionary", default=DEFAULT_DICTIONARY,
                        help="character dictionary the rec fidelity/unlabeled lines cover (default: the shipped "
                             f"PP-OCRv4 one, {DEFAULT_DICTIONARY})")
    parser.add_argument("--font-dir", dest="font_dirs", action="append", default=[], metavar="DIR",
                        help="extra folder of .ttf/.otf/.ttc fonts to draw with besides the packaged ones "
                             "(repeatable)")
    parser.add_argument("--force", action="store_true", help="replace an existing data set in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None):
    """Generate the data set and print one summary line; a CompressError becomes one line on stderr, exit 2."""
    args = parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args):
    counts = DemoCounts(**{field.name: getattr(args, field.name) for field in dataclasses.fields(DemoCounts)})
    started = time.perf_counter()
    info = generate_demo_data(args.out, seed=args.seed, counts=counts, show_progress=not args.quiet,
                              force=args.force, font_dirs=args.font_dirs, dictionary=args.dictionary)
    elapsed = time.perf_counter() - started
    state = "wrote" if info["generated"] else "kept existing"
    det = "/".join(str(info["counts"][f"det_{split}"]) for split in SPLITS)
    rec = "/".join(str(info["counts"][f"rec_{split}"]) for split in SPLITS)
    covered = [f"{key.split('/')[1]} {cov.covered_chars}/{cov.renderable_chars}"
               for key, cov in info["coverage"].items()]
    coverage = f"  dictionary chars >= {COVERAGE_REPEATS}x ({', '.join(covered)})" if covered else ""
    print(f"demo data: {state} {info['out_dir']}  seed={info['seed']}  "
          f"det pages ({'/'.join(SPLITS)})={det}  rec lines={rec}  fonts={len(info['fonts'])}{coverage}  "
          f"{elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
