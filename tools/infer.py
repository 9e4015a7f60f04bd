"""OCR images with exported det + rec models: ``python tools/infer.py --det DIR --rec DIR --image PATH``, or
``python tools/infer.py --model-dir <run>/delivered --image PATH`` for what a run delivered.

Each folder is an export of the pipeline's export stage (e.g. ``<run>/stages/export/det/v1/fp32``); its
``deploy.yml`` gives the pre/post-processing and the deploy configs per backend (a delivered folder defaults to the
backend it was chosen on).

Output: one line per image in PaddleOCR's label format, reading order,
``<image name>\\t[{"transcription": "...", "points": [[x, y], x4], "score": 0.98}, ...]``
(so results can be diffed against, or used as, det label files). ``--draw OUT_DIR`` also writes
``<image stem>_ocr.png`` (boxes on the left, text on the right). Errors are one line on stderr with exit code 2.
"""
import zlib  # noqa: F401  (before paddle: see compress/__init__.py)
import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compress.data.labels import IMAGE_SUFFIXES as IMAGE_EXTENSIONS  # noqa: E402
from compress.errors import InputError, run_cli  # noqa: E402



def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", help="a run's delivered/ folder (det/ and rec/ inside)")
    parser.add_argument("--det", help="exported det model folder (holds deploy.yml); default: <model-dir>/det")
    parser.add_argument("--rec", help="exported rec model folder (holds deploy.yml); default: <model-dir>/rec")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="one image")
    source.add_argument("--folder", help="every image in this folder (sorted by name)")
    parser.add_argument("--draw", metavar="OUT_DIR", help="write <image>_ocr.png visualisations here")
    parser.add_argument("--backend", help="deploy config to use: a registered backend (paddle_cpu, onnxruntime, "
                                          "openvino, paddle_gpu, paddle_trt) or paddle_trt_fp16 (default: each "
                                          "folder's default, paddle_cpu); GPU configs fall back to CPU on a machine "
                                          "without one")
    parser.add_argument("--dict", help="rec character dictionary, e.g. rapidocr:ch_ppocr_rec/ppocr_keys_v1.txt "
                                       "(default: the one exported with the rec model)")
    parser.add_argument("--drop-score", type=float, default=0.5, help="drop lines recognised below this score")
    parser.add_argument("--threads", type=int, help="CPU threads (default: the deploy configs')")
    parser.add_argument("--font", help="TrueType font for --draw (default: DejaVu Sans from matplotlib)")
    return parser.parse_args(argv)


def list_images(args):
    """The image paths to read, or InputError naming the bad path."""
    if args.image:
        if not os.path.isfile(args.image):
            raise InputError(f"--image {args.image}: no such file")
        return [args.image]
    if not os.path.isdir(args.folder):
        raise InputError(f"--folder {args.folder}: no such folder")
    paths = sorted(p for p in glob.glob(os.path.join(args.folder, "*")) if p.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise InputError(f"--folder {args.folder}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def main(argv=None):
    args = parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args):
    for key in ("det", "rec"):
        if getattr(args, key) is None:
            if not args.model_dir:
                raise InputError(f"--{key}: missing; give --det and --rec, or --model-dir <run>/delivered")
            setattr(args, key, os.path.join(args.model_dir, key))
    paths = list_images(args)
    from export.ocr_system import OcrSystem, draw_result, format_label_line, read_image

    system = OcrSystem(args.det, args.rec, backend=args.backend, dict_path=args.dict,
                       drop_score=args.drop_score, threads=args.threads)
    for path in paths:
        image = read_image(path)
        lines = system(image)
        print(format_label_line(os.path.basename(path), lines), flush=True)
        if args.draw:
            stem = os.path.splitext(os.path.basename(path))[0]
            draw_result(image, lines, os.path.join(args.draw, f"{stem}_ocr.png"), args.font)
    return 0


if __name__ == "__main__":
    sys.exit(main())
