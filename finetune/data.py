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
import random

import numpy as np
import paddle

from compress.errors import InputError
from compress.ppocr_compat import ensure_ppocr

logger = logging.getLogger(__name__)

# PaddleOCR's SimpleDataSet retries another random index when a transform rejects a sample (e.g. a random crop with
# no text box); after this many rejections in a row the split is considered broken.
MAX_RETRIES = 20


def item_seed(seed, epoch, index, attempt=0):
    """A 32-bit seed derived from (seed, epoch, index, attempt), stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@contextlib.contextmanager
def seeded_augmentation(ops, seed):
    """Seed every random source PP-OCR transforms draw from, restoring the global generators on exit.

    Args:
        ops: the operator list built by ``ppocr.data.imaug.create_operators``.
        seed: a 32-bit integer.
    """
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
    """

    def __init__(self, task, split_cfg, seed=0):
        super().__init__()
        ensure_ppocr()
        from ppocr.data.imaug import create_operators

        self.split_cfg = split_cfg
        self.seed = seed
        self.epoch = 0
        records = task.read_labels(split_cfg)
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
    sampler = EpochBatchSampler(dataset, batch_size or split_cfg.batch_size, seed=seed,
                                num_replicas=paddle.distributed.get_world_size(),
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
