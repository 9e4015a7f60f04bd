"""The interface every inference backend implements, and the registry the rest of the project looks them up in.

A backend is one class in one module of this package (NNCF's per-backend algorithm classes are the model): it says
whether it can run on this machine and why not, which model formats it reads, how to build a predictor from a
:class:`export.predictor.DeployConfig`, its own deploy settings, where its model sits in an exported folder, how
the export stage puts that model there, and how to make an INT8 model for it. Nothing outside its module spells its
name except the configs; a new backend is a new module that registers itself with :func:`register_backend` (tests
do that from test code alone).
"""
import dataclasses
import os
from typing import Callable, Optional

from compress.errors import ConfigError, InputError
from compress.registry import BACKENDS

# metadata of an INT8 ONNX file naming the one runtime it was calibrated and checked for; others refuse it
INT8_RUNTIME_KEY = "ppocr_compress.int8_runtime"
# How PaddleOCR runs a model on CPU: where the pipeline evaluates its own checkpoints, the backend a deploy bundle
# defaults to, and the "x the speed of the Paddle baseline" every delivery is quoted against.
REFERENCE_BACKEND = "paddle_cpu"
# deploy.yml's ``Model.files`` key of each model format
FILES_KEYS = {"pdmodel": "paddle", "json": "paddle", "onnx": "onnx", "openvino": "openvino"}


def register_backend(cls):
    """Class decorator: register an instance of a :class:`Backend` subclass under ``cls.name``."""
    BACKENDS.register(cls.name, cls())
    return cls


def get_backend(name, where=""):
    """The registered backend called ``name``; ConfigError listing the valid names otherwise."""
    return BACKENDS.get(name, where)


def backend_names():
    return BACKENDS.names()


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """Files of one inference model.

    Attributes:
        model_file: program file (``*.pdmodel``, ``*.json`` for PIR programs, ``*.onnx``, or an OpenVINO ``*.xml``).
        params_file: ``*.pdiparams`` (Paddle) or ``*.bin`` (OpenVINO) next to it; None for ONNX.
        format: ``"pdmodel"``, ``"json"``, ``"onnx"`` or ``"openvino"``.
    """

    model_file: str
    params_file: "str | None"
    format: str


class Predictor:
    """A created predictor: ``run({input name: array}) -> [output arrays]``.

    Attributes:
        backend: the backend really used (after any fallback).
        fallback_reason: why the requested backend was replaced, or None.
        input_names / output_names: model I/O names.
    """

    def __init__(self, backend, fallback_reason, runner, input_names, output_names):
        self.backend = backend
        self.fallback_reason = fallback_reason
        self._runner = runner
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    def run(self, inputs):
        """Run one batch.

        Args:
            inputs: input name -> numpy array.

        Returns:
            list of numpy arrays, in ``output_names`` order.
        """
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise InputError(f"predictor inputs missing {missing}; the model expects {self.input_names}")
        return self._runner(inputs)


@dataclasses.dataclass(frozen=True)
class PtqJob:
    """What a backend needs to make and judge an INT8 model of one float model.

    Attributes:
        folded_dir: the float Paddle inference model (affine blocks folded into the convs).
        out_dir: the quant stage's checkpoint folder; the backend writes into ``out_dir/<its int8_dir>``.
        work_dir: scratch folder.
        calibration: ``[{input name: batch}]`` from the Calibration split.
        evaluate: ``evaluate(model_path, backend, precision, split="eval", limit=None, mkldnn=True) -> metrics``.
        main_metric: key of the task's main metric in those metrics (higher is better).
        task: ``det`` or ``rec``.
        options: the ``Quant`` section (algo, max_metric_drop, max_skipped, ...: compress.stages.quant.QuantConfig).
        rounded_dir: the same model with its dense-conv weights GPTQ-rounded onto the per-channel INT8 grid
            (``Quant.weight_rounding: gptq``), or None; a backend with ``int8_weight_grid`` quantizes it instead of
            ``folded_dir`` (its float reference stays ``folded_dir``), and so may one whose grid is the same only on
            some CPUs (ONNX Runtime: with VNNI, no ``reduce_range``).
    """

    folded_dir: str
    out_dir: str
    work_dir: str
    calibration: list
    evaluate: Callable
    main_metric: str
    task: str
    options: object
    rounded_dir: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class ExportFolder:
    """One folder the export stage writes (``fp32/``, ``baseline_fp32/``, ``int8/``), as the backends see it.

    Attributes:
        name: the folder's name; the metric, note and failure keys of what a backend adds start with it.
        path: the folder, holding the Paddle model (float folders) or what the backends put there so far (``int8/``).
        options: the ``Export`` section (backends, opset, parity_samples, ...: export.stage.ExportConfig).
        model_cfg: the model's config.
        files: the folder's ``Model.files`` so far (:data:`FILES_KEYS` value -> file name; ``paddle`` is True in the
            float folders, whose Paddle model the stage exports itself).
        metrics / notes: the export's metrics and notes, to add to.
        fail: ``fail(key, detail)`` fails the stage's gate (e.g. for a conversion that failed).
        calibration: ``calibration() -> iterable of input batches`` from the Calibration split.
        quant_dir: the quant stage's checkpoint folder (``int8/`` only).
        quant_metadata: its metadata: ``backends`` (name -> quant record: ``dir``, ``files``) and
            ``passed_backends`` (those whose INT8 model passed its gate).
    """

    name: str
    path: str
    options: object
    model_cfg: object = None
    files: dict = dataclasses.field(default_factory=dict)
    metrics: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)
    fail: Optional[Callable] = None
    calibration: Optional[Callable] = None
    quant_dir: Optional[str] = None
    quant_metadata: dict = dataclasses.field(default_factory=dict)

    def quant_made(self, name):
        """Did the quant stage make an INT8 model for backend ``name``?"""
        return name in (self.quant_metadata.get("backends") or {})

    def quant_passed(self, name):
        """Did backend ``name``'s INT8 model pass the quant stage's gate? (A checkpoint written before the gate was
        per backend has no record: every INT8 model passed it then.)"""
        return name in self.quant_metadata.get("passed_backends", backend_names())

    def quant_file(self, name, default_dir):
        """The INT8 model file the quant stage recorded for backend ``name`` (``dir`` + ``files.int8``), or None."""
        record = (self.quant_metadata.get("backends") or {}).get(name) or {}
        file_name = (record.get("files") or {}).get("int8")
        path = os.path.join(self.quant_dir, record.get("dir", default_dir), file_name) if file_name else None
        return path if path and os.path.isfile(path) else None


class Backend:
    """One inference backend.

    Attributes:
        name: the name configs use (``Export.backends``, ``deploy_<name>.yml``).
        formats: model formats :meth:`create` reads (``pdmodel``, ``json``, ``onnx``, ``openvino``).
        gpu: needs a GPU (the export writes fp16 configs only for these).
        fallback: the backend that runs a config of this one on a machine where it is unavailable, or None.
        int8_dir: folder of the quant stage's checkpoint holding this backend's INT8 model (None: no INT8 recipe).
        int8_format: the format of the INT8 model it runs (None: ``formats[0]``); an exported ``int8/`` folder gets
            this backend's deploy config only when it holds a model of that format, so no backend is handed another
            runtime's INT8 file.
        checked_against: a backend whose float outputs the export also compares this one's with (its model is
            converted from that backend's), or None.
        int8_weight_grid: its INT8 recipe stores conv weights as ``q * max|W[c]| / 127`` per output channel, so
            weights GPTQ-rounded onto that grid beforehand (``Quant.weight_rounding: gptq``,
            :mod:`compress.quant.weight_rounding`) keep their values; it then quantizes ``PtqJob.rounded_dir``. The
            rounding is made when a backend declaring this is in ``Quant.backends``, with its skip rule.
        summary: one line for ``--help`` texts and the report.
    """

    name = ""
    formats = ()
    gpu = False
    fallback = None
    int8_dir = None
    int8_format = None
    checked_against = None
    int8_weight_grid = False
    summary = ""

    @property
    def files_key(self):
        """The ``Model.files`` key (see :data:`FILES_KEYS`) of the format this backend reads first."""
        return FILES_KEYS[self.formats[0]]

    @property
    def int8_files_key(self):
        """The ``Model.files`` key (see :data:`FILES_KEYS`) of the INT8 model this backend runs."""
        return FILES_KEYS[self.int8_format] if self.int8_format else self.files_key

    def unavailable(self, capabilities) -> Optional[str]:
        """Why this backend cannot run here (None: it can)."""
        return None

    def create(self, files, deploy):
        """``(run, input_names, output_names)`` for ``files`` (a :class:`ModelFiles` in one of :attr:`formats`),
        where ``run({input name: array}) -> [output arrays]``; :func:`export.predictor.create_predictor` wraps it
        in a :class:`Predictor`."""
        raise NotImplementedError

    def model_path(self, folder, model_files) -> Optional[str]:
        """What ``create_predictor`` loads for this backend in an exported folder whose ``deploy.yml`` lists
        ``model_files`` (its ``Model.files``: format -> file name), or None when the folder has nothing it reads."""
        return folder if model_files.get("paddle") else None

    def deploy_settings(self, deploy, task, input_cfg, settings):
        """``deploy`` (a :class:`export.predictor.DeployConfig` with the shared settings) with this backend's own
        settings for a model of ``task`` with the ``Input`` section ``input_cfg``, checked; ``settings`` is the
        export's :class:`export.deploy.DeploySettings`."""
        return deploy

    def weight_rounding_skip(self, options):
        """For a backend with ``int8_weight_grid``: ``skip(name, layer) -> reason or ""`` naming the dense convs its
        INT8 recipe leaves float or quantizes on another grid (``options``: the ``Quant`` section)."""
        return lambda name, layer: ""

    def dry_run_lines(self, ranges):
        """What ``--dry-run`` prints about this backend's deploy configs, given the export's dynamic input ranges
        (``{input name: (min, opt, max)}``)."""
        return []

    def int8_source(self, folder: ExportFolder) -> Optional[str]:
        """The INT8 model (a file or folder in ``folder.quant_dir``) the quant stage made for this backend that the
        export brings into ``int8/``, or None (none made, or it failed the quant stage's gate)."""
        return None

    def export_model(self, folder: ExportFolder, source=None) -> dict:
        """Put the model this backend runs into an export folder; returns its ``Model.files`` entries.

        In ``int8/`` it is called first for every backend with an :meth:`int8_source` (copy it in), then for the
        configured backends without one; in the float folders for every configured backend, with no source. Without
        a source a backend may make its model from those already in the folder (``folder.files``) or note why it
        has none.
        """
        return {}

    def finish_export(self, folder: ExportFolder):
        """The last step on an export folder of a configured backend, after its deploy configs and ``deploy.yml``
        are written."""

    def ptq(self, job: PtqJob) -> dict:
        """Post-training INT8 for this backend; returns the quant record (see :class:`PtqJob`): ``float_metric``,
        ``int8_metric``, ``float_bytes``, ``int8_bytes``, ``dir``, ``float_model``, ``int8_model`` and extras."""
        raise ConfigError(f"Quant.backends: {self.name} has no INT8 recipe; use one of "
                          f"{', '.join(n for n in backend_names() if get_backend(n).int8_dir)}")

    def from_qdq(self, job: PtqJob, qdq_dir) -> dict:
        """The quant record of a QAT model (a Paddle QDQ model in ``qdq_dir``) run by this backend."""
        raise ConfigError(f"Quant.method qat: backend {self.name} cannot run a Paddle QDQ model; use method ptq "
                          f"for it or drop it from Quant.backends")
