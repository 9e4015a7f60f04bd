"""Fidelity to the baseline: how closely a compressed model reproduces the baseline model's own outputs.

Labelled accuracy on an eval split only sees what that split holds. A compressed model must keep what the baseline
knows, so every stage also measures agreement with the baseline on a ``Fidelity`` split of images that need no
labels (a folder of the user's own production images works as well as the generated demo split):

* rec: the fraction of lines whose decoded string equals the baseline's decoded string (``fidelity``), the mean
  1 - normalised edit distance to it (``fidelity_ned``), both also per script of the baseline's string
  (``latin``: no CJK characters; ``cjk``: CJK characters and no ASCII letters or digits; ``mixed``: both). With
  ``Fidelity.min_score`` these count the lines the baseline reads with at least that confidence (what it knows;
  where it guesses, any change of the model changes the guess), and ``fidelity_all`` / ``fidelity_ned_all`` every
  line;
* det: the hmean of the model's boxes with the baseline's boxes as the reference (IoU 0.5, PP-OCR's
  ``DetectionIoUEvaluator``), also precision and recall.

The baseline's outputs are computed once, by the baseline stage, and stored as a :class:`FidelityReference`
(JSON) in its checkpoint; every later measurement compares against that file. The baseline against itself scores
exactly 1.0 by construction.
"""
import dataclasses
import json
import os
from typing import Dict, List

import numpy as np
from tqdm import tqdm

from compress.errors import CheckpointError, ConfigError

REFERENCE_FILE = "fidelity_reference.json"
REFERENCE_FORMAT = 2
SCRIPTS = ("latin", "cjk", "mixed")
DET_IOU = 0.5
MIN_SCRIPT_LINES = 10  # a script with fewer reference lines is reported but not gated


# ------------------------------------------------------------------------------------------------ scripts

def is_cjk_char(char):
    """True for Han ideographs (incl. extensions and compatibility forms), kana and Hangul syllables."""
    code = ord(char)
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF
            or 0x20000 <= code <= 0x2FA1F or 0x3040 <= code <= 0x30FF or 0xAC00 <= code <= 0xD7AF)


def script_of(text):
    """``latin``, ``cjk`` or ``mixed`` for a text line (punctuation and spaces count for neither script).

    A line with no CJK character is ``latin`` (digits and symbols included); one with CJK characters and ASCII
    letters or digits (prices, dates, codes in a Chinese line) is ``mixed``.
    """
    has_cjk = any(is_cjk_char(c) for c in text)
    if not has_cjk:
        return "latin"
    has_ascii = any(c.isascii() and c.isalnum() for c in text)
    return "mixed" if has_ascii else "cjk"


# ------------------------------------------------------------------------------------------------ agreement

def normalized_similarity(reference, candidate):
    """1 - Levenshtein distance / the longer length (1.0 for two empty strings), as PP-OCR's ``norm_edit_dis``."""
    from rapidfuzz.distance import Levenshtein

    longest = max(len(reference), len(candidate))
    return 1.0 if longest == 0 else 1.0 - Levenshtein.distance(reference, candidate) / longest


def rec_agreement(reference, candidate, confident=None):
    """Agreement of candidate strings with the reference strings, overall and per script of the reference.

    Args:
        reference: the baseline's decoded strings.
        candidate: the compared model's decoded strings for the same images, in the same order.
        confident: per line, whether the baseline reads it confidently; when given, the ``fidelity*`` keys are
            measured on the confident lines only, and ``fidelity_all``, ``fidelity_ned_all``, ``fidelity_lines_all``
            on every line.

    Returns:
        dict: ``fidelity`` (exact agreement), ``fidelity_ned`` (mean 1 - NED), ``fidelity_lines``, and per script
        ``fidelity_<script>``, ``fidelity_ned_<script>``, ``fidelity_lines_<script>`` (scripts with no line are
        left out).
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} candidate strings for {len(reference)} reference strings")
    if confident is not None:
        every = rec_agreement(reference, candidate)
        kept = [i for i, flag in enumerate(confident) if flag]
        out = rec_agreement([reference[i] for i in kept], [candidate[i] for i in kept]) if kept else {}
        out.update(fidelity_all=every["fidelity"], fidelity_ned_all=every["fidelity_ned"],
                   fidelity_lines_all=every["fidelity_lines"])
        return out
    groups = {"": list(range(len(reference)))}
    for index, text in enumerate(reference):
        groups.setdefault(script_of(text), []).append(index)
    out = {}
    for script in ("",) + SCRIPTS:
        indices = groups.get(script)
        if not indices:
            continue
        suffix = f"_{script}" if script else ""
        exact = [reference[i] == candidate[i] for i in indices]
        similarity = [normalized_similarity(reference[i], candidate[i]) for i in indices]
        out[f"fidelity{suffix}"] = float(np.mean(exact))
        out[f"fidelity_ned{suffix}"] = float(np.mean(similarity))
        out[f"fidelity_lines{suffix}"] = len(indices)
    return out


def box_iou(a, b):
    """IoU of two text boxes (polygons as lists of ``[x, y]`` points, e.g. quads); 0.0 for degenerate ones."""
    from shapely.geometry import Polygon

    first, second = Polygon(a).buffer(0), Polygon(b).buffer(0)
    union = first.union(second).area
    return first.intersection(second).area / union if union > 0 else 0.0


def det_agreement(reference, candidate, iou=DET_IOU):
    """Box agreement of candidate detections with the reference detections, page by page.

    Args:
        reference: per page, the baseline's boxes (each a list of [x, y] corner points).
        candidate: per page, the compared model's boxes.
        iou: IoU for a candidate box to match a reference box.

    Returns:
        dict: ``fidelity`` (box hmean), ``fidelity_precision``, ``fidelity_recall``, ``fidelity_pages``,
        ``fidelity_boxes`` (reference boxes). Two models that both find nothing agree (1.0).
    """
    from compress.ppocr_compat import ensure_ppocr
    ensure_ppocr()
    from ppocr.metrics.eval_det_iou import DetectionIoUEvaluator

    if len(reference) != len(candidate):
        raise ValueError(f"{len(candidate)} candidate pages for {len(reference)} reference pages")
    evaluator = DetectionIoUEvaluator(iou_constraint=iou)
    results = [evaluator.evaluate_image(_boxes_for_evaluator(ref), _boxes_for_evaluator(cand))
               for ref, cand in zip(reference, candidate)]
    total = evaluator.combine_results(results)
    reference_boxes = sum(len(r) for r in reference)
    if reference_boxes == 0 and sum(len(c) for c in candidate) == 0:
        total = {"precision": 1.0, "recall": 1.0, "hmean": 1.0}
    return {"fidelity": float(total["hmean"]), "fidelity_precision": float(total["precision"]),
            "fidelity_recall": float(total["recall"]), "fidelity_pages": len(reference),
            "fidelity_boxes": reference_boxes}


def _boxes_for_evaluator(boxes):
    return [{"points": [tuple(map(float, p)) for p in box], "text": "", "ignore": False} for box in boxes]


# ------------------------------------------------------------------------------------------------ reference

@dataclasses.dataclass
class FidelityReference:
    """The baseline's outputs on the fidelity images.

    Attributes:
        task: ``det`` or ``rec``.
        images: the image files, relative to the Fidelity ``data_dir`` (the order of ``outputs``).
        outputs: rec: one decoded string per image; det: per image a list of boxes ([[x, y], ...]).
        scores: rec: the baseline's confidence in each string (CTC mean character probability); det: empty.
    """

    task: str
    images: List[str]
    outputs: list
    scores: list = dataclasses.field(default_factory=list)

    def confident(self, min_score, indices=None):
        """Per image (at ``indices``): is the baseline's reading confident (score >= ``min_score``)? None when
        ``min_score`` is None or there are no scores (det)."""
        if min_score is None or not self.scores:
            return None
        chosen = range(len(self.scores)) if indices is None else indices
        return [self.scores[i] >= min_score for i in chosen]

    def save(self, path):
        from compress.checkpoint import atomic_write_json
        atomic_write_json(path, {"format": REFERENCE_FORMAT, "task": self.task, "images": self.images,
                                 "outputs": self.outputs, "scores": self.scores})

    @classmethod
    def load(cls, path):
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: unreadable fidelity reference ({exc}); re-run the baseline stage "
                                  f"(--rollback-to baseline)") from None
        if data.get("format") != REFERENCE_FORMAT:
            raise CheckpointError(f"{path}: fidelity reference format {data.get('format')!r}, expected "
                                  f"{REFERENCE_FORMAT}; re-run the baseline stage (--rollback-to baseline)")
        return cls(data["task"], list(data["images"]), list(data["outputs"]), list(data.get("scores", [])))


def baseline_reference(manifest, model_name, model_cfg, required=True):
    """The :class:`FidelityReference` a run's baseline stage stored for a model; None when its config has no
    Fidelity split.

    Args:
        manifest: the run's :class:`compress.checkpoint.Manifest`.
        model_name: the model.
        model_cfg: its config.
        required: a missing reference is an error (the run's own stages measure against it); False (comparing
            finished runs, ``tools/compare.py``): None when the run has no baseline checkpoint or it holds no
            reference (a run made before fidelity was measured).

    Raises:
        CheckpointError: with ``required``, when there is no finished baseline checkpoint or no reference in it;
            always, when a checkpoint file is corrupt or the reference unreadable.
    """
    if model_cfg.Fidelity is None:
        return None
    folder = manifest.verified_dir("baseline", model_name) if required else \
        manifest.checkpoint_dir("baseline", model_name)
    path = os.path.join(folder, REFERENCE_FILE) if folder else None
    if path and os.path.exists(path):
        return FidelityReference.load(path)
    if required:
        raise CheckpointError(f"model '{model_name}': the baseline checkpoint has no {REFERENCE_FILE}; re-run it "
                              f"with --rollback-to baseline")
    return None


def decode_outputs(task, predict, batches, desc="fidelity", show_progress=True, scores=None):
    """The model's decoded outputs on fidelity batches: rec strings, or det boxes per page.

    Args:
        task: a ``compress.tasks.Task``.
        predict: callable(NCHW float array) -> model output (rec probabilities / det probability maps).
        batches: list of (images NCHW, shapes or None) from ``Task.fidelity_batches``.
        desc: progress bar label.
        scores: a list that receives each rec string's confidence (CTC mean character probability).
    """
    outputs = []
    for images, shapes in tqdm(batches, desc=desc, disable=not show_progress, leave=False):
        raw = predict(images)
        if task.task == "rec":
            decoded = task.post_process(raw)
            outputs += [text for text, _score in decoded]
            if scores is not None:
                scores += [round(float(score), 6) for _text, score in decoded]
        else:
            post = task.post_process({"maps": raw}, shapes)
            outputs += [np.asarray(page["points"]).round(2).tolist() for page in post]
    return outputs


def compute_reference(task, predict):
    """Run the baseline ``predict`` over the task's fidelity split; None when the model config has none."""
    if task.cfg.Fidelity is None:
        return None
    images, batches = task.fidelity_batches()
    scores = []
    outputs = decode_outputs(task, predict, batches, desc=f"fidelity reference {task.task}",
                             show_progress=task.show_progress, scores=scores)
    return FidelityReference(task.task, images, outputs, scores)


def subset_indices(count, limit):
    """``limit`` indices spread evenly over ``range(count)`` (all of them when ``limit`` is None or >= count), so a
    subset of a sorted folder still samples all of it."""
    if limit is None or limit >= count:
        return list(range(count))
    return sorted({int(i) for i in np.linspace(0, count - 1, limit).round()})


def measure_fidelity(task, predict, reference, desc=None, limit=None):
    """Agreement of ``predict`` with ``reference`` on the same fidelity images.

    Args:
        limit: measure on this many images spread over the split (:func:`subset_indices`); None: all of them.

    Raises:
        CheckpointError: when the fidelity images changed since the reference was made.
    """
    indices = subset_indices(len(reference.images), limit)
    images, batches = task.fidelity_batches(indices if len(indices) < len(reference.images) else None)
    if images != [reference.images[i] for i in indices]:
        raise CheckpointError(f"{task.cfg.source_file}: Fidelity: the images differ from those the baseline's "
                              f"reference was made on ({len(images)} vs {len(reference.images)}); re-run the "
                              f"baseline stage (--rollback-to baseline)")
    outputs = decode_outputs(task, predict, batches, desc=desc or f"fidelity {task.task}",
                             show_progress=task.show_progress)
    return agreement_of(reference, outputs, indices, task.cfg.Fidelity.min_score)


def agreement_of(reference, outputs, indices=None, min_score=None):
    """:func:`rec_agreement` (on the lines the baseline reads with at least ``min_score``) or
    :func:`det_agreement` of ``outputs`` with a reference (at ``indices`` of it), by its task."""
    expected = reference.outputs if indices is None else [reference.outputs[i] for i in indices]
    if reference.task == "rec":
        return rec_agreement(expected, outputs, reference.confident(min_score, indices))
    return det_agreement(expected, outputs)


def validate_fidelity_limits(cfg, where):
    """ConfigError when a section's ``max_fidelity_drop`` / ``max_script_fidelity_drop`` is negative."""
    for key in ("max_fidelity_drop", "max_script_fidelity_drop"):
        value = getattr(cfg, key)
        if value is not None and value < 0:
            raise ConfigError(f"{where}.{key}: must be >= 0 points or null, got {value}")


def fidelity_drops(metrics, reference_metrics=None, scripts=True):
    """Fidelity drops in points (100 x (reference - measured)) for gating.

    Args:
        metrics: measured metrics holding ``fidelity`` and, for rec, ``fidelity_<script>``.
        reference_metrics: the fidelity metrics to compare with (e.g. the float model's for an INT8 gate); None:
            the baseline itself (1.0 by definition).
        scripts: include per-script drops (scripts with at least ``MIN_SCRIPT_LINES`` lines).

    Returns:
        dict name -> drop in points (``fidelity``, ``fidelity_cjk``, ...); empty without fidelity metrics.
    """
    if "fidelity" not in metrics:
        return {}
    names = ["fidelity"] + ([f"fidelity_{s}" for s in SCRIPTS
                             if metrics.get(f"fidelity_lines_{s}", 0) >= MIN_SCRIPT_LINES] if scripts else [])
    drops = {}
    for name in names:
        if name not in metrics:
            continue
        ref = 1.0 if reference_metrics is None else reference_metrics.get(name, 1.0)
        drops[name] = 100.0 * (ref - metrics[name])
    return drops


def fidelity_gate(metrics, max_drop_pt, max_script_drop_pt=None, reference_metrics=None, setting=""):
    """None when the fidelity drops are within the limits, else a one-line reason naming the setting.

    Args:
        metrics: measured fidelity metrics.
        max_drop_pt: largest allowed drop of the overall fidelity, in points (None: not gated).
        max_script_drop_pt: largest allowed drop of any script's fidelity (None: not gated).
        reference_metrics: what the drop is measured from (None: the baseline, 1.0).
        setting: the config key path named in the message (e.g. ``Compare.max_fidelity_drop``).
    """
    drops = fidelity_drops(metrics, reference_metrics)
    failures = []
    if max_drop_pt is not None and drops.get("fidelity", 0.0) > max_drop_pt + 1e-9:
        failures.append(("fidelity", drops["fidelity"], max_drop_pt, setting))
    if max_script_drop_pt is not None:
        worst = max(((n, d) for n, d in drops.items() if n != "fidelity"), key=lambda item: item[1],
                    default=None)
        if worst is not None and worst[1] > max_script_drop_pt + 1e-9:
            failures.append((worst[0], worst[1], max_script_drop_pt,
                             setting.replace("max_fidelity_drop", "max_script_fidelity_drop")))
    if not failures:
        return None
    return "; ".join(f"{name} {metrics[name]:.4f} is {drop:.2f} pt below "
                     f"{'the baseline' if reference_metrics is None else 'the float model'}, more than the "
                     f"{limit:g} pt of {where}" for name, drop, limit, where in failures)


def summary(metrics):
    """Short text for a stage's summary line, e.g. ``fidelity 0.962 (latin 0.95, cjk 0.97, mixed 0.96)``."""
    if "fidelity" not in metrics:
        return ""
    parts = [f"{s} {metrics[f'fidelity_{s}']:.3f}" for s in SCRIPTS if f"fidelity_{s}" in metrics]
    if "fidelity_all" in metrics:
        parts.append(f"all lines {metrics['fidelity_all']:.3f}")
    return f"fidelity {metrics['fidelity']:.4f}" + (f" ({', '.join(parts)})" if parts else "")


def strip_label_ops(transforms, task):
    """A label-free copy of a PaddleOCR transform list: label encoders dropped, KeepKeys reduced to the image
    (rec) or the image and its resize record (det)."""
    keep = ["image"] if task == "rec" else ["image", "shape"]
    out: List[Dict] = []
    for op in transforms:
        (name, args), = dict(op).items()
        if name.endswith("LabelEncode"):
            continue
        if name == "KeepKeys":
            args = {"keep_keys": keep}
        out.append({name: dict(args) if args else args})
    return out



