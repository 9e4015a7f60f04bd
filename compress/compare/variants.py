"""Exported model variants of a run: one :class:`Variant` per exported folder and backend it has a deploy config
for, read from the export stage's checkpoint (``export/stage.py`` writes one folder per variant)::

    <export dir>/baseline_fp32/   the baseline weights (absent when no stage changed them: fp32/ is the baseline)
    <export dir>/fp32/            the compressed float model
    <export dir>/int8/            the INT8 models from the quant stage
    each with inference.pdmodel/.pdiparams, model.onnx, deploy.yml and deploy_<backend>.yml

Each deploy config a folder's ``deploy.yml`` lists is one variant (``export.deploy.DeployBundle``); folders without
``deploy.yml`` are read from their files (per backend, the files of its format; precision from ``int8`` in the name).
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import dataclasses
import glob
import os
from dataclasses import dataclass
from typing import Optional

from compress.errors import InputError
from export.backends import get_backend

BASELINE_VARIANT_PREFIX = "baseline"


@dataclass(frozen=True)
class Variant:
    """One exported model on one backend.

    Attributes:
        name: variant name: the folder name in the export dir (``baseline_fp32``, ``fp32``, ``int8``), plus
            ``/<file stem>`` for ONNX files found without a ``deploy.yml`` when the folder holds several.
        path: what ``create_predictor`` loads: the model folder (Paddle) or the ``.onnx`` file.
        backend: deploy backend requested (the predictor may fall back, e.g. ``paddle_trt`` -> ``paddle_cpu``).
        precision: ``fp32``, ``fp16`` or ``int8``.
        deploy_config: the DeployConfig as a dict (``to_dict`` form); ``threads`` is replaced when measuring.
        run: run label (``tools/compare.py --against``), empty inside a pipeline.
        deploy_key: the key of this deploy config in the folder's ``deploy.yml`` (None without one).
        baseline: True for the exported baseline model.
    """

    name: str
    path: str
    backend: str
    precision: str
    deploy_config: dict = dataclasses.field(default_factory=dict)
    run: str = ""
    deploy_key: Optional[str] = None
    baseline: bool = False

    @property
    def folder(self):
        """The exported model folder (holding ``deploy.yml`` when the export wrote one)."""
        return self.path if os.path.isdir(self.path) else os.path.dirname(self.path)

    @property
    def stage(self):
        return "baseline" if self.baseline else "export"

    def deploy(self, threads):
        """DeployConfig to run this variant with ``threads`` CPU threads."""
        from export.predictor import DeployConfig

        return DeployConfig.from_dict(dict(self.deploy_config, threads=int(threads)))


def discover_variants(export_dir, backends=("paddle_cpu", "onnxruntime"), run="", task=None, baseline_names=()):
    """Exported models in an export checkpoint dir, one Variant per (folder, backend).

    Folders starting with ``_`` or ``.`` (scratch, caches) are skipped. A folder with a ``deploy.yml``
    (``export.deploy.write_deploy_bundle``) gives one variant per deploy config it lists whose backend is in
    ``backends`` (``paddle_trt_fp16`` counts as ``paddle_trt``). A folder without one gives a ``paddle_cpu``
    variant for its Paddle program and an ``onnxruntime`` variant per ``*.onnx`` file, with the precision read from
    ``int8`` in the name and the delete-passes of ``task``.

    Args:
        export_dir: the export stage's checkpoint directory (one sub-folder per variant).
        backends: keep only these backends.
        run: run label copied into every Variant.
        task: ``det`` / ``rec`` (for folders without ``deploy.yml``).
        baseline_names: folders holding the baseline model besides ``baseline*`` ones (``fp32`` when no stage
            before the export changed the weights).

    Returns:
        list of Variant, baseline variants first, then by folder name.
    """
    from export.deploy import DEPLOY_FILE

    folders = sorted((name for name in os.listdir(export_dir) if os.path.isdir(os.path.join(export_dir, name))
                      and not name.startswith(("_", "."))),
                     key=lambda name: (not name.startswith(BASELINE_VARIANT_PREFIX), name))
    variants = []
    for name in folders:
        folder = os.path.join(export_dir, name)
        if os.path.exists(os.path.join(folder, DEPLOY_FILE)):
            found = _bundle_variants(name, folder, backends, run)
        else:
            found = _plain_variants(name, folder, backends, run, task)
        is_baseline = name.startswith(BASELINE_VARIANT_PREFIX) or name in baseline_names
        variants += [dataclasses.replace(v, baseline=is_baseline) for v in found]
    return variants


def baseline_folders(manifest, model_name, export_dir, until_stage="export"):
    """``("fp32",)`` when the export holds no ``baseline*`` folder and no stage before ``until_stage`` saved weights
    other than the baseline's: the export's ``fp32`` model then is the baseline; else ``()``."""
    if export_dir is None or any(n.startswith(BASELINE_VARIANT_PREFIX) for n in os.listdir(export_dir)):
        return ()
    return ("fp32",) if manifest.weight_stages(model_name, until_stage) == ["baseline"] else ()


def _bundle_variants(name, folder, backends, run):
    from export.deploy import read_deploy_bundle

    bundle = read_deploy_bundle(folder)
    variants = []
    for key in bundle.backends():
        deploy = bundle.deploy(key)
        if deploy.backend not in backends:
            continue
        label = name if key == deploy.backend else f"{name}/{key[len(deploy.backend) + 1:]}"
        variants.append(Variant(label, bundle.model_path(deploy.backend), deploy.backend, deploy.precision,
                                deploy.to_dict(), run, key))
    return variants


def _plain_variants(name, folder, backends, run, task):
    """Variants of a folder without ``deploy.yml``: per backend, each model file in the folder it reads (a Paddle
    program, ``*.onnx`` files, OpenVINO ``*.xml`` IRs), precision ``int8`` when the name says so."""
    from export.deploy import delete_passes_for
    from export.predictor import DeployConfig, find_model_files

    passes = delete_passes_for(task) if task else DeployConfig().delete_passes
    try:
        paddle = find_model_files(folder).format in ("pdmodel", "json")
    except InputError:
        paddle = False
    candidates = ([("paddle", folder, name)] if paddle else []) + [
        (fmt, path, os.path.splitext(os.path.basename(path))[0])
        for fmt, pattern in (("onnx", "*.onnx"), ("openvino", "*.xml"))
        for path in sorted(glob.glob(os.path.join(folder, pattern)))]
    variants = []
    for backend in backends:
        reader = get_backend(backend)
        own = [c for c in candidates if c[0] == reader.int8_files_key]
        for fmt, path, stem in own:
            label = name if len(own) == 1 else f"{name}/{stem}"
            precision = _precision_from_name(name if fmt == "paddle" else stem if len(own) > 1 else name + stem)
            variants.append(Variant(label, path, backend, precision,
                                    DeployConfig(backend=backend, precision=precision,
                                                 delete_passes=passes).to_dict(), run))
    return variants


def drop_unavailable(variants, threads, notes):
    """Drop variants whose backend cannot run here and would fall back onto a backend already measured.

    A ``paddle_trt`` request on a CPU-only build runs on ``paddle_cpu``: measuring it again next to the real
    ``paddle_cpu`` variant would only duplicate that row. The reason goes into ``notes``.
    """
    from export.predictor import resolve_backend

    kept, seen = [], {(v.run, v.name.split("/")[0], v.backend) for v in variants}
    for variant in variants:
        resolved, reason = resolve_backend(variant.deploy(threads))
        if resolved != variant.backend and (variant.run, variant.name.split("/")[0], resolved) in seen:
            notes.append(f"{variant.name}@{variant.backend} not measured: {reason}; it would run on {resolved}, "
                         f"which is measured already")
            continue
        kept.append(variant)
    return kept


def _precision_from_name(name):
    return "int8" if "int8" in name.lower() else "fp32"


def model_files_bytes(path):
    """Size on disk of an inference model: program + params (Paddle folder) or the ``.onnx`` file (+ its data)."""
    from export.predictor import find_model_files

    files = find_model_files(path)
    total = os.path.getsize(files.model_file)
    if files.params_file:
        total += os.path.getsize(files.params_file)
    if files.format == "onnx":
        stem = os.path.splitext(files.model_file)[0]
        total += sum(os.path.getsize(p) for p in glob.glob(stem + ".onnx.data") + glob.glob(stem + ".data"))
    return total
