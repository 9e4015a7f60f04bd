"""Training data for fine-tuning: the model config's ``Train`` split through PP-OCR's own transform list.

Augmentation is re-drawn every epoch but is a pure function of ``(seed, epoch, index)``: each item seeds Python's
``random``, NumPy's global generator and any albumentations pipeline inside the transforms (PP-OCR's ``IaaAugment``)
from that triple, and restores the global generators afterwards. Together with a shuffle order drawn from
``(seed, epoch)``, an interrupted fine-tune that resumes at (epoch, batch) sees exactly the batches it would have
seen, in any number of worker processes.
"""
import contextlib
import hashlib
import logging
import os
import random
import threading

import numpy as np
import paddle

from compress.data.labels import IMAGE_SUFFIXES
from compress.errors import InputError
from compress.ppocr_compat import ensure_ppocr

logger = logging.getLogger(__name__)

# PaddleOCR's SimpleDataSet retries another random index when a transform rejects a sample (e.g. a random crop with
# no text box); after this many rejections in a row the split is considered broken.
MAX_RETRIES = 20

# Python's and NumPy's global generators are process-wide: Paddle's single-process DataLoader reads batches in a
# background thread while the training thread draws the unlabeled images, so a seeded transform holds this lock for
# its whole run (without it the two threads re-seed each other's generators and a resumed run diverges).
_GLOBAL_RNG_LOCK = threading.RLock()


def item_seed(seed, epoch, index, attempt=0):
    """A 32-bit seed derived from (seed, epoch, index, attempt), stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@contextlib.contextmanager
def seeded_augmentation(ops, seed):
    """Seed every random source PP-OCR transforms draw from, restoring the global generators on exit.

    Holds a process-wide lock while the transforms run, so threads (the DataLoader's reader thread, the training
    thread drawing unlabeled images) never draw from each other's seeding.

    Args:
        ops: the operator list built by ``ppocr.data.imaug.create_operators``.
        seed: a 32-bit integer.
    """
    with _GLOBAL_RNG_LOCK:
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        for op in ops:
            # albumentations >= 1.4 keeps its own generators, untouched by the global seeds
            augmenter = getattr(op, "augmenter", None)
            if augmenter is not None and hasattr(augmenter, "set_random_seed"):
                augmenter.set_random_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class TransformDataset(paddle.io.Dataset):
    """A labelled split read with a task's label reader and transformed with PP-OCR's operators per item.

    Items are tuples of numpy arrays in the order of the transform list's ``KeepKeys`` (det:
    image, threshold_map, threshold_mask, shrink_map, shrink_mask; rec: image, label, length).

    Args:
        task: a ``compress.tasks.Task`` (gives the label reader and ppocr's global config, e.g. the dictionary).
        split_cfg: a ``compress.config.DatasetConfig`` (usually the model config's ``Train`` section).
        seed: base seed of the augmentation.
        records: ``[(image_path, label)]`` to use instead of reading ``split_cfg.label_file``.
    """

    def __init__(self, task, split_cfg, seed=0, records=None):
        super().__init__()
        ensure_ppocr()
        from ppocr.data.imaug import create_operators

        self.split_cfg = split_cfg
        self.seed = seed
        self.epoch = 0
        records = task.read_labels(split_cfg) if records is None else list(records)
        if split_cfg.limit is not None:
            records = records[:split_cfg.limit]
        if not records:
            raise InputError(f"{split_cfg.label_file}: no samples; add labelled lines")
        self.records = records
        try:
            self.ops = create_operators([dict(t) for t in split_cfg.transforms], task.global_config)
        except Exception as exc:  # ppocr raises bare Exceptions / TypeErrors for bad transform arguments
            raise InputError(f"{split_cfg.label_file}: transforms: ppocr could not build them "
                             f"({type(exc).__name__}: {exc}); check the Train.transforms list") from None
        self.rejected = 0

    def set_epoch(self, epoch):
        """Draw the augmentation of ``epoch`` (call before iterating an epoch)."""
        self.epoch = epoch

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        from ppocr.data.imaug import transform

        last_error = None
        for attempt in range(MAX_RETRIES):
            seed = item_seed(self.seed, self.epoch, index, attempt)
            image_path, label = self.records[index]
            data = {"img_path": image_path, "image": _read_bytes(image_path, self.split_cfg), "label": label}
            try:
                with seeded_augmentation(self.ops, seed):
                    out = transform(data, self.ops)
            except Exception as exc:  # as SimpleDataSet: a transform failing on one sample rejects that sample
                out, last_error = None, exc
            if out is not None:
                return tuple(out)
            self.rejected += 1
            index = random.Random(seed).randrange(len(self.records))
        reason = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
        raise InputError(f"{self.split_cfg.label_file}: {MAX_RETRIES} samples in a row were rejected by the "
                         f"Train transforms{reason}; check the labels and the transform list (e.g. crop sizes)")


def _read_bytes(path, split_cfg):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InputError(f"{split_cfg.label_file}: cannot read image {path} ({exc.strerror}); fix the path or "
                         f"remove that line") from None


class EpochBatchSampler(paddle.io.DistributedBatchSampler):
    """Batches in an order drawn from (seed, epoch), split across data-parallel ranks, resumable mid-epoch.

    Paddle's ``DistributedBatchSampler`` shuffles with the epoch number alone; this one mixes in the configured
    seed and can start an epoch at a given batch without loading the skipped samples.

    Args:
        dataset: the dataset (only its length is used).
        batch_size: samples per batch on each rank.
        seed: shuffle seed.
        shuffle: shuffle every epoch.
        num_replicas: data-parallel world size (default: from the environment).
        rank: this process's rank (default: from the environment).
    """

    def __init__(self, dataset, batch_size, seed=0, shuffle=True, num_replicas=None, rank=None):
        super().__init__(dataset, batch_size, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                         drop_last=False)
        self.seed = seed
        self.start_batch = 0

    def set_epoch(self, epoch, start_batch=0):
        """Select the order of ``epoch`` and skip its first ``start_batch`` batches."""
        self.epoch = epoch
        self.start_batch = start_batch

    def __iter__(self):
        count = len(self.dataset)
        order = np.arange(count)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(count)
        # pad so every rank gets the same number of samples (as DistributedBatchSampler does)
        order = np.resize(order, self.total_size)
        mine = order[self.local_rank::self.nranks].tolist()
        batches = [mine[i:i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        yield from batches[self.start_batch:]

    def __len__(self):
        return -(-self.num_samples // self.batch_size)


def make_train_loader(task, split_cfg, batch_size=None, seed=0, num_workers=0):
    """A DataLoader over ``split_cfg`` with per-epoch augmentation, sharded across ranks when distributed.

    Args:
        task: a ``compress.tasks.Task``.
        split_cfg: the ``Train`` DatasetConfig.
        batch_size: samples per batch per rank (default: ``split_cfg.batch_size``).
        seed: shuffle and augmentation seed.
        num_workers: loader worker processes (0: load in the training process).

    Returns:
        ``paddle.io.DataLoader`` whose ``batch_sampler`` is an :class:`EpochBatchSampler`; call
        :func:`start_epoch` before iterating each epoch.
    """
    dataset = TransformDataset(task, split_cfg, seed=seed)
    return dataset_loader(dataset, batch_size or split_cfg.batch_size, seed, num_workers)


def dataset_loader(dataset, batch_size, seed=0, num_workers=0):
    """A resumable DataLoader over a :class:`TransformDataset` (see :func:`make_train_loader`)."""
    sampler = EpochBatchSampler(dataset, batch_size, seed=seed, num_replicas=paddle.distributed.get_world_size(),
                                rank=paddle.distributed.get_rank())
    return paddle.io.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, return_list=True)


def start_epoch(loader, epoch, start_batch=0):
    """Prepare ``loader`` for ``epoch`` (shuffle order and augmentation), skipping ``start_batch`` batches.

    Returns:
        True when the loader supports exact resumption (an :class:`EpochBatchSampler` over a
        :class:`TransformDataset`); otherwise nothing was skipped and the caller must skip batches itself.
    """
    sampler = getattr(loader, "batch_sampler", None)
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, TransformDataset):
        dataset.set_epoch(epoch)
    if isinstance(sampler, EpochBatchSampler):
        sampler.set_epoch(epoch, start_batch)
        return True
    return False


# ------------------------------------------------------------------------------------------------ unlabeled images

# PP-OCR operators that read or make labels; dropped from the Train list for images without labels
_LABEL_OPS = ("DetLabelEncode", "CTCLabelEncode", "MultiLabelEncode", "AttnLabelEncode", "SARLabelEncode",
              "NRTRLabelEncode", "MakeBorderMap", "MakeShrinkMap", "IaaAugment")


def label_free_transforms(transforms):
    """A Train transform list without its label operators, keeping only the image.

    The label encoders, DB's map makers and ``IaaAugment`` (which moves the text polygons) are dropped;
    ``EastRandomCropData`` (a crop around the text boxes) becomes a resize to its crop size, so images still batch;
    ``KeepKeys`` keeps ``image`` alone.
    """
    out = []
    for op in transforms:
        name, args = next(iter(dict(op).items()))
        if name in _LABEL_OPS:
            continue
        if name == "EastRandomCropData":
            out.append({"DetResizeForTest": {"image_shape": list((args or {}).get("size", [640, 640]))}})
        elif name == "KeepKeys":
            out.append({"KeepKeys": {"keep_keys": ["image"]}})
        else:
            out.append({name: args})
    return out


def unlabeled_records(data_dir, label_file=None, limit=None, where="unlabeled"):
    """``[(image_path, None)]`` from a label file's first column (paths relative to ``data_dir``) or, without a
    label file, every image in ``data_dir`` (sorted by name)."""
    if label_file:
        try:
            with open(label_file, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
        except OSError as exc:
            raise InputError(f"{where}.label_file: cannot read {label_file} ({exc.strerror})") from None
        root = data_dir or os.path.dirname(label_file)
        paths = [os.path.join(root, line.split("\t", 1)[0]) for line in lines if line.strip()]
    else:
        if not data_dir or not os.path.isdir(data_dir):
            raise InputError(f"{where}.data_dir: {data_dir} is not a folder; give a folder of images or a label_file")
        paths = [os.path.join(data_dir, n) for n in sorted(os.listdir(data_dir))
                 if n.lower().endswith(IMAGE_SUFFIXES)]
    paths = paths[:limit] if limit else paths
    if not paths:
        raise InputError(f"{where}: no images in {label_file or data_dir}; add images or fix the path")
    return [(p, None) for p in paths]


class UnlabeledDataset(TransformDataset):
    """Images without labels through a label-free transform list; items are ``(image,)``.

    Args:
        task: a ``compress.tasks.Task`` (ppocr's global config).
        records: ``[(image_path, None)]`` (see :func:`unlabeled_records`).
        transforms: the transform list (see :func:`label_free_transforms`).
        seed: augmentation seed.
        where: the config key path named in errors.
    """

    def __init__(self, task, records, transforms, seed=0, where="unlabeled"):
        from compress.config import DatasetConfig

        split = DatasetConfig(data_dir="", label_file=where, transforms=list(transforms))
        super().__init__(task, split, seed=seed, records=records)


class UnlabeledStream:
    """The unlabeled images appended to training step ``step``: a pure function of (seed, step), so a resumed run
    sees the same images. Every pass over the images is shuffled anew and re-augmented.

    Args:
        dataset: an :class:`UnlabeledDataset`.
        batch_size: images per step.
        seed: shuffle and augmentation seed.
    """

    def __init__(self, dataset, batch_size, seed=0):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed

    def images(self, step):
        """The images of ``step`` as one float32 array [batch_size, C, H, W]."""
        count = len(self.dataset)
        per_pass = max(count // self.batch_size, 1)
        epoch, batch = divmod(step, per_pass)
        order = np.resize(np.random.default_rng([self.seed, 104729, epoch]).permutation(count),
                          per_pass * self.batch_size)
        self.dataset.set_epoch(epoch)
        picked = order[batch * self.batch_size:(batch + 1) * self.batch_size]
        return np.stack([self.dataset[int(i)][0] for i in picked]).astype("float32")
