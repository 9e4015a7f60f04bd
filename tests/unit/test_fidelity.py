"""Fidelity to the baseline: agreement measures, per-script grouping, the reference file and the gates."""
import json
import types

import pytest

from compress.checkpoint import Manifest
from compress.errors import CheckpointError, InputError
from compress.data.labels import list_images
from compress.fidelity import (REFERENCE_FILE, FidelityReference, baseline_reference, box_iou, det_agreement,
                               fidelity_drops, fidelity_gate, normalized_similarity, rec_agreement, script_of,
                               strip_label_ops)
from compress.report import new_row
from compress.compare.rows import fidelity_failures, gate_summary
from compress.stages.compare import CompareConfig


def test_script_of():
    assert script_of("Total: $12.50") == "latin"
    assert script_of("2024-03-05 14:30") == "latin"
    assert script_of("欢迎光临") == "cjk"
    assert script_of("合计：￥128.50") == "mixed"
    assert script_of("订单INV-2031") == "mixed"
    assert script_of("注意安全！") == "cjk"  # full-width punctuation belongs to neither script
    assert script_of("") == "latin"


def test_rec_agreement_of_the_reference_with_itself_is_exactly_one():
    texts = ["Total: $12.50", "欢迎光临", "合计：￥128.50", "", "INV-2031"]
    result = rec_agreement(texts, list(texts))
    assert result["fidelity"] == 1.0 and result["fidelity_ned"] == 1.0 and result["fidelity_lines"] == 5
    assert result["fidelity_latin"] == result["fidelity_cjk"] == result["fidelity_mixed"] == 1.0
    assert (result["fidelity_lines_latin"], result["fidelity_lines_cjk"], result["fidelity_lines_mixed"]) == (3, 1, 1)


def test_rec_agreement_groups_by_the_reference_script():
    reference = ["abc", "abd", "中文", "中国", "价格12"]
    candidate = ["abc", "abx", "中文", "中", "价格12"]
    result = rec_agreement(reference, candidate)
    assert result["fidelity"] == pytest.approx(3 / 5)
    assert result["fidelity_latin"] == 0.5 and result["fidelity_cjk"] == 0.5 and result["fidelity_mixed"] == 1.0
    assert result["fidelity_ned_latin"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["fidelity_ned_cjk"] == pytest.approx((1 + 0.5) / 2)
    with pytest.raises(ValueError):
        rec_agreement(reference, candidate[:-1])


def test_normalized_similarity():
    assert normalized_similarity("", "") == 1.0
    assert normalized_similarity("abcd", "") == 0.0
    assert normalized_similarity("abcd", "abce") == 0.75


def _box(x, y, w=40, h=12):
    return [[x, y], [x + w, y], [x + w, y + h], [x, y + h]]


def test_det_agreement_self_is_one_and_drops_with_missing_or_moved_boxes():
    pages = [[_box(10, 10), _box(10, 40), _box(10, 70)], [_box(5, 5)]]
    assert det_agreement(pages, pages)["fidelity"] == 1.0
    missing = [[_box(10, 10), _box(10, 40)], [_box(5, 5)]]
    result = det_agreement(pages, missing)
    assert result["fidelity_precision"] == 1.0 and result["fidelity_recall"] == pytest.approx(3 / 4)
    assert result["fidelity"] == pytest.approx(2 * 0.75 / 1.75)
    moved = [[_box(10, 10), _box(10, 40), _box(30, 70)], [_box(5, 5)]]  # half-overlapping box: IoU 1/3 < 0.5
    assert det_agreement(pages, moved)["fidelity_recall"] == pytest.approx(3 / 4)
    assert det_agreement([[]], [[]])["fidelity"] == 1.0
    assert det_agreement([[]], [[_box(0, 0)]])["fidelity"] == 0.0


def test_box_iou_of_rotated_boxes_is_the_polygon_overlap():
    square = [[0, 0], [2, 0], [2, 2], [0, 2]]
    diamond = [[1, 0], [2, 1], [1, 2], [0, 1]]  # the square's inscribed diamond: same bounding rectangle, half its area
    assert box_iou(square, square) == pytest.approx(1.0)
    assert box_iou(square, diamond) == pytest.approx(0.5)
    assert box_iou(square, [[3, 3], [4, 3], [4, 4], [3, 4]]) == 0.0
    assert box_iou([[0, 0], [1, 1], [2, 2], [3, 3]], square) == 0.0  # degenerate (zero-area) box


def test_fidelity_drops_and_gate_name_the_setting():
    metrics = {"fidelity": 0.93, "fidelity_latin": 0.97, "fidelity_cjk": 0.90, "fidelity_mixed": 0.5,
               "fidelity_lines_latin": 40, "fidelity_lines_cjk": 40, "fidelity_lines_mixed": 3}
    drops = fidelity_drops(metrics)
    assert drops["fidelity"] == pytest.approx(7.0) and drops["fidelity_cjk"] == pytest.approx(10.0)
    assert "fidelity_mixed" not in drops  # too few lines to gate on
    assert fidelity_gate(metrics, 7.5, 10.5) is None
    message = fidelity_gate(metrics, 5.0, None, setting="Compare.max_fidelity_drop")
    assert message.startswith("fidelity 0.9300 is 7.00 pt below the baseline") and "Compare.max_fidelity_drop" in message
    message = fidelity_gate(metrics, None, 8.0, setting="Quant.max_fidelity_drop")
    assert "fidelity_cjk 0.9000" in message and "Quant.max_script_fidelity_drop" in message
    # against the float model instead of the baseline
    assert fidelity_gate(metrics, 1.0, None, reference_metrics={"fidelity": 0.935}) is None
    assert fidelity_gate({}, 0.0, 0.0) is None  # nothing measured: nothing to gate


def test_compare_gate_on_fidelity():
    baseline = new_row("rec", "baseline", variant="fp32", backend="paddle_cpu", metric_name="acc", metric=0.9,
                       metrics={"fidelity": 1.0})
    good = new_row("rec", "export", variant="int8", backend="paddle_cpu", metric_name="acc", metric=0.9,
                   gated=True, metrics={"fidelity": 0.97})
    bad = new_row("rec", "export", variant="fp32", backend="onnxruntime", metric_name="acc", metric=0.9,
                  gated=True, metrics={"fidelity": 0.90})
    rows = [baseline, good, bad]
    assert [r for r, _ in fidelity_failures(rows, 5.0)] == [bad]
    assert fidelity_failures(rows, None) == []
    keys, message = gate_summary(rows, CompareConfig(max_metric_drop=None, max_fidelity_drop=5.0))
    assert keys == ["rec/export/fp32@onnxruntime"]
    assert "rec fp32 on onnxruntime: fidelity 0.9000 is 10.00 pt below the baseline" in message
    assert gate_summary(rows, CompareConfig(max_metric_drop=None, max_fidelity_drop=10.0)) == ([], "")


def test_reference_round_trip_and_bad_files(tmp_path):
    reference = FidelityReference("rec", ["a.jpg", "b.jpg"], ["abc", "中文"])
    path = tmp_path / "ref.json"
    reference.save(str(path))
    assert FidelityReference.load(str(path)) == reference
    path.write_text(json.dumps({"format": 99}))
    with pytest.raises(CheckpointError, match="rollback-to baseline"):
        FidelityReference.load(str(path))
    path.write_text("{")
    with pytest.raises(CheckpointError, match="unreadable"):
        FidelityReference.load(str(path))


def test_the_baseline_reference_is_required_inside_a_run_and_optional_when_comparing_runs(tmp_path):
    manifest = Manifest(str(tmp_path))
    model_cfg = types.SimpleNamespace(Fidelity=types.SimpleNamespace())
    with pytest.raises(CheckpointError, match="no finished checkpoint for model 'rec'"):
        baseline_reference(manifest, "rec", model_cfg)
    assert baseline_reference(manifest, "rec", model_cfg, required=False) is None
    (tmp_path / "stages" / "baseline" / "rec" / "v1").mkdir(parents=True)
    manifest.set_entry("baseline", "rec", {"status": "done", "dir": "stages/baseline/rec/v1", "files": {}})
    with pytest.raises(CheckpointError, match=f"has no {REFERENCE_FILE}; re-run it with --rollback-to baseline"):
        baseline_reference(manifest, "rec", model_cfg)
    assert baseline_reference(manifest, "rec", model_cfg, required=False) is None
    reference = FidelityReference("rec", ["a.jpg"], ["abc"], [0.9])
    reference.save(str(tmp_path / "stages" / "baseline" / "rec" / "v1" / REFERENCE_FILE))
    assert baseline_reference(manifest, "rec", model_cfg) == reference
    assert baseline_reference(manifest, "rec", model_cfg, required=False) == reference
    assert baseline_reference(manifest, "rec", types.SimpleNamespace(Fidelity=None)) is None


def test_strip_label_ops_keeps_the_image_ops():
    rec = [{"DecodeImage": {"img_mode": "BGR"}}, {"CTCLabelEncode": None},
           {"RecResizeImg": {"image_shape": [3, 48, 320]}}, {"KeepKeys": {"keep_keys": ["image", "label", "length"]}}]
    assert strip_label_ops(rec, "rec") == [{"DecodeImage": {"img_mode": "BGR"}},
                                           {"RecResizeImg": {"image_shape": [3, 48, 320]}},
                                           {"KeepKeys": {"keep_keys": ["image"]}}]
    det = [{"DecodeImage": {}}, {"DetLabelEncode": None}, {"DetResizeForTest": None},
           {"KeepKeys": {"keep_keys": ["image", "shape", "polys", "ignore_tags"]}}]
    assert strip_label_ops(det, "det")[-1] == {"KeepKeys": {"keep_keys": ["image", "shape"]}}
    assert [next(iter(op)) for op in strip_label_ops(det, "det")] == ["DecodeImage", "DetResizeForTest", "KeepKeys"]


def test_image_folder_and_list(tmp_path):
    from compress.data.labels import read_image_list

    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.PNG", "sub/c.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert list_images(str(tmp_path)) == ["a.PNG", "b.jpg", "sub/c.jpg"]
    listing = tmp_path / "list.txt"
    listing.write_text("b.jpg\tany label\n\nsub/c.jpg\n", encoding="utf-8")
    assert [p.name for p in read_image_list(listing, tmp_path)] == ["b.jpg", "c.jpg"]
    listing.write_text("missing.jpg\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"list\.txt:1: image .*missing\.jpg not found"):
        read_image_list(listing, tmp_path)


def test_e2e_agreement_scores_systems_against_the_baseline_system(tmp_path):
    import types

    import cv2
    import numpy as np

    from compress.compare.e2e import e2e_agreement

    path = str(tmp_path / "page.jpg")
    cv2.imwrite(path, np.full((20, 20, 3), 255, np.uint8))

    def system(lines):
        return lambda image: [types.SimpleNamespace(text=t, points=_box(*xy)) for t, xy in lines]

    reference = [("Total 12.50", (0, 0)), ("欢迎光临", (0, 40))]
    systems = {"base": system(reference), "same": system(reference),
               "worse": system([("Total 12.5O", (0, 0)), ("欢迎光临", (0, 40))]), "blind": system([])}
    result = e2e_agreement(systems, "base", [path, path], show_progress=False)
    assert result["base"]["fidelity"] == result["same"]["fidelity"] == 1.0 and result["same"]["fidelity_cer"] == 0
    assert result["worse"]["fidelity"] == pytest.approx(2 / 3) and result["worse"]["fidelity_line"] == 0.5
    assert result["blind"]["fidelity"] == 0.0 and result["base"]["fidelity_pages"] == 2


def test_subset_indices_spread_over_the_split():
    from compress.fidelity import subset_indices

    assert subset_indices(10, None) == list(range(10)) and subset_indices(10, 50) == list(range(10))
    assert subset_indices(10, 4) == [0, 3, 6, 9]
    chosen = subset_indices(3000, 600)
    assert len(chosen) == 600 and chosen[0] == 0 and chosen[-1] == 2999


def test_rec_agreement_on_the_lines_the_baseline_reads_confidently():
    reference = ["abc", "中文", "rare?", "价格12"]
    candidate = ["abc", "中文", "rare!", "价格13"]
    result = rec_agreement(reference, candidate, confident=[True, True, False, True])
    assert result["fidelity"] == pytest.approx(2 / 3) and result["fidelity_lines"] == 3
    assert result["fidelity_all"] == 0.5 and result["fidelity_lines_all"] == 4
    assert result["fidelity_mixed"] == 0.0 and "fidelity_lines_latin" in result
    ref = FidelityReference("rec", ["a", "b", "c", "d"], reference, [0.99, 0.97, 0.4, 0.96])
    assert ref.confident(0.95) == [True, True, False, True] and ref.confident(0.95, [1, 2]) == [True, False]
    assert ref.confident(None) is None and FidelityReference("det", ["a"], [[]]).confident(0.9) is None


def test_stage_fidelity_counts_the_stage_subset_or_the_whole_split(monkeypatch):
    import types

    from compress.stages import evaluation

    limits = []
    monkeypatch.setattr(evaluation, "fidelity_reference", lambda ctx: "reference")
    monkeypatch.setattr(evaluation, "measure_fidelity",
                        lambda task, run, reference, desc=None, limit=None: limits.append(limit) or {"fidelity": 1.0})
    ctx = types.SimpleNamespace(task="task", model_name="rec",
                                model_cfg=types.SimpleNamespace(Fidelity=types.SimpleNamespace(stage_limit=1000)))
    predict = lambda images: images  # noqa: E731 (not a paddle Layer: run as given)
    assert evaluation.fidelity_metrics(ctx, predict) == {"fidelity": 1.0}
    evaluation.fidelity_metrics(ctx, predict, whole_split=True)  # Quant.fidelity_split: all, as compare counts
    assert limits == [1000, None]
