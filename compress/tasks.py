"""Task adapters: data, evaluation and example inputs for text detection (det) and recognition (rec).

Evaluation uses PP-OCR's own pieces: the transform list of the config's dataset section
(``ppocr.data.imaug.create_operators``), its post-processing (``DBPostProcess`` / ``CTCLabelDecode``) and metrics
(``DetMetric`` hmean / precision / recall, ``RecMetric`` accuracy / normalized edit distance).

Every evaluation takes a ``predict`` callable (numpy batch -> numpy output), so dygraph models, Paddle Inference
predictors and ONNX Runtime sessions are measured by the same code.
"""
import copy

import numpy as np
from tqdm import tqdm

from compress.errors import InputError
from compress.ppocr_compat import ensure_ppocr

SPLITS = ("eval", "calibration", "train")


def _split_cfg(model_cfg, split):
    section = {"eval": model_cfg.Eval, "calibration": model_cfg.Calibration, "train": model_cfg.Train}[split]
    if section is None:
        raise InputError(f"{model_cfg.source_file}: {split.capitalize()}: section missing; add data_dir and "
                         f"label_file for the {split} split")
    return section


class Task:
    """Shared logic; subclasses define the label reader, batching, forward output and metric names."""

    task = ""
    main_metric = ""

    def __init__(self, model_cfg, show_progress=True):
        ensure_ppocr()
        from ppocr.metrics import build_metric
        from ppocr.postprocess import build_post_process

        self.cfg = model_cfg
        self.show_progress = show_progress
        self.global_config = self._global_config()
        try:
            self.post_process = build_post_process(dict(model_cfg.PostProcess), self.global_config)
            self._metric_cfg = dict(model_cfg.Metric)
            build_metric(dict(self._metric_cfg))
        except Exception as exc:  # ppocr raises bare Exceptions for unknown names
            raise InputError(f"{model_cfg.source_file}: PostProcess/Metric: {exc}") from None
        self._cache = {}

    def _global_config(self):
        g = self.cfg.Global
        out = {"use_space_char": g.use_space_char, "max_text_length": g.max_text_length}
        if g.character_dict_path:
            out["character_dict_path"] = self.cfg.path(g.character_dict_path)
        return out

    # ------------------------------------------------------------------------------------------ data

    def read_labels(self, split_cfg):
        raise NotImplementedError

    def samples(self, split, limit=None):
        """Preprocessed samples of a split, cached: a list of tuples of numpy arrays (PaddleOCR KeepKeys order)."""
        split_cfg = _split_cfg(self.cfg, split)
        limit = limit if limit is not None else split_cfg.limit
        key = (split, limit)
        if key in self._cache:
            return self._cache[key]
        from ppocr.data.imaug import create_operators, transform

        # ppocr's create_operators updates each op's arguments in place: hand it a copy of the frozen config
        ops = create_operators(copy.deepcopy([dict(t) for t in split_cfg.transforms]), self.global_config)
        records = self.read_labels(split_cfg)
        if limit is not None:
            records = records[:limit]
        out = []
        for image_path, label in tqdm(records, desc=f"load {self.task} {split}", disable=not self.show_progress,
                                      leave=False):
            with open(image_path, "rb") as f:
                data = {"img_path": image_path, "image": f.read(), "label": label}
            result = transform(data, ops)
            if result is None:
                raise InputError(f"{split_cfg.label_file}: sample {image_path} was rejected by the transforms "
                                 f"(label too long, unreadable image or no text box); fix or remove that line")
            out.append(tuple(result))
        if not out:
            raise InputError(f"{split_cfg.label_file}: no samples; add labelled lines")
        self._cache[key] = out
        return out

    def batches(self, split, batch_size=None, limit=None):
        """Yield lists of samples in batches (det always uses batch 1: images differ in size)."""
        items = self.samples(split, limit)
        size = batch_size or _split_cfg(self.cfg, split).batch_size
        for start in range(0, len(items), size):
            yield items[start:start + size]

    def input_batches(self, split, batch_size=None, limit=None):
        """Yield just the image arrays (N, C, H, W) of a split, e.g. for calibration."""
        for batch in self.batches(split, batch_size, limit):
            yield np.stack([s[0] for s in batch]).astype("float32")

    def fidelity_batches(self, subset=None):
        """The Fidelity split, preprocessed and batched, cached: (image names, [(images NCHW, shapes or None)]).

        Images come from ``Fidelity.label_file`` (labels ignored) or from every image under ``Fidelity.data_dir``;
        they are read with ``Fidelity.transforms`` or, by default, the Eval transforms without label operators.
        Det batches hold one page each (pages differ in size) with its resize record for post-processing.

        Args:
            subset: keep only these indices of the split (``compress.fidelity.subset_indices``); None: all.

        Raises:
            InputError: when the model config has no Fidelity section, or the folder holds no image.
        """
        names, samples = self._fidelity_samples()
        indices = range(len(samples)) if subset is None else subset
        key = ("fidelity", tuple(indices))
        if key not in self._cache:
            batches = self.stack_batches([samples[i] for i in indices], self.cfg.Fidelity.batch_size)
            self._cache[key] = ([names[i] for i in indices], batches)
        return self._cache[key]

    def stack_batches(self, samples, batch_size=None):
        """Unlabelled sample tuples as [(images NCHW float32, det resize records or None)], ``batch_size`` (None: the
        Eval one) per batch; det one page per batch (pages differ in size)."""
        size = 1 if self.task == "det" else (batch_size or self.cfg.Eval.batch_size)
        batches = []
        for start in range(0, len(samples), size):
            chunk = samples[start:start + size]
            images = np.stack([s[0] for s in chunk]).astype("float32")
            shapes = np.stack([s[1] for s in chunk]) if self.task == "det" else None
            batches.append((images, shapes))
        return batches

    def _fidelity_samples(self):
        cfg = self.cfg.Fidelity
        if cfg is None:
            raise InputError(f"{self.cfg.source_file}: Fidelity: section missing; add data_dir (a folder of "
                             f"unlabelled images) to measure agreement with the baseline")
        if "fidelity_samples" not in self._cache:
            self._cache["fidelity_samples"] = self.read_images(cfg.data_dir, cfg.label_file, cfg.limit,
                                                               cfg.transforms, where="Fidelity")
        return self._cache["fidelity_samples"]

    def image_batches(self, data_dir, limit=None, batch_size=None):
        """Yield the image arrays (N, C, H, W) of a folder of unlabelled images (det: one page per batch), read
        with the Eval transforms without label operators, e.g. for pruning reconstruction."""
        _, samples = self.read_images(data_dir, None, limit, None, where="images")
        size = 1 if self.task == "det" else (batch_size or self.cfg.Eval.batch_size)
        for start in range(0, len(samples), size):
            yield np.stack([s[0] for s in samples[start:start + size]]).astype("float32")

    def read_images(self, data_dir, label_file=None, limit=None, transforms=None, where="images"):
        """Unlabelled images, preprocessed: (names relative to ``data_dir``, [sample tuples]).

        Args:
            data_dir: a folder of images, searched recursively (paths relative to the model config's base dir).
            label_file: an image list (``img_path[<TAB>anything]``) instead of the whole folder.
            limit: first N images.
            transforms: a PaddleOCR transform list; None: the Eval transforms without label operators (rec
                samples hold the image, det samples the image and its resize record).
            where: the config key named in errors.
        """
        import os

        from compress.data.labels import image_paths

        folder = self.cfg.path(data_dir)
        paths = image_paths(folder, self.cfg.path(label_file) if label_file else None, limit,
                            where=f"{self.cfg.source_file}: {where}")
        samples = self.preprocess_images(paths, transforms, where, source=label_file or folder)
        return [os.path.relpath(p, folder).replace(os.sep, "/") for p in paths], samples

    def preprocess_images(self, paths, transforms=None, where="images", source=None):
        """Sample tuples of image files read with ``transforms`` (None: the Eval transforms without label
        operators), in the order of ``paths``.

        Raises:
            InputError: an image the transforms reject (unreadable); names it and ``source``, the list or folder
                it came from.
        """
        from ppocr.data.imaug import create_operators, transform

        from compress.fidelity import strip_label_ops

        transforms = transforms if transforms is not None else strip_label_ops(self.cfg.Eval.transforms, self.task)
        ops = create_operators(copy.deepcopy([dict(t) for t in transforms]), self.global_config)
        samples = []
        for path in tqdm(paths, desc=f"load {self.task} {where.lower()}", disable=not self.show_progress,
                         leave=False):
            with open(path, "rb") as f:
                result = transform({"img_path": path, "image": f.read()}, ops)
            if result is None:
                raise InputError(f"{path}: rejected by the {where} transforms (unreadable image?); remove it from "
                                 f"{source or 'the image set'}")
            samples.append(result)
        return samples

    def example_input(self, batch=1):
        """A deterministic array of the config's example input shape, for tracing and FLOPs counting."""
        shape = (batch,) + tuple(self.cfg.Input.example_shape)
        return np.random.default_rng(0).standard_normal(shape).astype("float32")

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, predict, split="eval", limit=None, desc=None, samples=None):
        """Run ``predict`` over a split and compute PP-OCR's metrics.

        Args:
            predict: callable(np.ndarray images NCHW) -> np.ndarray (det probability maps / rec probabilities).
            split: "eval" (default) or "calibration"; never "train".
            limit: number of samples (default: the split's ``limit``).
            samples: a list that receives one record per sample, in split order (:mod:`compress.stats`: rec
                ``[correct]``, det ``[matched, gt_care, det_care]``), for intervals of differences.
        Returns:
            dict of metrics (floats), including ``self.main_metric``.
        """
        if split == "train":
            raise ValueError("evaluation on the training split is not allowed")
        from ppocr.metrics import build_metric

        metric = build_metric(dict(self._metric_cfg))
        batches = list(self.batches(split, limit=limit))
        for batch in tqdm(batches, desc=desc or f"eval {self.task}", disable=not self.show_progress,
                          leave=False):
            self._update_metric(metric, predict, batch, samples)
        result = metric.get_metric()
        return {k: float(v) for k, v in result.items()}

    def _update_metric(self, metric, predict, batch, samples=None):
        raise NotImplementedError


class DetTask(Task):
    """Text detection with DB: metric hmean (also precision, recall)."""

    task = "det"
    main_metric = "hmean"

    def read_labels(self, split_cfg):
        from compress.data.labels import read_det_labels
        return [(str(s.image_path), s.label) for s in read_det_labels(split_cfg.label_file, split_cfg.data_dir)]

    def batches(self, split, batch_size=None, limit=None):
        return super().batches(split, batch_size=1, limit=limit)

    def _update_metric(self, metric, predict, batch, samples=None):
        image, shape, polys, ignore_tags = batch[0][:4]
        maps = predict(image[None].astype("float32"))
        post = self.post_process({"maps": maps}, shape[None])
        metric(post, [image[None], shape[None], polys[None], ignore_tags[None]])
        if samples is not None:
            page = metric.results[-1]
            samples.append([page["detMatched"], page["gtCare"], page["detCare"]])


class RecTask(Task):
    """Text recognition with CTC: metric acc (also norm_edit_dis)."""

    task = "rec"
    main_metric = "acc"

    def read_labels(self, split_cfg):
        from compress.data.labels import read_rec_labels
        return [(str(s.image_path), s.label) for s in read_rec_labels(split_cfg.label_file, split_cfg.data_dir)]

    def _update_metric(self, metric, predict, batch, samples=None):
        images = np.stack([s[0] for s in batch]).astype("float32")
        labels = np.stack([s[1] for s in batch])
        preds, targets = self.post_process(predict(images), labels)
        if samples is None:
            metric((preds, targets))
            return
        for pred, target in zip(preds, targets):  # one call per line: its own acc is 0 or 1
            samples.append([float(round(metric(([pred], [target]))["acc"]))])


TASKS = {"det": DetTask, "rec": RecTask}


def make_task(model_cfg, show_progress=True):
    return TASKS[model_cfg.task](model_cfg, show_progress=show_progress)


def dygraph_predictor(model):
    """Wrap a dygraph model as ``predict(np.ndarray) -> np.ndarray`` (det: the shrink map; rec: probabilities)."""
    import paddle

    def predict(images):
        model.eval()
        with paddle.no_grad():
            out = model(paddle.to_tensor(images))
        if isinstance(out, dict):
            out = out["maps"]
        return out.numpy()

    return predict
