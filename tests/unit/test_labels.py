"""Strict PaddleOCR label-file readers: good files parse, every kind of bad line names file:line."""
import json
from pathlib import Path

import pytest

from compress.data.labels import load_charset, read_det_labels, read_rec_labels
from compress.errors import InputError

BOX = {"transcription": "Total", "points": [[1, 2], [30, 2], [30, 12], [1, 12]]}


@pytest.fixture
def data_dir(tmp_path):
    """A data folder holding two (fake) images in a sub folder, as PaddleOCR data sets do."""
    (tmp_path / "imgs").mkdir()
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / "imgs" / name).write_bytes(b"not decoded by the reader")
    return tmp_path


def write_label_file(folder: Path, lines: list[str]) -> Path:
    path = folder / "labels.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def det_line(image: str, boxes) -> str:
    return f"{image}\t{json.dumps(boxes, ensure_ascii=False)}"


def test_det_good_file_parses_boxes_ignore_tags_and_absolute_paths(data_dir):
    ignored = {"transcription": "###", "points": [[0, 0], [5, 0], [5, 5], [0, 5], [2, 7]]}
    label_file = write_label_file(data_dir, [det_line("imgs/a.jpg", [BOX, ignored]), "", det_line("imgs/b.jpg", [BOX])])

    samples = read_det_labels(label_file, data_dir)

    assert [s.image_path for s in samples] == [(data_dir / "imgs" / n).resolve() for n in ("a.jpg", "b.jpg")]
    first = samples[0]
    assert [box.transcription for box in first.boxes] == ["Total", "###"]
    assert [box.ignore for box in first.boxes] == [False, True]
    assert first.boxes[0].points == ((1.0, 2.0), (30.0, 2.0), (30.0, 12.0), (1.0, 12.0))
    assert len(first.boxes[1].points) == 5
    assert json.loads(first.label)[0] == BOX


def test_rec_good_file_keeps_spaces_and_checks_charset(data_dir):
    label_file = write_label_file(data_dir, ["imgs/a.jpg\tTotal: 12", "", "imgs/b.jpg\t合计 ", "   "])

    samples = read_rec_labels(label_file, data_dir, max_len=9, charset=set("Total:12合计 "))  # 9 = len("Total: 12")

    assert [(s.image_path.name, s.label) for s in samples] == [("a.jpg", "Total: 12"), ("b.jpg", "合计 ")]
    assert samples[0].image_path.is_absolute()


def test_crlf_line_endings_are_accepted(data_dir):
    label_file = data_dir / "crlf.txt"
    label_file.write_bytes(b"imgs/a.jpg\tabc\r\nimgs/b.jpg\tdef\r\n")
    assert [s.label for s in read_rec_labels(label_file, data_dir)] == ["abc", "def"]


@pytest.mark.parametrize("reader", [read_det_labels, read_rec_labels])
def test_missing_label_file_is_named(tmp_path, reader):
    missing = tmp_path / "nope.txt"
    with pytest.raises(InputError, match="nope.txt") as info:
        reader(missing, tmp_path)
    assert "\n" not in str(info.value)


DET_ERRORS = {
    "missing tab": ("imgs/a.jpg " + json.dumps([BOX]), "no tab"),
    "bad json": ("imgs/a.jpg\t[{'transcription': 'x'}]", "not valid JSON"),
    "empty label": ("imgs/a.jpg\t", "empty label"),
    "empty list": ("imgs/a.jpg\t[]", "non-empty JSON list"),
    "not a list": (det_line("imgs/a.jpg", BOX), "non-empty JSON list"),
    "box without points": (det_line("imgs/a.jpg", [{"transcription": "x"}]), '"transcription" and "points"'),
    "transcription not text": (det_line("imgs/a.jpg", [{**BOX, "transcription": 5}]), "must be a string"),
    "points not a list": (det_line("imgs/a.jpg", [{**BOX, "points": "1,2,3,4"}]), "at least 4"),
    "three points": (det_line("imgs/a.jpg", [{**BOX, "points": [[0, 0], [1, 0], [1, 1]]}]), "at least 4"),
    "point not a pair": (det_line("imgs/a.jpg", [{**BOX, "points": [[0, 0], [1, 0], [1], [0, 1]]}]), "[1]"),
    "point not numbers": (det_line("imgs/a.jpg", [{**BOX, "points": [[0, 0], [1, 0], ["1", 1], [0, 1]]}]),
                          "number pair"),
    "image missing": (det_line("imgs/missing.jpg", [BOX]), "missing.jpg not found"),
}


@pytest.mark.parametrize("bad_line, expected", DET_ERRORS.values(), ids=DET_ERRORS.keys())
def test_det_errors_name_file_and_line(data_dir, bad_line, expected):
    label_file = write_label_file(data_dir, [det_line("imgs/a.jpg", [BOX]), "", bad_line])

    with pytest.raises(InputError) as info:
        read_det_labels(label_file, data_dir)

    message = str(info.value)
    assert message.startswith(f"{label_file}:3: ")
    assert expected in message
    assert "; " in message and "\n" not in message


REC_ERRORS = {
    "missing tab": ("imgs/a.jpg Total", "no tab"),
    "empty path": ("\tTotal", "empty image path"),
    "empty label": ("imgs/a.jpg\t", "empty label"),
    "image missing": ("imgs/missing.jpg\tTotal", "missing.jpg not found"),
    "too long": ("imgs/a.jpg\tTotal due", "more than max_len=6"),
    "unknown characters": ("imgs/a.jpg\tTo€a¢", "'¢' '€'"),
}


@pytest.mark.parametrize("bad_line, expected", REC_ERRORS.values(), ids=REC_ERRORS.keys())
def test_rec_errors_name_file_and_line(data_dir, bad_line, expected):
    label_file = write_label_file(data_dir, ["imgs/a.jpg\tTotal", bad_line])

    with pytest.raises(InputError) as info:
        read_rec_labels(label_file, data_dir, max_len=6, charset=set("Total due"))

    message = str(info.value)
    assert message.startswith(f"{label_file}:2: ")
    assert expected in message
    assert "\n" not in message


def test_missing_image_message_names_resolved_path(data_dir):
    label_file = write_label_file(data_dir, ["imgs/../imgs/gone.jpg\tx"])
    with pytest.raises(InputError) as info:
        read_rec_labels(label_file, data_dir)
    assert str((data_dir / "imgs" / "gone.jpg").resolve()) in str(info.value)


def test_charset_check_is_skipped_without_charset(data_dir):
    label_file = write_label_file(data_dir, ["imgs/a.jpg\t€¢"])
    assert read_rec_labels(label_file, data_dir)[0].label == "€¢"


def test_non_utf8_file_names_line(data_dir):
    label_file = data_dir / "latin1.txt"
    label_file.write_bytes(b"imgs/a.jpg\tok\nimgs/b.jpg\tcaf\xe9\n")
    with pytest.raises(InputError, match=r"latin1.txt:2: not valid UTF-8"):
        read_rec_labels(label_file, data_dir)


def test_load_charset_reads_one_char_per_line_and_adds_space(tmp_path):
    dict_file = tmp_path / "keys.txt"
    dict_file.write_text("a\nb\n合\n", encoding="utf-8")
    assert load_charset(dict_file) == frozenset({"a", "b", "合", " "})
    assert load_charset(dict_file, use_space_char=False) == frozenset({"a", "b", "合"})
    with pytest.raises(InputError, match="missing.txt"):
        load_charset(tmp_path / "missing.txt")
