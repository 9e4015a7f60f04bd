"""Stage ``quant``: INT8 models (post-training or quantization-aware), judged by the INT8 predictors themselves.

``method: ptq`` (post-training quantization): the current (float) model is exported, its affine blocks are folded
into the convolutions (exact; lets oneDNN and ONNX Runtime fuse conv + activation), then quantized with
calibration data two ways:

* ``paddle_cpu``: PaddleSlim ``quant_post_static`` (QDQ ops, int8 weights, scales inside the model, so TensorRT
  can use it with ``use_calib_mode=False``), run by Paddle Inference with oneDNN INT8 on convolutions;
* ``onnxruntime``: paddle2onnx of the float model, then ONNX Runtime ``quantize_static`` on the dense convs and
  matmuls (7-bit weights on CPUs without VNNI);
* ``openvino``: NNCF post-training quantization of the OpenVINO model; with ``weight_rounding: gptq`` its input is
  a copy whose dense-conv weights were first GPTQ-rounded onto NNCF's grid (:mod:`compress.quant.weight_rounding`).

When the Paddle INT8 model loses more than ``max_metric_drop``, the layers whose quantization hurts most (measured on the
Calibration split) stay float and PTQ is retried.

``method: qat`` (quantization-aware training, ``qat:`` keys): a copy of the model with BN and affine layers folded
into its convs is wrapped with PaddleSlim's dygraph fake-quant layers (channel-wise abs-max weights,
moving-average abs-max activations), its activation scales are started from the Calibration split, and it is
trained for a few low-LR steps by :class:`finetune.trainer.Trainer` (resumable, NaN guard, best fake-quant weights
on the Eval subset). The result is exported once as a Paddle QDQ model (``onnx_format``: int8 weights and scales
inside) which serves both backends: Paddle Inference with oneDNN INT8 runs it, and paddle2onnx converts it (in a
subprocess) for ONNX Runtime. See :mod:`compress.quant.qat` for why the folding and the scale reset are needed.

Either way, each INT8 model is evaluated on the Eval split through its real INT8 predictor, never through a
fake-quant graph (QAT also records the fake-quant dygraph metric, to tell a training problem from a backend one).
A backend passes when its INT8 metric is within ``max_metric_drop`` points of the float model's metric measured through the same
backend; the stage passes when at least one backend does. Otherwise the gate fails and, with
``on_gate_fail: continue``, the float model stays head (the export stage then exports float only). The dygraph
model is never changed: the INT8 models sit beside it in the checkpoint (``int8/``, ``int8_onnx/``).
"""
import os
import re
import shutil
import time
from dataclasses import dataclass, replace
from typing import ClassVar, List, Literal, Optional


from compress.checkpoint import atomic_write_json
from compress.config import IN_POINTS
from compress.errors import ConfigError
from compress.fidelity import validate_fidelity_limits
from compress.stages.base import Stage, StageResult, register_stage
from export.backends import PtqJob, backend_names, get_backend
from export.backends.openvino_runtime import FLOAT_OP_TYPES as OPENVINO_FLOAT_OP_TYPES
from finetune.trainer import DistillConfig, TaskTrainConfig

DEFAULT_BACKENDS = ("paddle_cpu", "onnxruntime")


@dataclass(frozen=True)
class QatConfig(TaskTrainConfig):
    """``Quant.qat``: the fine-tune training keys (:class:`~finetune.trainer.TaskTrainConfig`) with defaults sized for
    a short QAT run (distillation from the float model on), plus what to quantize. ``Quant.weight_quantize_type`` and
    ``Quant.calibration_limit`` (samples that start the activation scales) apply too."""

    max_steps: Optional[int] = 30
    lr: float = 2e-5  # a fiftieth of PP-OCRv4's training LR: QAT only adapts the weights to the rounding
    warmup_steps: int = 3
    patience: Optional[int] = None
    # from the float model itself: PP-OCRv4 rec's fake-quant acc rose 0.78 -> 0.84 with it, never rose without it
    distill: DistillConfig = DistillConfig(enabled=True)
    layers: List[Literal["Conv2D", "Linear"]] = ("Conv2D",)  # Linear: oneDNN keeps fc/matmul float anyway
    pact: bool = False  # learn a clipping threshold for each quantized layer's input
    fold: bool = True  # fold BN and scalar affine layers into convs first (needed for correct INT8 on PP-LCNetV3)
    moving_rate: float = 0.9  # decay of the activation scales' moving average

    def validate(self, where):
        super().validate(where)
        if not self.layers:
            raise ConfigError(f"{where}.layers: list at least one of Conv2D, Linear")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"{where}.layers: {list(self.layers)} lists a layer type twice")
        if not 0.0 < self.moving_rate < 1.0:
            raise ConfigError(f"{where}.moving_rate: must be in (0, 1), got {self.moving_rate}")


@dataclass(frozen=True)
class QuantConfig:
    """``Quant`` section. ``algo``, ``hist_percent``, ``quantizable_op_type`` and the ``fallback_*`` /
    ``max_skipped`` keys are PTQ settings; ``qat`` holds the QAT settings."""

    method: Literal["ptq", "qat"] = "ptq"
    algo: Literal["abs_max", "hist", "avg", "KL", "mse"] = "abs_max"  # activation calibration
    hist_percent: float = 0.9999
    calibration_limit: Optional[int] = None  # Calibration samples used (null: the split's own limit)
    quantizable_op_type: List[str] = ("conv2d", "depthwise_conv2d")
    weight_quantize_type: Literal["channel_wise_abs_max", "abs_max"] = "channel_wise_abs_max"
    backends: List[str] = DEFAULT_BACKENDS  # registered backends with an INT8 recipe (export.backends)
    max_metric_drop: float = 1.0  # largest accepted loss of INT8 vs float, in points of the main metric
    # largest accepted loss of agreement with the baseline (Fidelity split), INT8 vs float on the same backend,
    # in points: overall, and for the worst script (rec: latin / cjk / mixed). null: not gated
    max_fidelity_drop: Optional[float] = None
    max_script_fidelity_drop: Optional[float] = None
    # the Fidelity lines the gate counts: stage (Fidelity.stage_limit of them, spread over the split) or all (those
    # the compare stage judges the exported model on: a per-script gate on a few dozen lines passes by chance)
    fidelity_split: Literal["stage", "all"] = "stage"
    fallback_candidates: int = 6  # layers tried for keeping float, most input channels first
    max_skipped: int = 3  # at most this many layers stay float
    fallback_limit: Optional[int] = None  # Calibration samples used to rank the fallback candidates
    bias_correction: Literal["fast", "full"] = "fast"  # NNCF's (OpenVINO INT8): fast, or its full BiasCorrection
    # PTQ weights of the backends that derive their grid as max|W[c]| / 127 (OpenVINO): nearest (the backend's own
    # rounding) or gptq (each conv's rounding errors compensated on its calibration inputs first,
    # compress.quant.weight_rounding)
    weight_rounding: Literal["nearest", "gptq"] = "nearest"
    weight_rounding_damp: float = 0.01
    # OpenVINO INT8: convs doing fewer multiply-adds per activation element stay float (0: all but depth-wise)
    openvino_min_macs_per_element: float = 0.0
    # OpenVINO INT8: OpenVINO op types NNCF leaves float (depth-wise convs, the matrix products of rec's neck / head)
    openvino_float_op_types: List[str] = OPENVINO_FLOAT_OP_TYPES
    eval_limit: Optional[int] = None
    threads: int = 1  # predictor threads while evaluating
    on_gate_fail: Literal["stop", "continue"] = "continue"
    qat: QatConfig = QatConfig()

    RENAMED_KEYS: ClassVar[dict] = {"max_drop": ("max_metric_drop", IN_POINTS)}

    def validate(self, where):
        with_recipe = [n for n in backend_names() if get_backend(n).int8_dir]
        if not self.backends:
            raise ConfigError(f"{where}.backends: list at least one of {', '.join(with_recipe)}")
        for name in self.backends:
            if not get_backend(name, f"{where}.backends").int8_dir:
                raise ConfigError(f"{where}.backends: {name} has no INT8 recipe; use {', '.join(with_recipe)}")
        if len(set(self.backends)) != len(self.backends):
            raise ConfigError(f"{where}.backends: {list(self.backends)} lists a backend twice")
        if self.max_metric_drop < 0:
            raise ConfigError(f"{where}.max_metric_drop: must be >= 0 points, got {self.max_metric_drop}")
        if not self.weight_rounding_damp > 0:
            raise ConfigError(f"{where}.weight_rounding_damp: must be > 0, got {self.weight_rounding_damp}")
        for op_type in self.openvino_float_op_types:
            if not re.fullmatch(r"[A-Z][A-Za-z0-9]*", str(op_type)):
                raise ConfigError(f"{where}.openvino_float_op_types: {op_type!r} is not an OpenVINO op type; use "
                                  f"names such as {', '.join(OPENVINO_FLOAT_OP_TYPES)}")
        validate_fidelity_limits(self, where)


def _predict_fn(model_dir, deploy, input_name):
    from export.predictor import create_predictor
    predictor = create_predictor(model_dir, deploy)
    return lambda images: predictor.run({input_name: images})[0]


@register_stage
class QuantStage(Stage):
    """Real INT8 models from PTQ or QAT, gated by their measured metric through the INT8 predictors."""

    name = "quant"
    section = "Quant"
    config_cls = QuantConfig
    allowed_after = ("baseline", "prune", "finetune", "eval")
    summary = "INT8 quantization, post-training or quantization-aware (Paddle oneDNN and ONNX Runtime)"

    def run(self, model, cfg, ctx):
        from compress.quant.fold import fold_affine_into_conv
        from export.deploy import build_deploy_config, DeploySettings
        from export.exporter import export_inference_model

        task, model_cfg = ctx.task, ctx.model_cfg
        input_name = model_cfg.Input.name
        main = task.main_metric
        work = os.path.join(ctx.work_dir, "quant")
        shutil.rmtree(work, ignore_errors=True)
        float_dir = os.path.join(work, "float")
        export_inference_model(model, float_dir, model_cfg.Input, model_cfg.task)
        folded_dir = fold_affine_into_conv(float_dir, os.path.join(work, "folded")).model_dir
        calib = [{input_name: batch} for batch in
                 task.input_batches("calibration", limit=cfg.calibration_limit)]
        settings = DeploySettings(threads=cfg.threads)

        def evaluate(model_dir, backend, precision, split="eval", limit=cfg.eval_limit, mkldnn=True):
            deploy = build_deploy_config(model_cfg.task, model_cfg.Input, backend, precision,
                                         settings if mkldnn else replace(settings, mkldnn=False))
            return task.evaluate(_predict_fn(model_dir, deploy, input_name), split=split, limit=limit,
                                 desc=f"{backend} {precision}")

        metrics, metadata, passed_backends = {}, {"method": cfg.method, "backends": {}}, []
        qdq_dir = None
        if cfg.method == "qat":
            qdq_dir = os.path.join(work, "qat_int8")
            metadata["qat"] = self._train_qat(model, calib, cfg, ctx, qdq_dir)
            metrics[f"{main}_fake_quant"] = metadata["qat"]["fake_quant_metric"]
            metrics["qat_steps"] = metadata["qat"]["steps"]
        rounded_dir, rounding = None, None
        grid_backends = [b for b in cfg.backends if get_backend(b).int8_weight_grid]
        if cfg.method == "ptq" and cfg.weight_rounding == "gptq" and grid_backends:
            rounded_dir, rounding = self._gptq_rounded(model, calib, cfg, ctx, work, grid_backends[0])
            metadata["weight_rounding"] = rounding
        job = PtqJob(folded_dir=folded_dir, out_dir=ctx.out_dir, work_dir=work, calibration=calib, evaluate=evaluate,
                     main_metric=main, task=model_cfg.task, options=cfg, rounded_dir=rounded_dir)
        for backend in cfg.backends:
            started = time.time()
            result = get_backend(backend).from_qdq(job, qdq_dir) if qdq_dir else get_backend(backend).ptq(job)
            result["seconds"] = round(time.time() - started, 1)
            if qdq_dir:
                result["int8_vs_fake_quant"] = round(result["int8_metric"] - metadata["qat"]["fake_quant_metric"], 6)
            drop = result["float_metric"] - result["int8_metric"]
            result["passed"] = 100.0 * drop <= cfg.max_metric_drop + 1e-9
            fidelity_failure = self._fidelity(result, backend, cfg, ctx, settings, metrics)
            if fidelity_failure:
                result["passed"], result["fidelity_gate"] = False, fidelity_failure
            metadata["backends"][backend] = result
            metrics[f"{main}_{backend}_fp32"] = result["float_metric"]
            metrics[f"{main}_{backend}_int8"] = result["int8_metric"]
            metrics[f"size_ratio_{backend}"] = round(result["int8_bytes"] / max(result["float_bytes"], 1), 3)
            if result["passed"]:
                passed_backends.append(backend)
        metadata["passed_backends"] = passed_backends
        best = max(cfg.backends, key=lambda b: metadata["backends"][b]["int8_metric"])
        metrics[main] = metadata["backends"][best]["int8_metric"]
        if "fidelity" in metadata["backends"][best]:
            metrics.update(metadata["backends"][best]["fidelity"]["int8"])
        atomic_write_json(os.path.join(ctx.out_dir, "quant.json"), metadata)
        shutil.rmtree(work, ignore_errors=True)
        summary = ", ".join(
            f"{b} {metadata['backends'][b]['int8_metric']:.4f} vs fp32 {metadata['backends'][b]['float_metric']:.4f}"
            + (f" ({len(metadata['backends'][b].get('skipped_layers', []))} float layers)"
               if metadata["backends"][b].get("skipped_layers") else "")
            + (f", fidelity {metadata['backends'][b]['fidelity']['int8']['fidelity']:.4f} vs fp32 "
               f"{metadata['backends'][b]['fidelity']['fp32']['fidelity']:.4f}"
               if "fidelity" in metadata["backends"][b] else "")
            for b in cfg.backends)
        fidelity_failures = "; ".join(f"{b}: {metadata['backends'][b]['fidelity_gate']}" for b in cfg.backends
                                      if metadata["backends"][b].get("fidelity_gate"))
        if qdq_dir:
            qat = metadata["qat"]
            summary = f"QAT {qat['steps']} steps, fake-quant {qat['fake_quant_metric']:.4f}; {summary}"
        if rounding:
            summary = f"{summary}; {', '.join(grid_backends)} weights: {rounding['summary']}"
        if not passed_backends:
            advice = ("raise Quant.qat.max_steps or lr, or quantize fewer layer types" if qdq_dir else
                      "raise Quant.max_skipped / fallback_candidates, try algo hist, or use method qat")
            return StageResult(model=model, metrics=metrics, metadata=metadata, passed=False,
                               message=f"INT8 lost more than {cfg.max_metric_drop:g} points of {main} "
                                       f"{'or its fidelity budget ' if fidelity_failures else ''}on every backend "
                                       f"({summary}{'; ' + fidelity_failures if fidelity_failures else ''}); "
                                       f"{advice}")
        return StageResult(model=model, metrics=metrics, metadata=metadata, message=f"INT8 {summary}")

    def _gptq_rounded(self, model, calib, cfg, ctx, work, backend):
        """The float model with its dense-conv weights GPTQ-rounded onto ``backend``'s INT8 grid, exported and folded
        as ``folded_dir`` is: (folder, rounding record). ``model`` itself is restored afterwards."""
        from compress.quant.fold import fold_affine_into_conv
        from compress.quant.weight_rounding import round_to_int8_grid
        from export.exporter import export_inference_model

        input_name = ctx.model_cfg.Input.name
        saved = {name: value.numpy().copy() for name, value in model.state_dict().items()}
        try:
            report = round_to_int8_grid(model, [item[input_name] for item in calib], damp=cfg.weight_rounding_damp,
                                        skip=get_backend(backend).weight_rounding_skip(cfg),
                                        show_progress=ctx.task.show_progress)
            float_dir = os.path.join(work, "rounded_float")
            export_inference_model(model, float_dir, ctx.model_cfg.Input, ctx.model_cfg.task)
        finally:
            for name, value in model.state_dict().items():
                value.set_value(saved[name])
        folded = fold_affine_into_conv(float_dir, os.path.join(work, "rounded_folded")).model_dir
        return folded, dict(report.to_json(), summary=report.summary())

    def _fidelity(self, result, backend, cfg, ctx, settings, metrics):
        """Agreement with the baseline of the float and the INT8 model on ``backend``, recorded in ``result`` and
        ``metrics``; returns the fidelity gate's failure message (INT8 vs float), or None."""
        from compress.fidelity import fidelity_gate
        from compress.stages.evaluation import fidelity_metrics
        from export.deploy import build_deploy_config

        paths = {"fp32": result.pop("float_model"), "int8": result.pop("int8_model")}
        if ctx.model_cfg.Fidelity is None:
            return None
        measured = {}
        for precision, path in paths.items():
            deploy = build_deploy_config(ctx.model_cfg.task, ctx.model_cfg.Input, backend, precision, settings)
            measured[precision] = fidelity_metrics(ctx, _predict_fn(path, deploy, ctx.model_cfg.Input.name),
                                                   desc=f"fidelity {backend} {precision}",
                                                   whole_split=cfg.fidelity_split == "all")
            for key, value in measured[precision].items():
                if not key.startswith("fidelity_lines") and key != "fidelity_boxes":
                    metrics[f"{key}_{backend}_{precision}"] = value
        result["fidelity"] = measured
        return fidelity_gate(measured["int8"], cfg.max_fidelity_drop, cfg.max_script_fidelity_drop,
                             reference_metrics=measured["fp32"], setting="Quant.max_fidelity_drop")

    def _train_qat(self, model, calib, cfg, ctx, qdq_dir):
        """Fake-quant training of a folded copy of ``model``, exported as a Paddle QDQ model into ``qdq_dir``.

        Returns:
            the metadata of the run: folding, calibration, steps, fake-quant metrics, timings.
        """
        import copy

        import paddle

        from compress.quant.qat import calibrate_observers, export_qat_model, prepare_qat
        from compress.tasks import dygraph_predictor
        from export.deploy import export_input_shape
        from finetune.stage import build_task_trainer

        started = time.time()
        qat_cfg, input_cfg, main = cfg.qat, ctx.model_cfg.Input, ctx.task.main_metric
        qat = prepare_qat(model, ctx.task.example_input(), layer_types=qat_cfg.layers,
                          weight_quantize_type=cfg.weight_quantize_type, moving_rate=qat_cfg.moving_rate,
                          pact=qat_cfg.pact, fold=qat_cfg.fold)
        calibration_batches = calibrate_observers(qat.model, [batch[input_cfg.name] for batch in calib])
        trainer = build_task_trainer(qat.model, qat_cfg, ctx, lambda: copy.deepcopy(model),
                                     os.path.join(ctx.work_dir, "qat") if ctx.work_dir else None, "Quant.qat")
        result = trainer.fit()
        fake_quant = ctx.task.evaluate(dygraph_predictor(qat.model), limit=cfg.eval_limit,
                                       desc=f"fake-quant {ctx.model_name}")[main]
        spec = paddle.static.InputSpec(export_input_shape(ctx.model_cfg.task, input_cfg), "float32", input_cfg.name)
        export_qat_model(qat, qdq_dir, [spec])
        info = {"layers": list(qat_cfg.layers), "quantized_layers": qat.quantized_layers, "pact": qat_cfg.pact,
                "calibration_batches": calibration_batches, "steps": result.steps, "best_step": result.best_step,
                "resumed_from": result.resumed_from, "train_loss": round(result.train_loss, 6),
                "seconds_per_step": round(result.seconds_per_step, 4), "fake_quant_metric": fake_quant,
                "select_start_metric": result.start_metrics.get(main),
                "select_best_metric": result.best_metrics.get(main), "seconds": round(time.time() - started, 1)}
        if qat.folded is not None:
            info["folded"] = {"batch_norms": qat.folded.batch_norms, "affines": qat.folded.affines,
                              "max_abs_diff": qat.folded.max_abs_diff}
        return info
