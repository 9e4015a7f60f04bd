"""Per-sample metric records and the paired bootstrap interval of a metric difference (compress/stats.py)."""
import numpy as np
import pytest

from compress.report import apply_deltas, new_row, render_markdown, row_key
from compress.stats import difference_interval, metric_of


def test_metric_of_rec_is_the_accuracy_and_det_the_hmean_of_the_sums():
    assert metric_of([[1.0], [0.0], [1.0], [1.0]]) == pytest.approx(0.75)
    # page 1: 8 of 10 boxes found, 9 detections; page 2: 1 of 2, 4 detections -> P 9/13, R 9/12
    precision, recall = 9 / 13, 9 / 12
    assert metric_of([[8, 10, 9], [1, 2, 4]]) == pytest.approx(2 * precision * recall / (precision + recall))
    assert metric_of([[8, 10, 9], [1, 2, 4]], indices=[0]) == pytest.approx(2 * (8 / 9) * (8 / 10) / (8 / 9 + 8 / 10))


def test_identical_records_give_a_zero_interval_and_unpaired_records_none():
    records = [[float(i % 3 == 0)] for i in range(50)]
    assert difference_interval(records, records) == (0.0, 0.0)
    assert difference_interval(records, records[:-1]) is None
    assert difference_interval([], []) is None


def test_interval_holds_the_difference_and_narrows_with_more_samples():
    rng = np.random.default_rng(1)

    def pair(n):
        reference = (rng.random(n) < 0.9).astype(float)
        candidate = reference.copy()
        flipped = rng.choice(n, size=n // 10, replace=False)  # 10% of the lines change: about half of them lost
        candidate[flipped] = (rng.random(len(flipped)) < 0.4).astype(float)
        return reference[:, None], candidate[:, None]

    small, large = pair(100), pair(2000)
    for reference, candidate in (small, large):
        low, high = difference_interval(reference, candidate)
        diff = 100 * (candidate.mean() - reference.mean())
        assert low < diff < high
    width_small = np.subtract(*difference_interval(*small)[::-1])
    width_large = np.subtract(*difference_interval(*large)[::-1])
    assert width_large < width_small / 3  # ~1/sqrt(20) of it
    assert difference_interval(*small) == difference_interval(*small)  # seeded: reproducible


def test_rows_with_records_get_the_interval_in_their_delta_cell():
    base = new_row("rec", "baseline", variant="fp32", backend="onnxruntime", metric_name="acc", metric=0.9,
                   source="measured", eval_records=[[1.0]] * 9 + [[0.0]])
    cand = new_row("rec", "export", variant="int8", backend="onnxruntime", metric_name="acc", metric=0.8,
                   source="measured", eval_records=[[1.0]] * 8 + [[0.0]] * 2, reference=row_key(base))
    apply_deltas([base, cand])
    low, high = cand["metric_diff_ci95_pt"]
    assert low <= -10.0 <= high and high <= 0.0  # one line of ten lost: the interval never shows a gain
    assert f"-10.00 [{low:+.1f}, {high:+.1f}]" in render_markdown([base, cand], {}, title="t")
