"""Stage ``quant``: post-training quantization into real INT8 models, judged by the INT8 predictors themselves.

The current (float) model is exported, its affine blocks are folded into the convolutions (exact; lets oneDNN and
ONNX Runtime fuse conv + activation), then quantized with calibration data two ways:

* ``paddle_cpu``: PaddleSlim ``quant_post_static`` (QDQ ops, int8 weights, scales inside the model, so TensorRT
  can use it with ``use_calib_mode=False``), run by Paddle Inference with oneDNN INT8 on convolutions;
* ``onnxruntime``: paddle2onnx of the float model, then ONNX Runtime ``quantize_static`` on the dense convs and
  matmuls (7-bit weights on CPUs without VNNI).

Each INT8 model is evaluated on the Eval split through its real INT8 predictor, never through a fake-quant graph.
When the Paddle INT8 model loses more than ``max_drop``, the layers whose quantization hurts most (measured on the
Calibration split) stay float and PTQ is retried. A backend passes when its INT8 metric is within ``max_drop`` of
the float model's metric measured through the same backend; the stage passes when at least one backend does.
Otherwise the gate fails and, with ``on_gate_fail: continue``, the float model stays head (the export stage then
exports float only). The dygraph model is never changed by PTQ.
"""
import os
import shutil
import time
from dataclasses import dataclass
from typing import List, Literal, Optional

import numpy as np

from compress.checkpoint import atomic_write_json
from compress.errors import ConfigError
from compress.measure import dir_size
from compress.stages.base import Stage, StageResult, register_stage

PADDLE_INT8_DIR = "int8"  # the export and compare stages look for these folders in the quant checkpoint
ONNX_INT8_DIR = "int8_onnx"
BACKENDS = ("paddle_cpu", "onnxruntime")


@dataclass(frozen=True)
class QuantConfig:
    """``Quant`` section."""

    method: Literal["ptq", "qat"] = "ptq"
    algo: Literal["abs_max", "hist", "avg", "KL", "mse"] = "abs_max"  # activation calibration
    hist_percent: float = 0.9999
    calibration_limit: Optional[int] = None  # Calibration samples used (null: the split's own limit)
    quantizable_op_type: List[str] = ("conv2d", "depthwise_conv2d")
    weight_quantize_type: Literal["channel_wise_abs_max", "abs_max"] = "channel_wise_abs_max"
    backends: List[Literal["paddle_cpu", "onnxruntime"]] = BACKENDS
    max_drop: float = 0.01  # largest accepted metric loss of INT8 vs float (absolute, 0.01 = 1 point)
    fallback_candidates: int = 6  # layers tried for keeping float, most input channels first
    max_skipped: int = 3  # at most this many layers stay float
    fallback_limit: Optional[int] = None  # Calibration samples used to rank the fallback candidates
    eval_limit: Optional[int] = None
    threads: int = 1  # predictor threads while evaluating
    on_gate_fail: Literal["stop", "continue"] = "continue"

    def validate(self, where):
        if self.method == "qat":
            raise ConfigError(f"{where}.method: 'qat' is not available yet; use ptq")
        if not self.backends:
            raise ConfigError(f"{where}.backends: list at least one of {', '.join(BACKENDS)}")
        if self.max_drop < 0:
            raise ConfigError(f"{where}.max_drop: must be >= 0, got {self.max_drop}")


def _predict_fn(model_dir, deploy, input_name):
    from export.predictor import create_predictor
    predictor = create_predictor(model_dir, deploy)
    return lambda images: predictor.run({input_name: images})[0]


def _fan_in_order(model_dir, op_types):
    """Quantizable conv weights sorted by fan-in (C_in x k x k), largest first.

    On AVX2 CPUs oneDNN's u8s8 kernels accumulate pairs in int16 and saturate; the layers with the largest fan-in
    are the likeliest to be hurt, so they are tried first for keeping float.
    """
    import paddle

    from compress.quant.ptq import list_quantizable_layers, static_mode
    from export.predictor import find_model_files
    layers = list_quantizable_layers(model_dir, op_types)
    files = find_model_files(model_dir)
    with static_mode(), paddle.static.scope_guard(paddle.static.Scope()):
        program, _, _ = paddle.static.load_inference_model(
            os.path.dirname(files.model_file), paddle.static.Executor(paddle.CPUPlace()),
            model_filename=os.path.basename(files.model_file),
            params_filename=os.path.basename(files.params_file))
        shapes = {name: list(program.global_block().var(name).shape) for name in layers}
    fan_in = {name: int(np.prod(shapes[name][1:])) if len(shapes.get(name, ())) == 4 else 0 for name in layers}
    return sorted(layers, key=lambda name: -fan_in[name])


@register_stage
class QuantStage(Stage):
    """Real INT8 models from PTQ, gated by their measured metric through the INT8 predictors."""

    name = "quant"
    section = "Quant"
    config_cls = QuantConfig
    allowed_after = ("baseline", "prune", "finetune", "eval")
    summary = "post-training INT8 quantization (Paddle oneDNN and ONNX Runtime)"

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

        def evaluate(model_dir, backend, precision, split="eval", limit=cfg.eval_limit):
            deploy = build_deploy_config(model_cfg.task, model_cfg.Input, backend, precision, settings)
            return task.evaluate(_predict_fn(model_dir, deploy, input_name), split=split, limit=limit,
                                 desc=f"{backend} {precision}")

        metrics, metadata, passed_backends = {}, {"backends": {}}, []
        for backend in cfg.backends:
            started = time.time()
            if backend == "paddle_cpu":
                result = self._paddle_int8(folded_dir, calib, cfg, ctx, evaluate, work)
            else:
                result = self._onnx_int8(folded_dir, calib, cfg, ctx, evaluate, work)
            result["seconds"] = round(time.time() - started, 1)
            drop = result["float_metric"] - result["int8_metric"]
            result["passed"] = drop <= cfg.max_drop
            metadata["backends"][backend] = result
            metrics[f"{main}_{backend}_fp32"] = result["float_metric"]
            metrics[f"{main}_{backend}_int8"] = result["int8_metric"]
            metrics[f"size_ratio_{backend}"] = round(result["int8_bytes"] / max(result["float_bytes"], 1), 3)
            if result["passed"]:
                passed_backends.append(backend)
        metadata["passed_backends"] = passed_backends
        best = max(cfg.backends, key=lambda b: metadata["backends"][b]["int8_metric"])
        metrics[main] = metadata["backends"][best]["int8_metric"]
        atomic_write_json(os.path.join(ctx.out_dir, "quant.json"), metadata)
        shutil.rmtree(work, ignore_errors=True)
        summary = ", ".join(
            f"{b} {metadata['backends'][b]['int8_metric']:.4f} vs fp32 {metadata['backends'][b]['float_metric']:.4f}"
            + (f" ({len(metadata['backends'][b].get('skipped_layers', []))} float layers)"
               if metadata["backends"][b].get("skipped_layers") else "")
            for b in cfg.backends)
        if not passed_backends:
            return StageResult(model=model, metrics=metrics, metadata=metadata, passed=False,
                               message=f"INT8 lost more than {cfg.max_drop:g} {main} on every backend ({summary}); "
                                       f"raise Quant.max_skipped / fallback_candidates, try algo hist, or use QAT")
        return StageResult(model=model, metrics=metrics, metadata=metadata, message=f"INT8 {summary}")

    def _paddle_int8(self, folded_dir, calib, cfg, ctx, evaluate, work):
        from compress.quant.ptq import ptq_with_fallback, layer_quant_sensitivity
        main = ctx.task.main_metric
        out_dir = os.path.join(ctx.out_dir, PADDLE_INT8_DIR)
        ptq_args = dict(algo=cfg.algo, hist_percent=cfg.hist_percent,
                        quantizable_op_type=tuple(cfg.quantizable_op_type),
                        weight_quantize_type=cfg.weight_quantize_type)
        float_metric = evaluate(folded_dir, "paddle_cpu", "fp32")[main]

        def eval_on_eval(model_dir):
            if model_dir == folded_dir:
                return float_metric
            return evaluate(model_dir, "paddle_cpu", "int8")[main]

        sensitivity = None
        if cfg.max_skipped > 0:
            def ranking():
                candidates = _fan_in_order(folded_dir, tuple(cfg.quantizable_op_type))[:cfg.fallback_candidates]
                return layer_quant_sensitivity(
                    folded_dir, calib,
                    lambda d: evaluate(d, "paddle_cpu", "int8", split="calibration", limit=cfg.fallback_limit)[main],
                    layers=candidates, work_dir=os.path.join(work, "sensitivity"), **ptq_args)
            sensitivity = _Lazy(ranking)
        result = ptq_with_fallback(folded_dir, out_dir, calib, eval_on_eval, max_drop=cfg.max_drop,
                                   max_skipped=cfg.max_skipped, sensitivity=sensitivity, **ptq_args)
        return {"float_metric": result.float_metric, "int8_metric": result.quant_metric,
                "skipped_layers": list(result.skipped_layers), "history": [list(h) for h in result.history],
                "float_bytes": dir_size(folded_dir), "int8_bytes": dir_size(out_dir), "dir": PADDLE_INT8_DIR,
                "algo": cfg.algo}

    def _onnx_int8(self, folded_dir, calib, cfg, ctx, evaluate, work):
        from compress.quant.onnx_int8 import build_onnx_int8
        main = ctx.task.main_metric
        out_dir = os.path.join(ctx.out_dir, ONNX_INT8_DIR)
        result = build_onnx_int8(folded_dir, out_dir, calib, fold=False)
        return {"float_metric": evaluate(result.float_onnx, "onnxruntime", "fp32")[main],
                "int8_metric": evaluate(result.int8_onnx, "onnxruntime", "int8")[main],
                "float_bytes": os.path.getsize(result.float_onnx), "int8_bytes": os.path.getsize(result.int8_onnx),
                "quantized_nodes": result.quantized_nodes, "reduce_range": result.reduce_range,
                "dir": ONNX_INT8_DIR, "files": {"fp32": os.path.basename(result.float_onnx),
                                                 "int8": os.path.basename(result.int8_onnx)}}


class _Lazy:
    """A sequence computed on first use: the fallback ranking costs one PTQ per candidate, so it is only
    computed when the first INT8 attempt misses the budget."""

    def __init__(self, compute):
        self._compute = compute
        self._items = None

    def _get(self):
        if self._items is None:
            self._items = self._compute()
        return self._items

    def __getitem__(self, index):
        return self._get()[index]

    def __len__(self):
        return len(self._get())

    def __bool__(self):
        return True
