"""Cut a rec Fidelity set from unlabelled pages with the baseline det model: one crop per detected text line.

    python tools/make_fidelity_crops.py --det <run>/stages/export/det/v1/baseline_fp32 --pages my_pages/ \\
        --out data/fidelity_rec_crops
    # then, in the rec model config:   Fidelity: {data_dir: data/fidelity_rec_crops}

The crops are what the deployed system would hand the recogniser (PaddleOCR's box sorting and perspective crop,
see ``export.ocr_system``), so agreement with the baseline rec on them is measured on the user's own text.
``--det`` is an exported det folder (holding ``deploy.yml``): with the ``export`` stage run, the run's
``baseline_fp32`` (or, when nothing changed the weights, ``fp32``) folder. The output folder is written
atomically; an existing one is replaced only with ``--force``. One summary line; errors are one line, exit 2.
"""
import zlib  # noqa: F401  (before paddle: see compress/__init__.py)
import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from compress.errors import InputError, run_cli  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--det", required=True, help="exported baseline det folder (holds deploy.yml)")
    parser.add_argument("--pages", required=True, help="folder of page images (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder for the crops and crops.txt")
    parser.add_argument("--limit", type=int, help="first N pages only")
    parser.add_argument("--max-crops", type=int, help="stop after this many crops")
    parser.add_argument("--min-height", type=int, default=8, help="skip crops lower than this (px, default 8)")
    parser.add_argument("--backend", help="deploy config of the det folder to run (default: its default)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def make_crops(det_dir, pages_dir, out_dir, limit=None, max_crops=None, min_height=8, backend=None, force=False,
               show_progress=True):
    """Detect text lines on every page with the det model and write each line's crop.

    Returns:
        dict with ``pages``, ``crops``, ``out_dir``, ``seconds``.

    Raises:
        InputError: bad folders, no page, or ``out_dir`` exists without ``force``.
    """
    import cv2
    from tqdm import tqdm

    from compress.data.labels import list_images
    from export.ocr_system import TextDetector, crop_boxes, read_image

    if not os.path.isdir(pages_dir):
        raise InputError(f"--pages {pages_dir}: no such folder")
    names = list_images(pages_dir)[:limit] if limit else list_images(pages_dir)
    if not names:
        raise InputError(f"--pages {pages_dir}: no images (.jpg, .png, .bmp, .tif, .webp)")
    if os.path.exists(out_dir) and not force:
        raise InputError(f"--out {out_dir}: exists; pass --force to replace it or choose another folder")
    started = time.time()
    detector = TextDetector(det_dir, backend=backend)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".crops-", dir=parent)
    lines, pages = [], 0
    try:
        for name in tqdm(names, desc="fidelity crops", disable=not show_progress):
            image = read_image(os.path.join(pages_dir, name))
            pages += 1
            stem = os.path.splitext(name)[0].replace("/", "_")
            for index, crop in enumerate(crop_boxes(image, detector(image))):
                if crop.shape[0] < min_height:
                    continue
                relative = f"{stem}_{index:03d}.jpg"
                cv2.imwrite(os.path.join(tmp, relative), crop, [cv2.IMWRITE_JPEG_QUALITY, 95])
                lines.append(f"{relative}\t{name}\n")
                if max_crops and len(lines) >= max_crops:
                    break
            if max_crops and len(lines) >= max_crops:
                break
        with open(os.path.join(tmp, "crops.txt"), "w", encoding="utf-8") as handle:
            handle.writelines(lines)
        os.chmod(tmp, 0o755)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"pages": pages, "crops": len(lines), "out_dir": os.path.abspath(out_dir),
            "seconds": time.time() - started}


def main(argv=None):
    args = parse_args(argv)
    return run_cli(lambda: _run(args))


def _run(args):
    info = make_crops(args.det, args.pages, args.out, args.limit, args.max_crops, args.min_height, args.backend,
                      args.force, show_progress=not args.quiet)
    print(f"fidelity crops: {info['crops']} text lines from {info['pages']} pages into {info['out_dir']} "
          f"(crops.txt lists each crop's page)  {info['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
