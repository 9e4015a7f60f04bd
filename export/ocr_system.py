"""End-to-end OCR (detection then recognition) with exported models, PaddleOCR-style.

Each model folder is an export (``deploy.yml`` + model files, see ``export.deploy``). The steps follow PaddleOCR's
``tools/infer/predict_system.py`` with the libraries' own pieces:

1. det: the deploy file's PreProcess (PaddleOCR's ``DetResizeForTest`` / ``NormalizeImage`` / ``ToCHWImage``),
   the exported model, ``ppocr`` ``DBPostProcess``; boxes smaller than 4 px a side are dropped;
2. boxes sorted top-to-bottom, then left-to-right within a line, and each box cropped with a perspective warp
   (``rapidocr_paddle``'s PaddleOCR ports ``sorted_boxes`` / ``get_crop_img_list``);
3. rec: crops ordered by aspect ratio, batched, resized to height 48 with the batch's widest ratio (capped at the
   exported width range) by ``ppocr``'s ``resize_norm_img``, decoded by ``CTCLabelDecode``; results whose score
   is below ``drop_score`` are dropped.

``OcrSystem`` is what ``tools/infer.py`` and the A/B comparison run.
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import dataclasses
import json
import math
import os

import numpy as np

from compress.errors import InputError
from compress.ppocr_compat import ensure_ppocr, resolve_path
from export.deploy import REC_BATCH_SIZE, read_deploy_bundle
from export.predictor import create_predictor

MIN_BOX_SIDE = 4  # PaddleOCR drops detections whose quad is 3 px or less on a side
DEFAULT_DROP_SCORE = 0.5


@dataclasses.dataclass(frozen=True)
class OcrLine:
    """One recognised text line.

    Attributes:
        text: the recognised string.
        score: recognition confidence (mean of the character probabilities).
        points: the detected quad, four ``[x, y]`` integer points clockwise from top-left.
    """

    text: str
    score: float
    points: tuple

    def to_label(self):
        """PaddleOCR's det label entry plus the score."""
        return {"transcription": self.text, "points": [list(p) for p in self.points], "score": round(self.score, 4)}


def _load(model_dir, task, backend, threads=None):
    bundle = read_deploy_bundle(model_dir)
    if bundle.task != task:
        raise InputError(f"{model_dir}: deploy.yml says Model.task is {bundle.task}, but a {task} model is needed "
                         f"here; swap the --det and --rec folders")
    deploy = bundle.deploy(backend)
    if threads is not None:
        deploy = dataclasses.replace(deploy, threads=int(threads))
    predictor = create_predictor(bundle.model_path(deploy.backend), deploy)
    return bundle, predictor


class TextDetector:
    """Exported DB text detector: ``detector(image_bgr) -> boxes (N, 4, 2) float32`` in reading order.

    Args:
        model_dir: exported det folder.
        backend: deploy config key (``paddle_cpu``, ``onnxruntime``, ...); None: the folder's default.
        threads: CPU threads, overriding the deploy config's.
    """

    def __init__(self, model_dir, backend=None, threads=None):
        ensure_ppocr()
        from ppocr.data.imaug import create_operators
        from ppocr.postprocess import build_post_process

        self.bundle, self.predictor = _load(model_dir, "det", backend, threads)
        self.preprocess = create_operators(self.bundle.preprocess, {})
        self.postprocess = build_post_process(self.bundle.postprocess, {})

    def __call__(self, image_bgr):
        from ppocr.data.imaug import transform
        from rapidocr_paddle.main import RapidOCR

        image, shape = transform({"image": image_bgr}, self.preprocess)
        maps = self.predictor.run({self.predictor.input_names[0]: image[None].astype("float32")})[0]
        boxes = self.postprocess({"maps": maps}, np.asarray(shape)[None])[0]["points"]
        boxes = _clean_boxes(np.asarray(boxes, dtype="float32").reshape(-1, 4, 2), image_bgr.shape[:2])
        if not len(boxes):
            return boxes
        return np.stack(RapidOCR.sorted_boxes(boxes)).astype("float32")


def _clean_boxes(boxes, image_hw):
    height, width = image_hw
    boxes[..., 0] = np.clip(boxes[..., 0], 0, width - 1)
    boxes[..., 1] = np.clip(boxes[..., 1], 0, height - 1)
    sides_w = np.linalg.norm(boxes[:, 0] - boxes[:, 1], axis=-1)
    sides_h = np.linalg.norm(boxes[:, 0] - boxes[:, 3], axis=-1)
    return boxes[(sides_w >= MIN_BOX_SIDE) & (sides_h >= MIN_BOX_SIDE)]


def crop_boxes(image_bgr, boxes):
    """Perspective crops of ``boxes`` (PaddleOCR's get_rotate_crop_image; tall crops are rotated)."""
    from rapidocr_paddle.main import RapidOCR

    # get_crop_img_list uses nothing of the instance; calling it unbound avoids loading RapidOCR's own models
    return RapidOCR.get_crop_img_list(None, image_bgr, [box.astype("float32") for box in boxes])


class TextRecognizer:
    """Exported CTC text recogniser: ``recognizer(crops_bgr) -> [(text, score)]``.

    Args:
        model_dir: exported rec folder.
        backend: deploy config key; None: the folder's default.
        dict_path: character dictionary (``rapidocr:`` prefix allowed); None: the one in ``deploy.yml``.
        threads: CPU threads, overriding the deploy config's.
    """

    def __init__(self, model_dir, backend=None, dict_path=None, threads=None):
        ensure_ppocr()
        from ppocr.postprocess import build_post_process

        self.bundle, self.predictor = _load(model_dir, "rec", backend, threads)
        post = self.bundle.postprocess
        if dict_path:
            post["character_dict_path"] = resolve_path(dict_path)
        elif post.get("character_dict_path"):
            post["character_dict_path"] = os.path.join(model_dir, post["character_dict_path"])
        if post.get("character_dict_path") and not os.path.isfile(post["character_dict_path"]):
            raise InputError(f"character dictionary {post['character_dict_path']} not found; pass --dict")
        self.decode = build_post_process(post, {})
        self.image_shape = self._image_shape()
        rec = self.bundle.data.get("Rec") or {}
        self.batch_size = int(rec.get("batch_size", REC_BATCH_SIZE))
        self.max_width = int(rec.get("max_width", 4 * self.image_shape[2]))

    def _image_shape(self):
        for op in self.bundle.preprocess:
            if "RecResizeImg" in op:
                return list(op["RecResizeImg"]["image_shape"])
        shape = self.bundle.data.get("Input", {}).get("ranges", {}).get("opt", [1, 3, 48, 320])
        return list(shape[1:])

    def __call__(self, crops):
        from ppocr.data.imaug.rec_img_aug import resize_norm_img

        channels, height, base_width = self.image_shape
        ratios = [crop.shape[1] / float(max(crop.shape[0], 1)) for crop in crops]
        order = np.argsort(ratios, kind="stable")
        results = [None] * len(crops)
        for start in range(0, len(crops), self.batch_size):
            batch = order[start:start + self.batch_size]
            widest = max([base_width / height] + [ratios[i] for i in batch])
            width = min(self.max_width, int(math.ceil(height * widest)))
            images = np.stack([resize_norm_img(crops[i], [channels, height, width])[0] for i in batch])
            probs = self.predictor.run({self.predictor.input_names[0]: images.astype("float32")})[0]
            if len(self.decode.character) != probs.shape[-1]:
                raise InputError(f"the rec model predicts {probs.shape[-1]} classes but the dictionary gives "
                                 f"{len(self.decode.character)}; pass the dictionary it was trained with (--dict)")
            for index, (text, score) in zip(batch, self.decode(probs)):
                results[index] = (text, float(score))
        return results


class OcrSystem:
    """Detection + recognition with exported models.

    Args:
        det_dir / rec_dir: exported det and rec folders (each with ``deploy.yml``).
        backend: deploy config key for both (``paddle_cpu``, ``onnxruntime``, ...); None: each folder's default.
        dict_path: rec character dictionary override.
        drop_score: lines recognised with a lower score are dropped (PaddleOCR's default 0.5).
        threads: CPU threads for both models, overriding the deploy configs' (None: keep theirs).
    """

    def __init__(self, det_dir, rec_dir, backend=None, dict_path=None, drop_score=DEFAULT_DROP_SCORE,
                 threads=None):
        self.detector = TextDetector(det_dir, backend, threads)
        self.recognizer = TextRecognizer(rec_dir, backend, dict_path, threads)
        self.drop_score = drop_score

    @property
    def backends(self):
        """``{"det": backend used, "rec": ...}`` after any CPU fallback."""
        return {"det": self.detector.predictor.backend, "rec": self.recognizer.predictor.backend}

    def __call__(self, image_bgr):
        """OCR one BGR image; returns a list of OcrLine in reading order."""
        boxes = self.detector(image_bgr)
        if not len(boxes):
            return []
        texts = self.recognizer(crop_boxes(image_bgr, boxes))
        lines = []
        for box, (text, score) in zip(boxes, texts):
            if score >= self.drop_score and text:
                points = tuple((int(round(x)), int(round(y))) for x, y in box)
                lines.append(OcrLine(text=text, score=score, points=points))
        return lines


def read_image(path):
    """Read an image as BGR; InputError when it is missing or not an image."""
    import cv2

    if not os.path.isfile(path):
        raise InputError(f"image {path!r} not found")
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        raise InputError(f"{path!r} is not a readable image (cv2.imread failed)")
    return image


def format_label_line(image_name, lines):
    """``<image>\\t[{"transcription": ..., "points": ..., "score": ...}, ...]`` (PaddleOCR's det label format)."""
    return f"{image_name}\t{json.dumps([line.to_label() for line in lines], ensure_ascii=False)}"


def default_font():
    """A TrueType font that ships with matplotlib (DejaVu Sans: Latin, Greek, Cyrillic; no CJK)."""
    from matplotlib import font_manager

    return font_manager.findfont("DejaVu Sans")


def draw_result(image_bgr, lines, out_path, font_path=None):
    """Write the image with its boxes beside the recognised text (rapidocr_paddle's VisRes) as PNG."""
    import cv2
    from rapidocr_paddle.utils.vis_res import VisRes

    boxes = np.array([line.points for line in lines], dtype="float32").reshape(-1, 4, 2)
    drawn = VisRes(text_score=0.0).draw_ocr_box_txt(image_bgr, boxes, [line.text for line in lines],
                                                     [line.score for line in lines], font_path or default_font())
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    if not cv2.imwrite(out_path, np.ascontiguousarray(drawn)):
        raise InputError(f"could not write {out_path}")
    return out_path
