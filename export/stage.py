"""Stage ``export``: deployable Paddle Inference and ONNX models with deploy configs, parity-checked.

Writes into the stage checkpoint, per model:

* ``fp32/``: the current model (``paddle.jit.save``), what the configured backends add to it (``model.onnx``),
  ``deploy.yml`` and ``deploy_<backend>.yml``;
* ``baseline_fp32/``: the same for the baseline weights, when a later stage changed them (for A/B comparison);
* ``int8/``: the quant stage's INT8 models that passed its gate (the Paddle QDQ model, ONNX Runtime's and OpenVINO's;
  when it made no ONNX model, a paddle2onnx conversion of the Paddle QDQ model), with INT8 deploy configs;
* ``parity.json``: every parity report.

Each backend puts its own model into a folder (``Backend.int8_source`` / ``export_model`` in ``export/backends/``)
and finishes it (``finish_export``: TensorRT's shape-range plan). Every exported model is run through
``create_predictor`` per backend on real eval images and compared with the dygraph model (float: raw outputs; INT8:
decoded agreement); a converted model is also compared with the one it was converted from (``model.onnx`` with the
Paddle model).
A backend this machine cannot run (TensorRT on a CPU-only Paddle) falls back to CPU, exactly as ``create_predictor``
does, and its report says so. Any parity out of tolerance fails the stage's gate. The dygraph model is unchanged.
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from typing import List, Literal

from compress.errors import ConfigError
from compress.stages.base import Stage, StageResult, register_stage
from export.deploy import DeploySettings, build_deploy_config, gpu_backends, plan_dynamic_shapes, write_deploy_bundle
from export.exporter import ParityTolerance, compare_outputs, dygraph_outputs, export_inference_model, \
    model_bytes, predictor_outputs
from export.backends import ExportFolder, backend_names, get_backend
from export.predictor import PRECISIONS, resolve_backend

logger = logging.getLogger(__name__)

FP32_DIR, BASELINE_DIR, INT8_DIR = "fp32", "baseline_fp32", "int8"
PARITY_FILE = "parity.json"
# paddle2onnx 1.3.1 converts for opsets 7..16
OPSET_RANGE = (7, 16)


@dataclass(frozen=True)
class ExportConfig:
    """``Export`` section.

    Attributes:
        backends: deploy configs to write and check: registered backends (paddle_cpu, onnxruntime, openvino,
            paddle_trt, paddle_gpu).
        precisions: fp32 (always exported), int8 (when a quant stage ran), fp16 (GPU backends' configs only).
        opset: ONNX opset requested from paddle2onnx.
        threads: CPU threads in the deploy configs (and for the parity runs).
        mkldnn: oneDNN on CPU.
        trt_workspace_mb / trt_min_subgraph_size / trt_use_static: TensorRT settings.
        parity_samples: eval samples compared per backend (det: images, rec: text lines).
        fp32_max_abs_diff / fp16_max_abs_diff: float tolerances on raw outputs.
        int8_det_mean_abs_diff / int8_det_map_agreement / int8_rec_sequence_agreement: INT8 tolerances.
        export_baseline: also export the baseline weights (``baseline_fp32/``) for the A/B comparison.
        on_gate_fail: ``stop`` the pipeline, or ``continue`` when a parity check fails.
    """

    backends: List[str] = ("paddle_cpu", "onnxruntime", "openvino", "paddle_trt")
    precisions: List[Literal[PRECISIONS]] = ("fp32", "int8")
    opset: int = 13
    threads: int = 1
    mkldnn: bool = True
    trt_workspace_mb: int = 1024
    trt_min_subgraph_size: int = 3
    trt_use_static: bool = True
    parity_samples: int = 4
    fp32_max_abs_diff: float = 1e-3  # oneDNN vs dygraph reached 2.1e-4 on rec probabilities (AVX2 CPU)
    fp16_max_abs_diff: float = 1e-2
    int8_det_mean_abs_diff: float = 0.03
    int8_det_map_agreement: float = 0.97
    int8_rec_sequence_agreement: float = 0.85
    export_baseline: bool = True
    on_gate_fail: Literal["stop", "continue"] = "stop"

    def validate(self, where):
        for key in ("backends", "precisions"):
            values = list(getattr(self, key))
            if not values:
                raise ConfigError(f"{where}.{key}: list at least one")
            if len(set(values)) != len(values):
                raise ConfigError(f"{where}.{key}: {values} lists a value twice")
        for backend in self.backends:
            get_backend(backend, f"{where}.backends")
        if "fp16" in self.precisions and not any(get_backend(b).gpu for b in self.backends):
            raise ConfigError(f"{where}.precisions: fp16 needs a GPU backend ({', '.join(gpu_backends())}) in "
                              f"{where}.backends")
        if not OPSET_RANGE[0] <= self.opset <= OPSET_RANGE[1]:
            raise ConfigError(f"{where}.opset: {self.opset} is outside paddle2onnx 1.3.1's range "
                              f"{OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
        for key in ("threads", "trt_workspace_mb", "trt_min_subgraph_size", "parity_samples"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("fp32_max_abs_diff", "fp16_max_abs_diff", "int8_det_mean_abs_diff"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{where}.{key}: must be > 0, got {getattr(self, key)}")
        for key in ("int8_det_map_agreement", "int8_rec_sequence_agreement"):
            if not 0 < getattr(self, key) <= 1:
                raise ConfigError(f"{where}.{key}: a fraction in (0, 1], got {getattr(self, key)}")

    def settings(self):
        return DeploySettings(threads=self.threads, mkldnn=self.mkldnn, trt_workspace_mb=self.trt_workspace_mb,
                              trt_min_subgraph_size=self.trt_min_subgraph_size, trt_use_static=self.trt_use_static)

    def tolerance(self):
        return ParityTolerance(fp32_max_abs_diff=self.fp32_max_abs_diff, fp16_max_abs_diff=self.fp16_max_abs_diff,
                               int8_det_mean_abs_diff=self.int8_det_mean_abs_diff,
                               int8_det_map_agreement=self.int8_det_map_agreement,
                               int8_rec_sequence_agreement=self.int8_rec_sequence_agreement)


@register_stage
class ExportStage(Stage):
    """Exports the current model (and the baseline, and the INT8 model) for deployment, checked for parity."""

    name = "export"
    section = "Export"
    config_cls = ExportConfig
    allowed_after = ("baseline", "prune", "finetune", "quant", "eval")
    summary = "Paddle Inference + ONNX models with deploy configs, parity-checked per backend"

    def run(self, model, cfg, ctx):
        job = _ExportJob(cfg, ctx)
        inputs = list(ctx.task.input_batches("eval", limit=cfg.parity_samples))
        reference = dygraph_outputs(model, inputs)
        job.export_float(model, FP32_DIR, inputs, reference)
        if cfg.export_baseline:
            baseline, why_not = _baseline_model(ctx)
            if baseline is None:
                job.notes.append(f"{BASELINE_DIR} skipped: {why_not}")
            else:
                job.export_float(baseline, BASELINE_DIR, inputs, dygraph_outputs(baseline, inputs))
        quant_dir = _quant_output_dir(ctx)
        if "int8" in cfg.precisions and quant_dir:
            job.export_int8(quant_dir, ctx.stage_entry("quant").get("metadata") or {}, inputs, reference)
        return job.result(model)

    def dry_run(self, model, cfg, ctx):
        folders = [FP32_DIR] + ([BASELINE_DIR] if cfg.export_baseline else []) + (
            [INT8_DIR] if "int8" in cfg.precisions and ctx.stage_entry("quant") else [])
        ranges = plan_dynamic_shapes(ctx.model_cfg.task, ctx.model_cfg.Input)
        lines = [f"  folders: {', '.join(folders)}", f"  backends: {', '.join(cfg.backends)}",
                 f"  parity on {cfg.parity_samples} eval samples per backend"]
        for backend in cfg.backends:
            lines += get_backend(backend).dry_run_lines(ranges)
        return "\n".join(lines)


def _baseline_model(ctx):
    """The baseline model rebuilt from its checkpoint and None, or None and why it is not exported."""
    weight_stages = ctx.manifest.weight_stages(ctx.model_name, "export")
    if "baseline" not in weight_stages:
        return None, "no baseline checkpoint in this run"
    if weight_stages[-1] == "baseline":
        return None, "the current weights are the baseline's (fp32/ is the baseline)"
    return ctx.baseline_model(), ""


def _own_int8_model(backend, folder, available):
    """The INT8 model in ``folder`` made for ``backend`` (of its ``int8_format``), or None."""
    key = backend.int8_files_key
    return backend.model_path(folder, {key: available.get(key)}) if available.get(key) else None


def _quant_output_dir(ctx):
    entry = ctx.stage_entry("quant")
    if not entry or entry.get("status") != "done":
        return None
    return ctx.stage_dir("quant")


class _ExportJob:
    """Exports of one model into the stage's folder, with their sizes and parity reports."""

    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.task = ctx.model_cfg.task
        self.tolerance = cfg.tolerance()
        self.metrics, self.reports, self.notes, self.failures = {}, {}, [], []

    # -------------------------------------------------------------------------------------------- float

    def export_float(self, model, folder, inputs, reference):
        dest = self._folder(folder, files={"paddle": True})
        files = export_inference_model(model, dest.path, self.ctx.model_cfg.Input, self.task)
        self.metrics[f"{folder}/paddle_bytes"] = model_bytes(files)
        self._add_models(dest, {})
        precisions = ["fp32"] + (["fp16"] if "fp16" in self.cfg.precisions else [])
        deploys = [build_deploy_config(self.task, self.ctx.model_cfg.Input, backend, precision, self.cfg.settings())
                   for precision in precisions for backend in self.cfg.backends
                   if get_backend(backend).model_path(dest.path, dest.files)
                   and (precision != "fp16" or get_backend(backend).gpu)]
        self._write_bundle(dest, "fp32", deploys)
        self._check(folder, dest.path, dest.files, deploys, inputs, reference)

    # -------------------------------------------------------------------------------------------- int8

    def export_int8(self, quant_dir, quant_metadata, inputs, reference):
        """Bring the quant stage's INT8 models (those that passed its gate) into ``int8/`` and check them.

        Every backend brings its own (``Backend.int8_source``, ``export_model``): the Paddle QDQ model (Paddle
        backends), ``model.onnx`` (ONNX Runtime), an OpenVINO IR, each only when the quant stage made it and it
        passed there; a backend runs only its own INT8 file.
        """
        dest = self._folder(INT8_DIR, quant_dir=quant_dir, quant_metadata=quant_metadata)
        sources = {name: get_backend(name).int8_source(dest) for name in backend_names()}
        sources = {name: source for name, source in sources.items() if source}
        if not sources:
            self.notes.append(f"{INT8_DIR} skipped: the quant stage has no INT8 model that passed its gate")
            return
        os.makedirs(dest.path)
        self._add_models(dest, sources)
        deploys = [build_deploy_config(self.task, self.ctx.model_cfg.Input, backend, "int8", self.cfg.settings())
                   for backend in self.cfg.backends if _own_int8_model(get_backend(backend), dest.path, dest.files)]
        self._write_bundle(dest, "int8", deploys)
        self._check(INT8_DIR, dest.path, dest.files, deploys, inputs, reference)

    # -------------------------------------------------------------------------------------------- helpers

    def _folder(self, name, **values):
        return ExportFolder(name, os.path.join(self.ctx.out_dir, name), self.cfg, self.ctx.model_cfg,
                            metrics=self.metrics, notes=self.notes, fail=self._fail,
                            calibration=lambda: self.ctx.task.input_batches("calibration",
                                                                            limit=self.cfg.parity_samples),
                            **values)

    def _add_models(self, dest, sources):
        """Each backend's model into the folder ``dest``: those with a source first, then the configured ones
        without one (which may make theirs from what is there then)."""
        for name in list(sources) + [b for b in self.cfg.backends if b not in sources]:
            dest.files.update(get_backend(name).export_model(dest, sources.get(name)))

    def _write_bundle(self, dest, precision, deploys):
        write_deploy_bundle(dest.path, self.ctx.model_cfg, precision, deploys, model_files=dest.files)
        for backend in self.cfg.backends:
            get_backend(backend).finish_export(dest)

    def _check(self, folder, out, model_files, deploys, inputs, reference):
        measured = {}  # (backend really run, precision really run) -> (report, outputs)
        for deploy in deploys:
            key = f"{folder}/{deploy.backend}{'_fp16' if deploy.precision == 'fp16' else ''}"
            actual, reason = resolve_backend(deploy)
            run_precision = "fp32" if deploy.precision == "fp16" and not get_backend(actual).gpu else deploy.precision
            if (actual, run_precision) in measured:
                # the fallback runs exactly the configuration measured already
                report = dataclasses.replace(measured[actual, run_precision][0], fallback=reason)
                logger.info("%s: %s is not available here (%s); its parity is the %s run", key, deploy.backend,
                            reason, actual)
            else:
                path = get_backend(deploy.backend).model_path(out, model_files)
                outputs, predictor = predictor_outputs(path, deploy, inputs)
                report = compare_outputs(reference, outputs, self.task, run_precision, self.tolerance,
                                         backend=predictor.backend, fallback=predictor.fallback_reason)
                measured[actual, run_precision] = (report, outputs)
            self._record(key, report)
        self._cross_check(folder, measured)

    def _cross_check(self, folder, measured):
        """Each converted float model against the one it was converted from (``Backend.checked_against``)."""
        for (name, precision), (_, outputs) in measured.items():
            source = get_backend(name).checked_against
            if precision == "fp32" and (source, "fp32") in measured:
                report = compare_outputs(measured[source, "fp32"][1], outputs, self.task, "fp32", self.tolerance,
                                         backend=name)
                self._record(f"{folder}/{name}_vs_{get_backend(source).files_key}", report)

    def _record(self, key, report):
        self.reports[key] = report.to_dict()
        self.metrics[f"{key}/max_abs_diff"] = report.max_abs_diff
        self.metrics[f"{key}/mean_abs_diff"] = report.mean_abs_diff
        for name, value in report.agreement.items():
            self.metrics[f"{key}/{name}"] = value
        if report.fallback:
            self.metrics[f"{key}/ran_as"] = report.backend
        if not report.passed:
            self._fail(key, report.detail)

    def _fail(self, key, detail):
        self.failures.append(f"{key}: {detail}")
        self.reports.setdefault(key, {"passed": False, "detail": detail})

    def result(self, model):
        from compress.checkpoint import atomic_write_json

        atomic_write_json(os.path.join(self.ctx.out_dir, PARITY_FILE),
                          {"reports": self.reports, "notes": self.notes, "failures": self.failures})
        folders = sorted({key.split("/")[0] for key in self.metrics})
        metrics = {"exported": "+".join(folders), "parity_checks": len(self.reports),
                   "parity_failures": len(self.failures)}
        metrics.update(self.metrics)
        if self.failures:
            message = (f"parity out of tolerance: {self.failures[0]}"
                       + (f" (+{len(self.failures) - 1} more, see {PARITY_FILE})" if len(self.failures) > 1 else "")
                       + "; loosen the Export tolerance or drop that backend from Export.backends")
            return StageResult(model=model, metrics=metrics, passed=False, message=message)
        return StageResult(model=model, metrics=metrics, message=self._summary())

    def _summary(self):
        parts = []
        for folder in (FP32_DIR, INT8_DIR):
            size = self.metrics.get(f"{folder}/paddle_bytes")
            if size is None:
                continue
            diffs = [v for k, v in self.metrics.items() if k.startswith(f"{folder}/") and k.endswith("max_abs_diff")]
            text = f"{folder} {size / 1e6:.1f}MB"
            if folder == FP32_DIR and diffs:
                text += f" max|d| {max(diffs):.0e}"
            agreement = [v for k, v in self.metrics.items() if k.startswith(f"{folder}/") and
                         k.endswith(("sequence_agreement", "binary_map_agreement"))]
            if folder == INT8_DIR and agreement:
                text += f" agree>={min(agreement):.3f}"
            parts.append(text)
        return ", ".join(parts)


def load_parity(stage_dir):
    """The ``parity.json`` an export checkpoint holds."""
    with open(os.path.join(stage_dir, PARITY_FILE), encoding="utf-8") as handle:
        return json.load(handle)
