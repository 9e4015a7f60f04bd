"""How sure a metric difference is: per-sample records and the paired bootstrap interval of a difference.

Two models evaluated on the same Eval samples differ on few of them; a "+0.3 pt on 30 pages" is one box. The
interval says so. Per-sample records are what :meth:`compress.tasks.Task.evaluate` collects (``samples=``):

* rec: ``[correct]`` per line (1.0 when the decoded string equals the label, as PP-OCR's ``RecMetric`` counts);
* det: ``[matched, gt_care, det_care]`` per page (PP-OCR's ``DetectionIoUEvaluator`` counts), the page's share of
  the split's hmean, which is computed from the sums, not averaged per page.

:func:`difference_interval` resamples the sample indices with replacement (the same indices for both models, so the
pairing is kept), recomputes both metrics, and returns the percentile interval of their difference in points.
"""
import numpy as np

LEVEL = 0.95
RESAMPLES = 2000


def metric_of(samples, indices=None):
    """The split's main metric from per-sample records (rec accuracy, det hmean), over ``indices`` (all: None)."""
    values = np.asarray(samples, dtype="float64")
    if indices is not None:
        values = values[indices]
    return _metric(values[None])[0]


def difference_interval(reference, candidate, level=LEVEL, resamples=RESAMPLES, seed=0):
    """Paired bootstrap interval of ``metric(candidate) - metric(reference)``, in points.

    Args:
        reference, candidate: per-sample records of two models on the same samples, in the same order.
        level: coverage of the interval.
        resamples: bootstrap resamples.
        seed: seed of the resampling (the interval is reproducible).

    Returns:
        (low, high) in points, or None when the records do not pair (different lengths or kinds) or are empty.
    """
    ref, cand = np.asarray(reference, dtype="float64"), np.asarray(candidate, dtype="float64")
    if ref.ndim != 2 or ref.shape != cand.shape or not len(ref):
        return None
    picks = np.random.default_rng(seed).integers(0, len(ref), size=(resamples, len(ref)))
    diff = 100.0 * (_metric(cand[picks]) - _metric(ref[picks]))
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(diff, [tail, 100.0 - tail])
    return float(low), float(high)


def _metric(draws):
    """Metric of each draw: ``draws`` is (draws, samples, fields)."""
    if draws.shape[-1] == 1:
        return draws[..., 0].mean(axis=-1)
    matched, gt_care, det_care = (draws[..., i].sum(axis=-1) for i in range(3))
    recall = np.divide(matched, gt_care, out=np.zeros_like(matched), where=gt_care > 0)
    precision = np.divide(matched, det_care, out=np.zeros_like(matched), where=det_care > 0)
    total = precision + recall
    return np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
