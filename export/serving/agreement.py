"""How far two OCR answers for the same image agree (the shadow comparison), with the project's fidelity metrics.

* det: the hmean of the candidate's line boxes with the baseline's as the reference, IoU 0.5
  (:func:`compress.fidelity.det_agreement`, PP-OCR's ``DetectionIoUEvaluator``);
* rec: over the lines whose boxes match (each baseline box paired with the candidate box of highest IoU >= 0.5,
  greedily), the share read as the same string (:func:`compress.fidelity.rec_agreement`), and the mean
  1 - normalised edit distance. With no matched line there is nothing to compare: None, unless neither answer has
  a line (1.0). Boxes come from the answered lines, after ``drop_score``, as a client sees them.
"""
import dataclasses
from typing import Optional

from compress.fidelity import DET_IOU, box_iou, det_agreement, rec_agreement


@dataclasses.dataclass(frozen=True)
class Agreement:
    """The agreement of one candidate answer with the baseline's.

    Attributes:
        det: box hmean (1.0 when both found nothing).
        rec: exact string agreement of matched lines, or None when no line matched.
        rec_ned: mean 1 - NED of matched lines, or None.
        matched: number of matched lines.
    """

    det: float
    rec: Optional[float]
    rec_ned: Optional[float]
    matched: int


def match_lines(reference, candidate, iou=DET_IOU):
    """Pairs ``(i, j)`` of reference and candidate lines whose boxes overlap most, IoU >= ``iou``, each line used
    once (greedy, highest IoU first)."""
    scored = sorted(((box_iou(r.points, c.points), i, j) for i, r in enumerate(reference)
                     for j, c in enumerate(candidate)), reverse=True)
    used_ref, used_cand, pairs = set(), set(), []
    for value, i, j in scored:
        if value < iou:
            break
        if i not in used_ref and j not in used_cand:
            used_ref.add(i)
            used_cand.add(j)
            pairs.append((i, j))
    return sorted(pairs)


def shadow_agreement(reference, candidate, iou=DET_IOU):
    """Agreement of ``candidate`` lines with ``reference`` lines (each a list of ``export.ocr_system.OcrLine``)."""
    det = det_agreement([[line.points for line in reference]], [[line.points for line in candidate]], iou)
    pairs = match_lines(reference, candidate, iou)
    if not pairs:
        same = 1.0 if not reference and not candidate else None
        return Agreement(det["fidelity"], same, same, 0)
    rec = rec_agreement([reference[i].text for i, _ in pairs], [candidate[j].text for _, j in pairs])
    return Agreement(det["fidelity"], rec["fidelity"], rec["fidelity_ned"], len(pairs))
