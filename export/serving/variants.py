"""A variant's model folders and its pool of loaded OCR systems.

Folders come only from the config (:class:`export.serving.config.VariantConfig`): a ``model_dir`` with ``det/`` and
``rec/`` (a run's ``delivered/``, as ``tools/infer.py --model-dir``), or ``baseline_of`` a run directory: per model,
the export stage's ``baseline_fp32/`` or, when no stage before the export changed that model's weights, its
``fp32/`` (:func:`compress.compare.variants.baseline_folders`).

A :class:`VariantPool` loads ``workers`` copies of ``export.ocr_system.OcrSystem`` (one model run at a time per
copy: predictors are not shared between threads) and runs them in as many threads.
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import concurrent.futures
import dataclasses
import os
import queue
import time

import numpy as np

from compress.errors import ConfigError, InputError

MODELS = ("det", "rec")
WARMUP_PAGE = (640, 640)  # det's default limit_side_len
WARMUP_CROP = (48, 320)  # rec's input height and base width


@dataclasses.dataclass(frozen=True)
class VariantFolders:
    """The det and rec folders a variant serves, and what they came from (for ``/status``)."""

    det: str
    rec: str
    source: str


def run_baseline_folder(run_dir, model, where="baseline_of"):
    """The baseline export of ``model`` in run ``run_dir`` (``stages/export/<model>/v<N>/baseline_fp32`` or ``fp32``).

    Raises:
        ConfigError: when the run has no finished export of ``model`` or no baseline folder in it.
    """
    from compress.checkpoint import MANIFEST_NAME, Manifest
    from compress.compare.variants import BASELINE_VARIANT_PREFIX, baseline_folders

    if not os.path.exists(os.path.join(run_dir, MANIFEST_NAME)):
        raise ConfigError(f"{where}: {run_dir} is not a run directory (no {MANIFEST_NAME}); give the run's "
                          f"Global.run_dir, or det and rec folders")
    manifest = Manifest.load(run_dir)
    export_dir = manifest.checkpoint_dir("export", model)
    if export_dir is None:
        raise ConfigError(f"{where}: run {run_dir} has no finished export of {model}; run its export stage or "
                          f"give the {model} folder")
    names = sorted(n for n in os.listdir(export_dir) if n.startswith(BASELINE_VARIANT_PREFIX))
    names = names or list(baseline_folders(manifest, model, export_dir))
    if not names:
        raise ConfigError(f"{where}: {export_dir} holds no baseline export of {model} (its stages changed the "
                          f"weights and the export wrote no baseline_fp32/); give the {model} folder")
    return os.path.join(export_dir, names[0])


def resolve_folders(variant_cfg, where):
    """The VariantFolders of one VariantConfig (existence of ``deploy.yml`` is checked when loading)."""
    if variant_cfg.model_dir:
        folders = {m: os.path.join(variant_cfg.model_dir, m) for m in MODELS}
        source = variant_cfg.model_dir
    elif variant_cfg.baseline_of:
        folders = {m: run_baseline_folder(variant_cfg.baseline_of, m, f"{where}.baseline_of") for m in MODELS}
        source = f"baseline of run {variant_cfg.baseline_of}"
    else:
        folders, source = {}, "det and rec folders"
    for model in MODELS:
        folders[model] = getattr(variant_cfg, model) or folders[model]
        if not os.path.isdir(folders[model]):
            raise ConfigError(f"{where}: {model} folder {folders[model]} does not exist; give a folder holding det/ "
                              f"and rec/ (a run's delivered/), a run as baseline_of, or det and rec folders")
    return VariantFolders(folders["det"], folders["rec"], source)


def ocr_system_factory(folders, variant_cfg, drop_score):
    """A callable building one warmed-up OcrSystem for ``folders`` as ``variant_cfg`` says (backend, threads)."""
    def build():
        from export.ocr_system import OcrSystem

        system = OcrSystem(folders.det, folders.rec, backend=variant_cfg.backend, drop_score=drop_score,
                           threads=variant_cfg.threads)
        warm_up(system)
        return system
    return build


def warm_up(system):
    """One untimed det run on a blank page and one rec run on a blank crop: a predictor's first runs (oneDNN
    primitives, OpenVINO's first inference) take several times longer, and no request should pay for them."""
    system.detector(np.full(WARMUP_PAGE + (3,), 255, dtype=np.uint8))
    system.recognizer([np.full(WARMUP_CROP + (3,), 255, dtype=np.uint8)])


class VariantPool:
    """``workers`` engines of one variant, each used by one thread at a time.

    Args:
        name: ``baseline`` or ``candidate``.
        factory: builds one ready engine, a callable ``engine(image_bgr) -> list of OcrLine`` (an OcrSystem);
            ``load_seconds`` is the time it took for all of them.
        workers: engines (and threads).
        info: JSON-ready facts for ``/status`` (folders, backend, threads).
    """

    def __init__(self, name, factory, workers=1, info=None):
        self.name = name
        self.info = dict(info or {})
        started = time.perf_counter()
        engines = [factory() for _ in range(workers)]
        self.load_seconds = time.perf_counter() - started
        self.info.update(workers=workers, load_seconds=round(self.load_seconds, 3))
        backends = getattr(engines[0], "backends", None)
        if backends:
            self.info["backends"] = dict(backends)
        self._idle = queue.SimpleQueue()
        for engine in engines:
            self._idle.put(engine)
        self._threads = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix=f"ocr-{name}")

    def _run(self, image):
        engine = self._idle.get()
        try:
            started = time.perf_counter()
            lines = engine(image)
            return lines, (time.perf_counter() - started) * 1000.0
        finally:
            self._idle.put(engine)

    def submit(self, image):
        """Start one run; a concurrent Future of ``(lines, inference ms)``."""
        return self._threads.submit(self._run, image)

    def close(self):
        """Stop taking runs; queued runs are cancelled, running ones finish."""
        self._threads.shutdown(wait=False, cancel_futures=True)


def load_variant(name, variant_cfg, drop_score, where):
    """Resolve the folders of ``variant_cfg`` and load its VariantPool.

    Raises:
        ConfigError / InputError: bad folders (one line, from the folder checks or the deploy files).
    """
    folders = resolve_folders(variant_cfg, where)
    info = {"det": folders.det, "rec": folders.rec, "source": folders.source, "threads": variant_cfg.threads,
            "backend": variant_cfg.backend or "each folder's default"}
    try:
        return VariantPool(name, ocr_system_factory(folders, variant_cfg, drop_score), variant_cfg.workers, info)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
