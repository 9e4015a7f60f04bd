"""Synthetic demo OCR data: deterministic, valid PaddleOCR labels, disjoint splits, atomic writes."""
import hashlib
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from compress.data import demo
from compress.data.demo import DemoCounts, find_fonts, generate_demo_data
from compress.data.labels import load_charset, read_det_labels, read_rec_labels
from compress.errors import CompressError, ConfigError, InputError
from compress.ppocr_compat import rapidocr_root

TINY = DemoCounts(det_train=2, det_eval=2, det_calib=1, rec_train=6, rec_eval=4, rec_calib=2)
SPLITS = ("train", "eval", "calib")
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The tiny data set generated twice, into two different folders."""
    root = tmp_path_factory.mktemp("demo")
    first = generate_demo_data(root / "first", seed=7, counts=TINY, show_progress=False)
    second = generate_demo_data(root / "second", seed=7, counts=TINY, show_progress=False)
    return Path(first["out_dir"]), Path(second["out_dir"]), first


def relative_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_same_seed_gives_identical_labels_and_images(tiny_pair):
    first, second, _ = tiny_pair
    files = relative_files(first)
    assert files == relative_files(second)
    assert len([f for f in files if f.endswith(".jpg")]) == sum(vars(TINY).values())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_different_seed_gives_different_data(tiny_pair, tmp_path):
    first, _, _ = tiny_pair
    other = Path(generate_demo_data(tmp_path / "other", seed=8, counts=TINY, show_progress=False)["out_dir"])
    assert (first / "rec/train.txt").read_text() != (other / "rec/train.txt").read_text()


def test_summary_and_manifest_describe_the_data(tiny_pair):
    first, _, info = tiny_pair
    assert info["generated"] is True and info["seed"] == 7 and info["counts"] == vars(TINY)
    assert set(info["label_files"]) == {f"{t}_{s}" for t in ("det", "rec") for s in SPLITS}
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["fonts"] == info["fonts"] and all("/" not in name for name in manifest["fonts"])
    for relative, digest in manifest["label_files_sha256"].items():
        assert hashlib.sha256((first / relative).read_bytes()).hexdigest() == digest
    assert "PaddleOCR" in (first / "README.txt").read_text()


def test_labels_parse_and_use_only_dictionary_characters(tiny_pair):
    first, _, _ = tiny_pair
    charset = load_charset(Path(rapidocr_root()) / "ch_ppocr_rec" / "ppocr_keys_v1.txt", use_space_char=True)
    for split in SPLITS:
        rec = read_rec_labels(first / f"rec/{split}.txt", first / "rec", max_len=demo.MAX_TEXT_LEN, charset=charset)
        assert len(rec) == TINY.of("rec", split)
        det = read_det_labels(first / f"det/{split}.txt", first / "det")
        assert len(det) == TINY.of("det", split)
        for sample in det:
            texts = [box.transcription for box in sample.boxes if not box.ignore]
            assert len(texts) >= 4
            assert all(text and set(text) <= charset and len(text) <= demo.MAX_TEXT_LEN for text in texts)


def test_det_points_are_inside_their_images(tiny_pair):
    first, _, _ = tiny_pair
    for split in SPLITS:
        for sample in read_det_labels(first / f"det/{split}.txt", first / "det"):
            width, height = Image.open(sample.image_path).size
            points = np.array([p for box in sample.boxes for p in box.points])
            assert points.min() >= 0
            assert points[:, 0].max() <= width - 1 and points[:, 1].max() <= height - 1


def test_det_boxes_cover_dark_ink(tiny_pair):
    """Each non-ignored box must sit on text: its inside is darker than the page on average."""
    first, _, _ = tiny_pair
    for sample in read_det_labels(first / "det/train.txt", first / "det"):
        gray = np.asarray(Image.open(sample.image_path).convert("L"), dtype=np.float32)
        for box in sample.boxes:
            if box.ignore:
                continue
            mask = np.zeros(gray.shape, np.uint8)
            cv2.fillPoly(mask, [np.rint(np.array(box.points)).astype(np.int32)], 1)
            inside = gray[mask == 1]
            assert inside.min() < np.median(gray) - 15, box.transcription


def test_rec_lines_are_32_to_64_px_high(tiny_pair):
    first, _, _ = tiny_pair
    for sample in read_rec_labels(first / "rec/train.txt", first / "rec"):
        width, height = Image.open(sample.image_path).size
        assert 32 <= height <= 64 + 1 and width > height // 2


def test_splits_share_no_image(tiny_pair):
    first, _, _ = tiny_pair
    for task in ("det", "rec"):
        digests = {split: {hashlib.sha256(p.read_bytes()).hexdigest() for p in (first / task / split).glob("*.jpg")}
                   for split in SPLITS}
        assert sum(len(d) for d in digests.values()) == sum(TINY.of(task, s) for s in SPLITS)
        assert not (digests["train"] & digests["eval"] or digests["train"] & digests["calib"]
                    or digests["eval"] & digests["calib"])


def test_existing_identical_data_is_reused_untouched(tiny_pair):
    first, _, _ = tiny_pair
    mtimes = {name: (first / name).stat().st_mtime_ns for name in relative_files(first)}
    info = generate_demo_data(first, seed=7, counts=TINY, show_progress=False)
    assert info["generated"] is False
    assert mtimes == {name: (first / name).stat().st_mtime_ns for name in relative_files(first)}


def test_other_data_is_refused_without_force_and_replaced_with_it(tmp_path):
    small = DemoCounts(det_train=1, det_eval=0, det_calib=0, rec_train=2, rec_eval=0, rec_calib=0)
    generate_demo_data(tmp_path / "d", seed=1, counts=small, show_progress=False)
    with pytest.raises(InputError, match="--force"):
        generate_demo_data(tmp_path / "d", seed=2, counts=small, show_progress=False)
    info = generate_demo_data(tmp_path / "d", seed=2, counts=small, show_progress=False, force=True)
    assert info["generated"] and json.loads((tmp_path / "d/manifest.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp or backup folders left


def test_edited_label_file_is_detected(tmp_path):
    small = DemoCounts(det_train=0, det_eval=0, det_calib=0, rec_train=2, rec_eval=0, rec_calib=0)
    generate_demo_data(tmp_path / "d", counts=small, show_progress=False)
    with open(tmp_path / "d/rec/train.txt", "a", encoding="utf-8") as handle:
        handle.write("train/extra.jpg\tx\n")
    with pytest.raises(InputError, match=r"rec/train.txt.*sha256"):
        generate_demo_data(tmp_path / "d", counts=small, show_progress=False)


def test_failed_generation_leaves_old_data_and_no_half_made_folder(tmp_path, monkeypatch):
    small = DemoCounts(det_train=0, det_eval=0, det_calib=0, rec_train=3, rec_eval=0, rec_calib=0)
    generate_demo_data(tmp_path / "d", seed=1, counts=small, show_progress=False)
    before = {name: (tmp_path / "d" / name).read_bytes() for name in relative_files(tmp_path / "d")}
    real_write_sample = demo._write_sample
    calls = []

    def write_then_crash(*args):
        calls.append(1)
        if len(calls) % 2 == 0:  # the second image of each run
            raise KeyboardInterrupt("simulated kill")
        return real_write_sample(*args)

    monkeypatch.setattr(demo, "_write_sample", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        generate_demo_data(tmp_path / "d", seed=2, counts=small, show_progress=False, force=True)
    with pytest.raises(KeyboardInterrupt):
        generate_demo_data(tmp_path / "new", seed=2, counts=small, show_progress=False)
    assert before == {name: (tmp_path / "d" / name).read_bytes() for name in relative_files(tmp_path / "d")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_bad_counts_and_seed_are_config_errors():
    with pytest.raises(ConfigError, match="rec_eval"):
        DemoCounts(rec_eval=-1)
    with pytest.raises(ConfigError, match="seed"):
        generate_demo_data("unused", seed=-3)


def test_no_font_found_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="fonts-dejavu"):
        find_fonts([tmp_path])


def test_latin_font_is_not_taken_for_cjk():
    fonts = find_fonts()
    assert len(fonts.latin) >= 3
    assert demo._usable_font(fonts.latin[0].path, 0, demo.CJK_CHARS) is None
    assert demo._usable_font(fonts.latin[0].path, 0, demo.LATIN_CHARS) is not None


def load_cli():
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO_ROOT / "tools" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_prints_one_summary_line_and_turns_errors_into_exit_2(tmp_path, capsys):
    cli = load_cli()
    counts = ["--det-train", "1", "--det-eval", "0", "--det-calib", "0",
              "--rec-train", "2", "--rec-eval", "1", "--rec-calib", "0"]
    assert cli.main(["--out", str(tmp_path / "d"), "--quiet", *counts]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "wrote" in out and "seed=0" in out

    assert cli.main(["--out", str(tmp_path / "d"), "--quiet", "--seed", "5", *counts]) == CompressError.exit_code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err


def test_every_character_the_generator_can_write_is_in_the_ppocr_dictionary():
    """Checked on the character pools, so the Chinese texts are covered even without a CJK font here."""
    charset = load_charset(Path(rapidocr_root()) / "ch_ppocr_rec" / "ppocr_keys_v1.txt", use_space_char=True)
    assert set(demo.LATIN_CHARS) <= charset
    assert set(demo.CJK_CHARS) <= charset


def test_data_from_an_older_generator_version_is_regenerated(tmp_path):
    small = DemoCounts(det_train=0, det_eval=0, det_calib=0, rec_train=2, rec_eval=0, rec_calib=0)
    generate_demo_data(tmp_path / "d", counts=small, show_progress=False)
    manifest_path = tmp_path / "d/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["generator_version"] = demo.GENERATOR_VERSION - 1
    manifest_path.write_text(json.dumps(manifest))

    info = generate_demo_data(tmp_path / "d", counts=small, show_progress=False)

    assert info["generated"] is True
    assert json.loads(manifest_path.read_text())["generator_version"] == demo.GENERATOR_VERSION
