"""Strict readers for PaddleOCR label files.

Two formats, one sample per line, image path and label separated by a tab (PaddleOCR's
``SimpleDataSet`` convention; image paths are relative to ``data_dir``):

* detection: ``img_path\\t[{"transcription": "...", "points": [[x, y], ...]}, ...]``;
  a transcription of ``"###"`` (or ``"*"``) marks a box to ignore, as PaddleOCR's ``DetLabelEncode`` does.
* recognition: ``img_path\\tlabel``.

Every problem raises :class:`~compress.errors.InputError` with one line
``"<label_file>:<line_no>: <what is wrong>; <how to fix>"`` so the user can jump to the line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from compress.errors import InputError

IGNORE_TRANSCRIPTIONS = frozenset({"###", "*"})
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class TextBox:
    """One annotated text region of a detection sample.

    Attributes:
        points: Polygon corners ``((x, y), ...)``, at least 4, in image pixels.
        transcription: The text inside the box (``"###"`` for an unreadable box).
        ignore: True when PaddleOCR treats the box as difficult (excluded from the metric).
    """

    points: tuple[tuple[float, float], ...]
    transcription: str
    ignore: bool


@dataclass(frozen=True)
class DetSample:
    """One line of a detection label file.

    Attributes:
        image_path: Absolute path of the image.
        boxes: The annotated text regions.
        label: The label exactly as written in the file (a JSON list), for ``ppocr`` transforms.
    """

    image_path: Path
    boxes: tuple[TextBox, ...]
    label: str


@dataclass(frozen=True)
class RecSample:
    """One line of a recognition label file.

    Attributes:
        image_path: Absolute path of the cropped text-line image.
        label: The text shown in the image.
    """

    image_path: Path
    label: str


def load_charset(dict_path: str | Path, use_space_char: bool = True) -> frozenset[str]:
    """Read a PaddleOCR character dictionary (one character per line).

    Args:
        dict_path: Path of the dictionary, e.g. ``ppocr_keys_v1.txt``.
        use_space_char: Add the space character, as PP-OCR's ``use_space_char: True`` does.

    Returns:
        The set of characters the recognition model can output.

    Raises:
        InputError: The file is missing or not UTF-8.
    """
    path = Path(dict_path)
    lines = list(_read_lines(path, what="character dictionary"))
    chars = {text for _, text in lines if text}
    if use_space_char:
        chars.add(" ")
    return frozenset(chars)


def read_det_labels(label_file: str | Path, data_dir: str | Path) -> list[DetSample]:
    """Read a PaddleOCR detection label file and check every line.

    Args:
        label_file: The ``.txt`` label file.
        data_dir: Folder the image paths in the file are relative to.

    Returns:
        One :class:`DetSample` per non-blank line, in file order.

    Raises:
        InputError: The file is missing, or a line is malformed or names a missing image.
    """
    label_path = Path(label_file)
    samples = []
    for line_no, line in _read_lines(label_path, what="detection label file"):
        if not line.strip():
            continue
        where = f"{label_path}:{line_no}"
        image_path, label = _split_line(line, where, example='img.jpg\\t[{"transcription": "...", "points": [...]}]')
        boxes = _parse_det_label(label, where)
        samples.append(DetSample(_existing_image(image_path, data_dir, where), boxes, label))
    return samples


def read_rec_labels(
    label_file: str | Path,
    data_dir: str | Path,
    max_len: int | None = None,
    charset: Iterable[str] | None = None,
) -> list[RecSample]:
    """Read a PaddleOCR recognition label file and check every line.

    Args:
        label_file: The ``.txt`` label file.
        data_dir: Folder the image paths in the file are relative to.
        max_len: Longest allowed label (PP-OCR's ``max_text_length``); None for no limit.
        charset: Characters the model can output (see :func:`load_charset`); None to skip the check.

    Returns:
        One :class:`RecSample` per non-blank line, in file order.

    Raises:
        InputError: The file is missing, or a line is malformed, names a missing image, has an
            empty or too long label, or uses characters outside ``charset``.
    """
    label_path = Path(label_file)
    allowed = None if charset is None else frozenset(charset)
    samples = []
    for line_no, line in _read_lines(label_path, what="recognition label file"):
        if not line.strip():
            continue
        where = f"{label_path}:{line_no}"
        image_path, label = _split_line(line, where, example="img.jpg\\tHello")
        _check_rec_label(label, where, max_len, allowed)
        samples.append(RecSample(_existing_image(image_path, data_dir, where), label))
    return samples


def list_images(folder: str | Path) -> list[str]:
    """Image files under ``folder`` (recursively), sorted, relative to it (``/``-separated)."""
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def image_paths(folder: str | Path, label_file: str | Path | None = None, limit: int | None = None,
                where: str = "images") -> list[str]:
    """Paths of an unlabelled image set: the images an image list names (:func:`read_image_list`) or every image
    under ``folder``; the first ``limit`` of them.

    Raises:
        InputError: ``folder`` is not a folder (without a list), a listed image is missing, or there is no image;
            the message starts with ``where``.
    """
    if label_file:
        paths = [str(p) for p in read_image_list(label_file, folder)]
    else:
        if not os.path.isdir(folder):
            raise InputError(f"{where}: {folder} is not a folder; point data_dir at a folder of images")
        paths = [os.path.join(folder, name) for name in list_images(folder)]
    paths = paths[:limit] if limit else paths
    if not paths:
        raise InputError(f"{where}: no images under {folder}; add .jpg/.png files or fix data_dir / label_file")
    return paths


def read_image_list(label_file: str | Path, data_dir: str | Path) -> list[Path]:
    """Image paths of a list file (``img_path`` or ``img_path<TAB>anything`` per line; what follows the tab is
    ignored), so a det or rec label file serves as an unlabelled image list too. Blank lines are skipped.

    Raises:
        InputError: a listed image does not exist (``file:line``).
    """
    images = []
    for line_no, line in _read_lines(Path(label_file), "image list"):
        image_path = line.split("\t", 1)[0].strip()
        if image_path:
            images.append(_existing_image(image_path, data_dir, f"{label_file}:{line_no}"))
    return images


def _read_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """Yield ``(line_no, line)`` with line endings removed; line numbers start at 1."""
    if not path.is_file():
        raise InputError(f"{path}: {what} not found; check the path (relative paths are taken from the current directory)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_no = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(f"{path}:{line_no}: not valid UTF-8 ({exc.reason}); save the file as UTF-8") from None
    for line_no, line in enumerate(text.split("\n"), start=1):
        yield line_no, line.rstrip("\r")


def _split_line(line: str, where: str, example: str) -> tuple[str, str]:
    if "\t" not in line:
        raise InputError(f"{where}: no tab between image path and label; separate them with one tab, e.g. {example}")
    image_path, label = line.split("\t", 1)
    if not image_path.strip():
        raise InputError(f"{where}: empty image path before the tab; put the image path first, e.g. {example}")
    return image_path, label


def _existing_image(image_path: str, data_dir: str | Path, where: str) -> Path:
    resolved = (Path(data_dir) / image_path).resolve()
    if not resolved.is_file():
        raise InputError(f"{where}: image {resolved} not found; fix the path (relative to data_dir {data_dir}) or add the image")
    return resolved


def _parse_det_label(label: str, where: str) -> tuple[TextBox, ...]:
    if not label.strip():
        raise InputError(f"{where}: empty label after the tab; write a JSON list of boxes, e.g. "
                         '[{"transcription": "abc", "points": [[0,0],[9,0],[9,9],[0,9]]}]')
    try:
        entries = json.loads(label)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: label is not valid JSON ({exc.msg} at column {exc.colno}); "
                         "fix the JSON list of boxes after the tab") from None
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{where}: label must be a non-empty JSON list of boxes; "
                         'write [{"transcription": ..., "points": ...}, ...] or drop the line')
    return tuple(_parse_det_box(entry, where, index) for index, entry in enumerate(entries))


def _parse_det_box(entry: object, where: str, index: int) -> TextBox:
    box_where = f"{where}: box {index}"
    if not isinstance(entry, dict) or "points" not in entry or "transcription" not in entry:
        raise InputError(f'{box_where} is not an object with "transcription" and "points"; add both keys')
    transcription = entry["transcription"]
    if not isinstance(transcription, str):
        raise InputError(f'{box_where}: "transcription" must be a string; quote it (use "###" for unreadable text)')
    return TextBox(_parse_points(entry["points"], box_where), transcription, transcription in IGNORE_TRANSCRIPTIONS)


def _parse_points(points: object, box_where: str) -> tuple[tuple[float, float], ...]:
    fix = "write at least 4 [x, y] number pairs, e.g. [[0,0],[9,0],[9,9],[0,9]]"
    if not isinstance(points, list) or len(points) < 4:
        raise InputError(f'{box_where}: "points" is not a list of at least 4 [x, y] pairs; {fix}')
    parsed = []
    for point in points:
        if not (isinstance(point, list) and len(point) == 2 and all(_is_number(value) for value in point)):
            raise InputError(f'{box_where}: "points" entry {json.dumps(point)} is not an [x, y] number pair; {fix}')
        parsed.append((float(point[0]), float(point[1])))
    return tuple(parsed)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_rec_label(label: str, where: str, max_len: int | None, allowed: frozenset[str] | None) -> None:
    if not label:
        raise InputError(f"{where}: empty label after the tab; write the text shown in the image or drop the line")
    if max_len is not None and len(label) > max_len:
        raise InputError(f"{where}: label has {len(label)} characters, more than max_len={max_len}; "
                         "shorten the label, split the image, or raise max_text_length")
    if allowed is not None:
        unknown = sorted(set(label) - allowed)
        if unknown:
            shown = " ".join(repr(char) for char in unknown)
            raise InputError(f"{where}: characters not in the dictionary: {shown}; "
                             "remove or replace them, or use a dictionary that has them")
