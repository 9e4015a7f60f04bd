"""Synthetic demo OCR data: deterministic, valid PaddleOCR labels, both scripts, dictionary coverage, atomic writes."""
import hashlib
import importlib.util
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from compress.data import demo, fonts as demo_fonts
from compress.data.demo import DemoCounts, generate_demo_data
from compress.data.fonts import PackagedFace, load_font_set
from compress.data.labels import load_charset, read_det_labels, read_rec_labels
from compress.errors import CompressError, ConfigError, InputError
from compress.fidelity import script_of
from compress.ppocr_compat import rapidocr_root

SPLITS = demo.SPLITS
NO_IMAGES = {field: 0 for field in DemoCounts.__dataclass_fields__}
TINY = DemoCounts(det_train=2, det_eval=2, det_calib=1, rec_train=30, rec_eval=30, rec_calib=2,
                  det_fidelity=1, det_unlabeled=1, rec_fidelity=12, rec_unlabeled=12)
REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DICTIONARY = Path(rapidocr_root()) / "ch_ppocr_rec" / "ppocr_keys_v1.txt"
INSTALL_HINT = "pip install -c constraints.txt -e ."


def only(**counts) -> DemoCounts:
    """Counts with every split empty except the ones given."""
    return DemoCounts(**{**NO_IMAGES, **counts})


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """The tiny data set generated twice, into two different folders."""
    root = tmp_path_factory.mktemp("demo")
    first = generate_demo_data(root / "first", seed=7, counts=TINY, show_progress=False)
    second = generate_demo_data(root / "second", seed=7, counts=TINY, show_progress=False)
    return Path(first["out_dir"]), Path(second["out_dir"]), first


@pytest.fixture(scope="module")
def small_dictionary(tmp_path_factory):
    """A 300-character dictionary drawn from the shipped one, with its two characters no packaged font renders."""
    shipped = SHIPPED_DICTIONARY.read_text(encoding="utf-8").splitlines()
    chars = random.Random(0).sample([c for c in shipped if c not in "\u3000\U000231c9"], 298) + ["\u3000", "\U000231c9"]
    path = tmp_path_factory.mktemp("dict") / "small_keys.txt"
    path.write_text("".join(c + "\n" for c in chars), encoding="utf-8")
    return path, chars


@pytest.fixture(scope="module")
def coverage_data(tmp_path_factory, small_dictionary):
    """Only the two coverage splits, for the small dictionary."""
    path, _ = small_dictionary
    counts = only(rec_fidelity=220, rec_unlabeled=220, det_fidelity=1, det_unlabeled=1)
    out = tmp_path_factory.mktemp("coverage") / "d"
    return out, generate_demo_data(out, seed=3, counts=counts, show_progress=False, dictionary=path)


def relative_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def rec_texts(root: Path, split: str) -> list[str]:
    return [line.split("\t", 1)[1] for line in (root / f"rec/{split}.txt").read_text(encoding="utf-8").splitlines()]


def det_texts(root: Path, split: str) -> list[str]:
    return [box.transcription for sample in read_det_labels(root / f"det/{split}.txt", root / "det")
            for box in sample.boxes if not box.ignore]


def test_same_seed_gives_identical_labels_and_images(tiny_pair):
    first, second, _ = tiny_pair
    files = relative_files(first)
    assert files == relative_files(second)
    assert len([f for f in files if f.endswith(".jpg")]) == sum(vars(TINY).values())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_different_seed_gives_different_data(tiny_pair, tmp_path):
    first, _, _ = tiny_pair
    other = generate_demo_data(tmp_path / "other", seed=8, counts=only(rec_train=30), show_progress=False)
    other = Path(other["out_dir"])
    assert (first / "rec/train.txt").read_text() != (other / "rec/train.txt").read_text()


def test_summary_and_manifest_describe_the_data(tiny_pair):
    first, _, info = tiny_pair
    assert info["generated"] is True and info["seed"] == 7 and info["counts"] == vars(TINY)
    assert set(info["label_files"]) == {f"{t}_{s}" for t in ("det", "rec") for s in SPLITS}
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["fonts"] == info["fonts"] and all("/" not in name for name in manifest["fonts"])
    assert set(manifest["font_packages"]) == {"matplotlib", "fontpkg-noto-sans", "fontpkg-noto-serif",
                                              "pylopdf-fonts-zh-cn", "paperang-p2-fonts-cjk"}
    assert manifest["dictionary"]["sha256"] == hashlib.sha256(SHIPPED_DICTIONARY.read_bytes()).hexdigest()
    assert set(manifest["label_files_sha256"]) == {f"{t}/{s}.txt" for t in ("det", "rec") for s in SPLITS}
    for relative, digest in manifest["label_files_sha256"].items():
        assert hashlib.sha256((first / relative).read_bytes()).hexdigest() == digest
    assert set(info["coverage"]) == {"rec/fidelity", "rec/unlabeled"}
    assert "PaddleOCR" in (first / "README.txt").read_text()


def test_labels_parse_and_use_only_dictionary_characters(tiny_pair):
    first, _, _ = tiny_pair
    charset = load_charset(SHIPPED_DICTIONARY, use_space_char=True)
    for split in SPLITS:
        rec = read_rec_labels(first / f"rec/{split}.txt", first / "rec", max_len=demo.MAX_TEXT_LEN, charset=charset)
        assert len(rec) == TINY.of("rec", split)
        det = read_det_labels(first / f"det/{split}.txt", first / "det")
        assert len(det) == TINY.of("det", split)
        for sample in det:
            texts = [box.transcription for box in sample.boxes if not box.ignore]
            assert len(texts) >= 4
            assert all(text and set(text) <= charset and len(text) <= demo.MAX_TEXT_LEN for text in texts)


def test_train_and_eval_hold_both_scripts(tiny_pair):
    first, _, _ = tiny_pair
    for split in ("train", "eval"):
        for texts in (rec_texts(first, split), det_texts(first, split)):
            scripts = Counter(script_of(text) for text in texts)
            assert scripts["latin"] >= 2 and scripts["cjk"] >= 2 and scripts["mixed"] >= 1, (split, scripts)


def test_line_kinds_follow_the_script_mix():
    source = demo._TextSource(load_font_set(demo.VOCABULARY_CHARS))
    texts = [source.renderable_text(random.Random(seed)) for seed in range(4000)]
    shares = Counter(script_of(text) for text in texts)
    for script, share in demo.SCRIPT_MIX:
        assert shares[script] / len(texts) == pytest.approx(share, abs=0.03), script


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
    for split in ("train", "fidelity"):
        for sample in read_det_labels(first / f"det/{split}.txt", first / "det"):
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
    for split in ("train", "fidelity"):
        for sample in read_rec_labels(first / f"rec/{split}.txt", first / "rec"):
            width, height = Image.open(sample.image_path).size
            assert 32 <= height <= 64 + 1 and width > height // 2


def test_splits_share_no_image(tiny_pair):
    first, _, _ = tiny_pair
    for task in ("det", "rec"):
        digests = {split: {hashlib.sha256(p.read_bytes()).hexdigest() for p in (first / task / split).glob("*.jpg")}
                   for split in SPLITS}
        assert sum(len(d) for d in digests.values()) == sum(TINY.of(task, s) for s in SPLITS)
        for index, split in enumerate(SPLITS):
            for other in SPLITS[index + 1:]:
                assert not digests[split] & digests[other], (task, split, other)


def test_coverage_splits_hold_every_renderable_dictionary_character_three_times(coverage_data, small_dictionary):
    out, info = coverage_data
    _, chars = small_dictionary
    renderable = set(chars) - {"\u3000", "\U000231c9"}  # ideographic space has no ink; no packaged font has U+231C9
    for split in ("fidelity", "unlabeled"):
        texts = rec_texts(out, split)
        seen = Counter(char for text in texts for char in text)
        assert {char for char in renderable if seen[char] < demo.COVERAGE_REPEATS} == set()
        assert len(texts) == 220 and max(map(len, texts)) <= demo.MAX_TEXT_LEN
        scripts = Counter(script_of(text) for text in texts)
        assert scripts["latin"] >= 10 and scripts["cjk"] + scripts["mixed"] >= 10, scripts
        coverage = info["coverage"][f"rec/{split}"]
        assert (coverage.dictionary_chars, coverage.renderable_chars, coverage.covered_chars) == (300, 298, 298)
        assert coverage.describe(split) == (f"{split}: 298 of 300 dictionary chars renderable, "
                                            "each >= 3 times, 220 lines")
        assert len(det_texts(out, split)) >= 4


def test_fidelity_and_unlabeled_share_no_image_or_line(coverage_data):
    out, _ = coverage_data
    for task in ("det", "rec"):
        fidelity, unlabeled = ({hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / task / split).glob("*.jpg")}
                               for split in ("fidelity", "unlabeled"))
        assert len(fidelity) == len(list((out / task / "fidelity").glob("*.jpg"))) and not fidelity & unlabeled


def test_too_few_lines_report_partial_coverage(small_dictionary):
    _, chars = small_dictionary
    fonts = load_font_set(set(chars) | set(demo.VOCABULARY_CHARS))
    texts, coverage = demo.coverage_texts(random.Random(0), 40, fonts, "".join(chars))
    assert len(texts) == 40 and coverage.covered_chars < coverage.renderable_chars == 298
    assert coverage.lines_needed > 40 and "lines needed for all" in coverage.describe("fidelity")


def test_default_counts_cover_the_shipped_dictionary():
    """The default data set's rec coverage splits (same plan seeds) hold 6,621 of the 6,623 characters 3 times."""
    dictionary = "".join(sorted(load_charset(SHIPPED_DICTIONARY, use_space_char=False)))
    fonts = load_font_set(set(dictionary) | set(demo.VOCABULARY_CHARS))
    assert fonts.renderable(dictionary) == sorted(set(dictionary) - {"\u3000", "\U000231c9"})
    for split in demo.COVERAGE_SPLITS:
        rng = random.Random(demo._plan_seed(0, "rec", split))
        _, coverage = demo.coverage_texts(rng, DemoCounts().of("rec", split), fonts, dictionary)
        assert (coverage.renderable_chars, coverage.covered_chars) == (6621, 6621), split


def test_font_set_has_several_latin_designs_and_three_chinese_ones():
    fonts = load_font_set("Ag合")
    latin = {face.family for face in fonts.faces_for("Ag")} - {face.family for face in fonts.faces_for("合")}
    assert {"DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono", "STIX General", "Noto Sans", "Noto Serif"} <= latin
    assert {face.family for face in fonts.faces_for("合")} == {"Noto Sans SC", "Noto Serif SC", "WenQuanYi Micro Hei"}
    assert {"Noto Sans Bold", "Noto Serif Italic", "DejaVu Sans Bold Oblique"} <= set(fonts.names)
    assert all(Path(face.path).is_file() and "site-packages" in str(face.path) for face in fonts.faces)


def test_each_text_is_drawn_in_a_face_that_renders_it():
    fonts = load_font_set(demo.VOCABULARY_CHARS + "❤ɔ㐂")
    source = demo._TextSource(fonts)
    for text in ("❤ ɔ", "㐂", "合计：¥128.50", "Total: $3.50"):
        chars = "".join(sorted(set(text) - {" "}))
        chosen = {source.face(text, random.Random(seed)) for seed in range(40)}
        assert all(demo_fonts._rendered_chars(face.path, face.index, chars) == set(chars) for face in chosen), text
    families = {source.face("㐂", random.Random(seed)).family for seed in range(40)}
    assert families == {"Noto Sans SC", "Noto Serif SC"}  # WenQuanYi Micro Hei lacks U+3402


def test_missing_font_package_is_a_one_line_input_error(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_fonts, "PACKAGED_FACES", demo_fonts.PACKAGED_FACES + (
        PackagedFace("no-such-font-package", "no_such_font_package/X.ttf", "X", "Regular"),))
    with pytest.raises(InputError) as error:
        generate_demo_data(tmp_path / "d", counts=only(rec_train=1), show_progress=False)
    message = str(error.value)
    assert "no-such-font-package" in message and INSTALL_HINT in message and "\n" not in message
    assert not (tmp_path / "d").exists()


def test_missing_font_file_is_a_one_line_input_error(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_fonts, "PACKAGED_FACES", demo_fonts.PACKAGED_FACES + (
        PackagedFace("matplotlib", "matplotlib/mpl-data/fonts/ttf/NoSuchFont.ttf", "X", "Regular"),))
    with pytest.raises(InputError, match=r"NoSuchFont\.ttf: font file missing from package matplotlib") as error:
        generate_demo_data(tmp_path / "d", counts=only(rec_train=1), show_progress=False)
    assert INSTALL_HINT in str(error.value) and "\n" not in str(error.value)


def test_extra_font_dirs_add_faces_and_a_missing_one_is_an_input_error(tmp_path):
    shutil.copy(load_font_set("A").faces[0].path, tmp_path / "extra.ttf")
    (tmp_path / "notes.ttf").write_text("not a font")
    packaged = load_font_set("A")
    extended = load_font_set("A", [tmp_path])
    assert len(extended.faces) == len(packaged.faces) + 1 and extended.faces[-1].path == tmp_path / "extra.ttf"
    with pytest.raises(InputError, match="font folder not found"):
        load_font_set("A", [tmp_path / "missing"])


def test_existing_identical_data_is_reused_untouched(tiny_pair):
    first, _, _ = tiny_pair
    mtimes = {name: (first / name).stat().st_mtime_ns for name in relative_files(first)}
    info = generate_demo_data(first, seed=7, counts=TINY, show_progress=False)
    assert info["generated"] is False and info["coverage"]["rec/fidelity"].lines == TINY.rec_fidelity
    assert mtimes == {name: (first / name).stat().st_mtime_ns for name in relative_files(first)}


def test_other_dictionary_is_other_data(coverage_data, small_dictionary):
    out, info = coverage_data
    path, _ = small_dictionary
    counts = DemoCounts(**info["counts"])
    assert generate_demo_data(out, seed=3, counts=counts, show_progress=False, dictionary=path)["generated"] is False
    with pytest.raises(InputError, match="dictionary"):
        generate_demo_data(out, seed=3, counts=counts, show_progress=False)


def test_other_data_is_refused_without_force_and_replaced_with_it(tmp_path):
    small = only(det_train=1, rec_train=2)
    generate_demo_data(tmp_path / "d", seed=1, counts=small, show_progress=False)
    with pytest.raises(InputError, match="--force"):
        generate_demo_data(tmp_path / "d", seed=2, counts=small, show_progress=False)
    info = generate_demo_data(tmp_path / "d", seed=2, counts=small, show_progress=False, force=True)
    assert info["generated"] and json.loads((tmp_path / "d/manifest.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp or backup folders left


def test_edited_label_file_is_detected(tmp_path):
    small = only(rec_train=2)
    generate_demo_data(tmp_path / "d", counts=small, show_progress=False)
    with open(tmp_path / "d/rec/train.txt", "a", encoding="utf-8") as handle:
        handle.write("train/extra.jpg\tx\n")
    with pytest.raises(InputError, match=r"rec/train.txt.*sha256"):
        generate_demo_data(tmp_path / "d", counts=small, show_progress=False)


def test_failed_generation_leaves_old_data_and_no_half_made_folder(tmp_path, monkeypatch):
    small = only(rec_train=3)
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
    with pytest.raises(ConfigError, match="rec_fidelity"):
        DemoCounts(rec_fidelity=1.5)
    with pytest.raises(ConfigError, match="seed"):
        generate_demo_data("unused", seed=-3)


def load_cli():
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO_ROOT / "tools" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI_COUNTS = [f"--{task}-{split}=0" for task in ("det", "rec") for split in SPLITS] + [
    "--det-train=1", "--rec-train=2", "--rec-eval=1"]


def test_cli_prints_one_summary_line_and_turns_errors_into_exit_2(tmp_path, capsys):
    cli = load_cli()
    assert cli.main(["--out", str(tmp_path / "d"), "--quiet", *CLI_COUNTS]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "wrote" in out and "seed=0" in out and "rec lines=2/1/0/0/0" in out
    assert out.rstrip().endswith("s") and "fonts=23" in out

    exit_code = cli.main(["--out", str(tmp_path / "d"), "--quiet", "--seed", "5", *CLI_COUNTS])
    assert exit_code == CompressError.exit_code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err


def test_cli_reports_coverage_and_takes_a_dictionary(tmp_path, capsys, small_dictionary):
    path, _ = small_dictionary
    cli = load_cli()
    args = ["--out", str(tmp_path / "d"), "--quiet", *CLI_COUNTS, "--rec-fidelity=220", "--dictionary", str(path)]
    assert cli.main(args) == 0
    assert "dictionary chars >= 3x (fidelity 298/298)" in capsys.readouterr().out


def test_cli_missing_font_package_exits_2_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo_fonts, "PACKAGED_FACES", (
        PackagedFace("pylopdf-fonts-zh-cn-missing", "x/NotoSansSC-Regular.otf", "Noto Sans SC", "Regular"),))
    assert load_cli().main(["--out", str(tmp_path / "d"), "--quiet", *CLI_COUNTS]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert "font package pylopdf-fonts-zh-cn-missing is not installed" in captured.err and INSTALL_HINT in captured.err


def test_every_character_the_generator_can_write_is_in_the_ppocr_dictionary():
    """Checked on many sampled lines of every kind, and on the fixed character pools."""
    charset = load_charset(SHIPPED_DICTIONARY, use_space_char=True)
    assert set(demo.VOCABULARY_CHARS) <= charset
    written = set()
    for seed in range(3000):
        rng = random.Random(seed)
        for kind in ("cjk", "latin", "mixed"):
            written |= set(demo._natural_text(rng, kind))
        written |= set("".join(demo._carrier_text(rng, "甲乙")) + "".join(demo._symbol_carrier_text(rng, "§")))
    assert written - set("甲乙§") <= set(demo.VOCABULARY_CHARS)


def test_data_from_an_older_generator_version_is_regenerated(tmp_path):
    small = only(rec_train=2)
    generate_demo_data(tmp_path / "d", counts=small, show_progress=False)
    manifest_path = tmp_path / "d/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["generator_version"] = demo.GENERATOR_VERSION - 1
    for split in demo.COVERAGE_SPLITS:  # version 2 had no coverage splits
        del manifest["counts"][f"det_{split}"], manifest["counts"][f"rec_{split}"]
    manifest_path.write_text(json.dumps(manifest))

    info = generate_demo_data(tmp_path / "d", counts=small, show_progress=False)

    assert info["generated"] is True
    assert json.loads(manifest_path.read_text())["generator_version"] == demo.GENERATOR_VERSION
