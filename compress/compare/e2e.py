"""End-to-end OCR A/B: baseline det+rec system against the compressed systems on the det eval pages (word
precision / recall / hmean, CER, page latency) and their agreement with the baseline system on the Fidelity pages."""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

from compress.compare.measure import variant_key, variant_label
from compress.compare.variants import model_files_bytes
from compress.fidelity import box_iou
from compress.report import new_row
from export.backends import REFERENCE_BACKEND


def read_e2e_pages(det_cfg, limit=None):
    """Det eval pages with their ground-truth lines: list of (image path, [(transcription, points), ...]).

    Boxes marked to ignore (``###``) are left out.
    """
    from compress.data.labels import read_det_labels

    samples = read_det_labels(det_cfg.Eval.label_file, det_cfg.Eval.data_dir)
    pages = [(str(s.image_path), [(b.transcription, b.points) for b in s.boxes if not b.ignore]) for s in samples]
    return pages[:limit] if limit else pages


def page_scores(truth, predicted, iou_threshold=0.5):
    """Word and character counts of one page.

    Words: whitespace-separated tokens of all lines, matched as multisets (order-free). Characters: each
    ground-truth line is matched to the predicted line whose polygon overlaps it most (IoU >= ``iou_threshold``,
    each predicted line used once) and scored by Levenshtein distance; an unmatched line costs its length.

    Args:
        truth: [(transcription, points)] of the page.
        predicted: [(text, points)] from the OCR system.

    Returns:
        dict with ``words_true``, ``words_pred``, ``words_matched``, ``chars``, ``char_edits``, ``lines``,
        ``lines_exact``.
    """
    from collections import Counter

    from rapidfuzz.distance import Levenshtein

    true_words = Counter(w for text, _ in truth for w in text.split())
    pred_words = Counter(w for text, _ in predicted for w in text.split())
    scores = {"words_true": sum(true_words.values()), "words_pred": sum(pred_words.values()),
              "words_matched": sum((true_words & pred_words).values()), "chars": 0, "char_edits": 0,
              "lines": len(truth), "lines_exact": 0}
    unused = list(range(len(predicted)))
    for text, points in truth:
        overlaps = [(box_iou(points, predicted[i][1]), i) for i in unused]
        best_iou, best = max(overlaps, default=(0.0, None))
        guess = ""
        if best is not None and best_iou >= iou_threshold:
            unused.remove(best)
            guess = predicted[best][0]
        scores["chars"] += len(text)
        scores["char_edits"] += Levenshtein.distance(text, guess)
        scores["lines_exact"] += int(text == guess)
    return scores


def summarize_scores(page_results, page_seconds):
    """Micro-averaged end-to-end metrics and per-page latency percentiles."""
    from compress.timing import latency_stats

    total = {key: sum(p[key] for p in page_results) for key in page_results[0]}
    precision = total["words_matched"] / total["words_pred"] if total["words_pred"] else 0.0
    recall = total["words_matched"] / total["words_true"] if total["words_true"] else 0.0
    stats = latency_stats(page_seconds)
    return {"word_precision": precision, "word_recall": recall,
            "word_hmean": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "char_error_rate": total["char_edits"] / total["chars"] if total["chars"] else 0.0,
            "char_edit_distance": total["char_edits"], "line_accuracy": total["lines_exact"] / max(total["lines"], 1),
            "pages": len(page_results), "page_ms_p50": stats.p50_ms, "page_ms_p90": stats.p90_ms,
            "page_ms_p99": stats.p99_ms, "pages_per_s": stats.items_per_second(1)}


def evaluate_systems(systems, pages, warmup=1, clock=None):
    """Run every OCR system on every page, interleaved per page (order alternating), and score them.

    Args:
        systems: key -> callable(image_bgr) -> list of lines with ``text`` and ``points``.
        pages: from :func:`read_e2e_pages`.
        warmup: untimed runs of each system on the first page.

    Returns:
        key -> dict of metrics (see :func:`summarize_scores`).
    """
    import time

    from export.ocr_system import read_image

    clock = clock or time.perf_counter
    images = [read_image(path) for path, _ in pages]
    keys = list(systems)
    for _ in range(warmup):
        for key in keys:
            systems[key](images[0])
    scores = {key: [] for key in keys}
    seconds = {key: [] for key in keys}
    for index, ((_, truth), image) in enumerate(zip(pages, images)):
        for key in (keys if index % 2 == 0 else keys[::-1]):
            start = clock()
            lines = systems[key](image)
            seconds[key].append(clock() - start)
            scores[key].append(page_scores(truth, [(line.text, line.points) for line in lines]))
    return {key: summarize_scores(scores[key], seconds[key]) for key in keys}


def build_ocr_system(det, rec, threads):
    """An ``export.ocr_system.OcrSystem`` over two exported variants, running with ``threads`` CPU threads."""
    from export.ocr_system import OcrSystem
    from export.predictor import create_predictor

    system = OcrSystem(det.folder, rec.folder, backend=det.deploy_key)
    # OcrSystem takes the threads of the export's deploy files; every system compared must use the same count
    for part, variant in ((system.detector, det), (system.recognizer, rec)):
        if variant.deploy_config.get("threads") != threads:
            part.predictor = create_predictor(variant.path, variant.deploy(threads))
    return system


def e2e_rows(det_variants, rec_variants, det_cfg, settings, limit=None, log=print):
    """End-to-end OCR A/B: the baseline det+rec system against each compressed det+rec system.

    Systems pair det and rec variants of the same name and deploy config; the baseline system pairs the baseline
    variants. Variants without a ``deploy.yml`` cannot run as a system and are left out.

    Returns:
        list of report rows with model ``e2e`` (metric ``word_hmean``; word precision / recall, character error
        rate and line accuracy in ``metrics``; latency per page).
    """
    rec_by_key = {(v.run, v.name, v.deploy_key): v for v in rec_variants if v.deploy_key}
    # a model no stage changed exports only fp32/, which is its baseline: the baseline det pairs with it
    rec_baselines = {(v.run, v.deploy_key): v for v in rec_variants if v.deploy_key and v.baseline}
    pairs = []
    for det in det_variants:
        rec = rec_by_key.get((det.run, det.name, det.deploy_key))
        if rec is None and det.baseline:
            rec = rec_baselines.get((det.run, det.deploy_key))
        if rec is not None:
            pairs.append((det, rec))
    if not any(d.stage == "baseline" for d, _ in pairs):
        return []
    pages = read_e2e_pages(det_cfg, limit)
    systems = {variant_key(d): build_ocr_system(d, r, settings.threads) for d, r in pairs}
    results = evaluate_systems(systems, pages, warmup=min(settings.warmup, 1))
    if det_cfg.Fidelity is not None:
        baseline_key = next(variant_key(d) for d, _ in pairs if d.stage == "baseline")
        agreement = e2e_agreement(systems, baseline_key, fidelity_pages(det_cfg), settings.show_progress)
        for key, result in results.items():
            result.update(agreement[key])
    rows = []
    for det, rec in pairs:
        result = results[variant_key(det)]
        rows.append(new_row("e2e", det.stage, variant=det.name, backend=det.backend, precision=det.precision,
                            run=det.run, source="measured", metric_name="word_hmean",
                            metric=result["word_hmean"], metrics=result,
                            size_bytes=model_files_bytes(det.path) + model_files_bytes(rec.path),
                            latency_ms_p50=result["page_ms_p50"], latency_ms_p90=result["page_ms_p90"],
                            latency_ms_p99=result["page_ms_p99"], throughput_ips=result["pages_per_s"],
                            throughput_batch=1, note="per page: det + crops + rec"))
        if settings.show_progress:
            agreement = f" fidelity={result['fidelity']:.4f}" if "fidelity" in result else ""
            log(f"  compare e2e {variant_label(det)}: word_hmean={result['word_hmean']:.4f} "
                f"CER={result['char_error_rate']:.4f}{agreement} page p50={result['page_ms_p50']:.0f} ms")
    return rows


def fidelity_pages(det_cfg):
    """Image paths of the det model's Fidelity split (unlabelled pages)."""
    from compress.data.labels import image_paths

    cfg = det_cfg.Fidelity
    return image_paths(det_cfg.path(cfg.data_dir), det_cfg.path(cfg.label_file) if cfg.label_file else None,
                       cfg.limit, where=f"{det_cfg.source_file}: Fidelity")


def e2e_agreement(systems, baseline_key, paths, show_progress=True):
    """End-to-end agreement with the baseline OCR system on unlabelled pages: the baseline system's lines are the
    reference; each system is scored against them as against ground truth (:func:`page_scores`).

    Returns:
        key -> {``fidelity`` (word hmean vs the baseline's words), ``fidelity_line`` (share of the baseline's lines
        read identically at the same place), ``fidelity_cer`` (character error rate vs the baseline's text),
        ``fidelity_pages``}; the baseline system scores 1.0 against itself.
    """
    from tqdm import tqdm

    from export.ocr_system import read_image

    outputs = {key: [] for key in systems}
    for path in tqdm(paths, desc="e2e fidelity", disable=not show_progress, leave=False):
        image = read_image(path)
        for key, system in systems.items():
            outputs[key].append([(line.text, line.points) for line in system(image)])
    out = {}
    for key, pages in outputs.items():
        scores = [page_scores(reference, page) for reference, page in zip(outputs[baseline_key], pages)]
        total = summarize_scores(scores, [0.0] * len(scores)) if scores else {}
        out[key] = {"fidelity": total.get("word_hmean", 1.0), "fidelity_line": total.get("line_accuracy", 1.0),
                    "fidelity_cer": total.get("char_error_rate", 0.0), "fidelity_pages": len(scores)}
    return out



def e2e_for(variants_by_model, cfg, settings, notes, log):
    by_task = {}
    for name, (model_cfg, variants) in variants_by_model.items():
        by_task.setdefault(model_cfg.task, (model_cfg, variants))
    if "det" not in by_task or "rec" not in by_task:
        notes.append("end-to-end A/B skipped: it needs exported det and rec models")
        return []
    det_cfg, det_variants = by_task["det"]
    _, rec_variants = by_task["rec"]
    keep = [b for b in cfg.backends if b == REFERENCE_BACKEND] or list(cfg.backends)
    rows = e2e_rows([v for v in det_variants if v.backend in keep], [v for v in rec_variants if v.backend in keep],
                    det_cfg, settings, cfg.e2e_limit, log)
    if not rows:
        notes.append("end-to-end A/B skipped: no baseline det+rec pair of exported models with deploy.yml")
    return rows
