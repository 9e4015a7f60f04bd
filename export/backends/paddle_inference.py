"""Paddle Inference backends: ``paddle_cpu`` (oneDNN), ``paddle_gpu`` (CUDA) and ``paddle_trt`` (TensorRT subgraphs).

A GPU or TensorRT config on a machine that cannot run it falls back (TensorRT -> GPU -> CPU with oneDNN): the
capabilities come from the Paddle build (``is_compiled_with_cuda``, the visible GPUs, ``get_trt_compile_version``),
never from exceptions. INT8 for Paddle: PaddleSlim ``quant_post_static`` (QDQ ops, int8 weights and scales inside
the model, usable by TensorRT with ``use_calib_mode=False``), run by oneDNN INT8 on the convolutions, with the layers
whose quantization hurts most kept float when the model misses ``Quant.max_metric_drop``. The export copies that
model into its ``int8/`` folder; every Paddle backend runs it there. TensorRT deploy configs carry the input's dynamic
shape ranges, and the export records a tuned shape-range plan next to them (collected on a GPU host).
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import dataclasses
import os
import shutil

import numpy as np

from compress import threads as math_threads
from compress.errors import InputError
from compress.measure import dir_size
from export.backends.base import Backend, register_backend

PADDLE_INT8_DIR = "int8"
PADDLE_FORMATS = ("pdmodel", "json")
SHAPE_RANGE_FILE = "shape_range_info.pbtxt"


class _PaddleBackend(Backend):
    formats = PADDLE_FORMATS

    def create(self, files, deploy):
        import paddle.inference as paddle_infer

        predictor = paddle_infer.create_predictor(paddle_config(files, deploy, self.name))
        input_names = predictor.get_input_names()
        output_names = predictor.get_output_names()

        def run(inputs):
            for name in input_names:
                array = np.ascontiguousarray(inputs[name])
                handle = predictor.get_input_handle(name)
                handle.reshape(array.shape)
                handle.copy_from_cpu(array)
            predictor.run()
            math_threads.restore()  # the run reset this thread's dygraph math threads
            return [predictor.get_output_handle(name).copy_to_cpu() for name in output_names]

        return run, input_names, output_names


@register_backend
class PaddleCpu(_PaddleBackend):
    name = "paddle_cpu"
    int8_dir = PADDLE_INT8_DIR
    summary = "Paddle Inference on CPU (oneDNN)"

    def ptq(self, job):
        from compress.quant.ptq import layer_quant_sensitivity, ptq_with_fallback

        cfg, main = job.options, job.main_metric
        out_dir = os.path.join(job.out_dir, PADDLE_INT8_DIR)
        ptq_args = dict(algo=cfg.algo, hist_percent=cfg.hist_percent,
                        quantizable_op_type=tuple(cfg.quantizable_op_type),
                        weight_quantize_type=cfg.weight_quantize_type)
        float_metric = job.evaluate(job.folded_dir, self.name, "fp32")[main]

        def eval_on_eval(model_dir):
            return float_metric if model_dir == job.folded_dir else job.evaluate(model_dir, self.name, "int8")[main]

        sensitivity = None
        if cfg.max_skipped > 0:
            def ranking():
                candidates = fan_in_order(job.folded_dir, tuple(cfg.quantizable_op_type))[:cfg.fallback_candidates]
                return layer_quant_sensitivity(
                    job.folded_dir, job.calibration,
                    lambda d: job.evaluate(d, self.name, "int8", split="calibration", limit=cfg.fallback_limit)[main],
                    layers=candidates, work_dir=os.path.join(job.work_dir, "sensitivity"), **ptq_args)
            sensitivity = _Lazy(ranking)
        result = ptq_with_fallback(job.folded_dir, out_dir, job.calibration, eval_on_eval,
                                   max_drop=cfg.max_metric_drop / 100.0,
                                   max_skipped=cfg.max_skipped, sensitivity=sensitivity, **ptq_args)
        return {"float_metric": result.float_metric, "int8_metric": result.quant_metric,
                "skipped_layers": list(result.skipped_layers), "history": [list(h) for h in result.history],
                "float_bytes": dir_size(job.folded_dir), "int8_bytes": dir_size(out_dir), "dir": PADDLE_INT8_DIR,
                "algo": cfg.algo, "float_model": job.folded_dir, "int8_model": out_dir}

    def from_qdq(self, job, qdq_dir):
        """The QDQ model through oneDNN INT8. When it misses ``max_metric_drop``, the same model is also run with its
        quantize/dequantize ops executed in float (no oneDNN): that metric is the quantization error alone, so the
        rest of the loss is oneDNN's INT8 execution (PP-OCRv4 rec: 0.763 as float ops, 0.590 INT8)."""
        main = job.main_metric
        out_dir = os.path.join(job.out_dir, PADDLE_INT8_DIR)
        shutil.copytree(qdq_dir, out_dir)
        result = {"float_metric": job.evaluate(job.folded_dir, self.name, "fp32")[main],
                  "int8_metric": job.evaluate(out_dir, self.name, "int8")[main],
                  "float_bytes": dir_size(job.folded_dir), "int8_bytes": dir_size(out_dir), "dir": PADDLE_INT8_DIR,
                  "float_model": job.folded_dir, "int8_model": out_dir}
        if 100.0 * (result["float_metric"] - result["int8_metric"]) > job.options.max_metric_drop:
            result["qdq_float_ops_metric"] = job.evaluate(out_dir, self.name, "fp32", mkldnn=False)[main]
        return result

    def int8_source(self, folder):
        """The quant stage's Paddle QDQ model when it passed there, whether paddle_cpu is configured or not: the other
        Paddle backends run it and ONNX Runtime may convert it."""
        source = os.path.join(folder.quant_dir, PADDLE_INT8_DIR)
        return source if folder.quant_passed(self.name) and os.path.isdir(source) else None

    def export_model(self, folder, source=None):
        if source is None:
            return {}
        from export.exporter import model_bytes

        files = copy_model(source, folder.path)
        folder.metrics[f"{folder.name}/paddle_bytes"] = model_bytes(files)
        return {self.files_key: os.path.basename(files.model_file)}


@register_backend
class PaddleGpu(_PaddleBackend):
    name = "paddle_gpu"
    gpu = True
    fallback = "paddle_cpu"
    summary = "Paddle Inference on a CUDA GPU"

    def unavailable(self, capabilities):
        if not capabilities.cuda:
            return "this Paddle build has no CUDA (paddle.is_compiled_with_cuda() is False)"
        if capabilities.gpu_count == 0:
            return "no GPU is visible (paddle.device.cuda.device_count() == 0)"
        return None


@register_backend
class PaddleTrt(PaddleGpu):
    name = "paddle_trt"
    fallback = "paddle_gpu"
    summary = "Paddle Inference with TensorRT subgraphs"

    def unavailable(self, capabilities):
        reason = super().unavailable(capabilities)
        if reason is None and not capabilities.tensorrt:
            return "this Paddle build has no TensorRT (get_trt_compile_version() == (0, 0, 0))"
        return reason

    def deploy_settings(self, deploy, task, input_cfg, settings):
        """TensorRT's engine settings and the dynamic shapes of the model input, checked against ``input_cfg``."""
        from export.deploy import plan_dynamic_shapes, validate_trt_settings
        from export.predictor import TrtConfig

        trt = TrtConfig(workspace_size=settings.trt_workspace_mb << 20, max_batch_size=input_cfg.max_batch_size,
                        min_subgraph_size=settings.trt_min_subgraph_size, use_static=settings.trt_use_static,
                        cache_dir=None, use_calib_mode=False,  # quantised models carry their scales
                        dynamic_shapes=plan_dynamic_shapes(task, input_cfg))
        deploy = dataclasses.replace(deploy, trt=trt)
        validate_trt_settings(deploy, input_cfg)
        return deploy

    def dry_run_lines(self, ranges):
        return [f"  TensorRT range {name}: min {list(r[0])} opt {list(r[1])} max {list(r[2])}"
                for name, r in ranges.items()]

    def finish_export(self, folder):
        """The tuned shape-range plan in ``deploy.yml``: on a GPU build the real ranges collected on calibration
        images and set in the TensorRT configs (PaddleOCR's tuned dynamic shape approach), else how to collect
        them."""
        from export.deploy import attach_shape_range_file, record_shape_range_plan, shape_range_plan
        from export.predictor import detect_capabilities

        caps = detect_capabilities()
        if not (caps.cuda and caps.gpu_count):
            record_shape_range_plan(folder.path, shape_range_plan(folder.path, folder.model_cfg.source_file))
            return
        collect_shape_range_file(folder.path, folder.calibration())
        attach_shape_range_file(folder.path, self.name)


def paddle_config(files, deploy, backend):
    """The ``paddle.inference.Config`` of ``deploy`` for the backend really used (``paddle_cpu`` after a
    fallback keeps oneDNN on, the fast CPU path the fallback notice promises)."""
    import paddle.inference as paddle_infer

    config = paddle_infer.Config(files.model_file, files.params_file)
    config.disable_glog_info()
    if backend == PaddleCpu.name:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(deploy.threads)
        if deploy.mkldnn or deploy.backend != backend:
            config.enable_mkldnn()
            if deploy.precision == "int8":
                if deploy.int8_ops:
                    config.enable_mkldnn_int8(set(deploy.int8_ops))
                else:
                    config.enable_mkldnn_int8()
    else:
        precision = {"fp32": paddle_infer.PrecisionType.Float32, "fp16": paddle_infer.PrecisionType.Half,
                     "int8": paddle_infer.PrecisionType.Int8}[deploy.precision]
        config.enable_use_gpu(deploy.gpu_memory_mb, deploy.gpu_id)
        if backend == PaddleTrt.name:
            _enable_tensorrt(config, deploy.trt, precision, files)
    for pass_name in deploy.delete_passes:
        config.delete_pass(pass_name)
    return config


def _enable_tensorrt(config, trt, precision, files):
    config.enable_tensorrt_engine(workspace_size=trt.workspace_size, max_batch_size=trt.max_batch_size,
                                  min_subgraph_size=trt.min_subgraph_size, precision_mode=precision,
                                  use_static=trt.use_static, use_calib_mode=trt.use_calib_mode)
    if trt.use_static:
        config.set_optim_cache_dir(trt.cache_dir or os.path.join(os.path.dirname(files.model_file), "_trt_cache"))
    if trt.shape_range_file:
        config.enable_tuned_tensorrt_dynamic_shape(trt.shape_range_file, True)
    elif trt.dynamic_shapes:
        shapes = {name: [list(s) for s in triple] for name, triple in trt.dynamic_shapes.items()}
        config.set_trt_dynamic_shape_info({n: s[0] for n, s in shapes.items()},
                                          {n: s[2] for n, s in shapes.items()},
                                          {n: s[1] for n, s in shapes.items()})


def collect_shape_range_file(model_dir, batches, path=None, allow_cpu=False):
    """Run ``batches`` through the model with ``Config.collect_shape_range_info`` and write the ranges.

    The ranges are recorded on the GPU graph (needs a CUDA build and a visible GPU). ``allow_cpu`` records them
    on the CPU graph instead, which only tests the mechanics: its tensor names do not match TensorRT's graph.

    Args:
        model_dir: exported Paddle model folder.
        batches: iterable of NCHW float32 arrays (calibration images, preprocessed as in deploy.yml).
        path: output file (default ``<model_dir>/shape_range_info.pbtxt``).
        allow_cpu: see above.

    Returns:
        the written path.

    Raises:
        InputError: without a usable GPU (unless ``allow_cpu``), or when no batch was given.
    """
    import paddle.inference as paddle_infer

    from export.predictor import DeployConfig, detect_capabilities, find_model_files

    caps = detect_capabilities()
    if not (caps.cuda and caps.gpu_count) and not allow_cpu:
        raise InputError("collecting TensorRT shape ranges needs paddlepaddle-gpu and a visible GPU; this build "
                         f"has cuda={caps.cuda}, gpus={caps.gpu_count}")
    backend = PaddleGpu.name if caps.cuda and caps.gpu_count else PaddleCpu.name
    path = path or os.path.join(model_dir, SHAPE_RANGE_FILE)
    files = find_model_files(model_dir)
    # the backend's own config; only the collection switch is added here
    config = paddle_config(files, DeployConfig(backend=backend, mkldnn=False), backend)
    config.collect_shape_range_info(path)
    predictor = paddle_infer.create_predictor(config)
    count = 0
    for batch in batches:
        for name in predictor.get_input_names():
            handle = predictor.get_input_handle(name)
            handle.reshape(batch.shape)
            handle.copy_from_cpu(np.ascontiguousarray(batch, dtype="float32"))
        predictor.run()
        count += 1
    if not count:
        raise InputError("no calibration batch to collect shape ranges from")
    del predictor  # the file is written when the predictor is destroyed
    return path


def copy_model(source, dest):
    """Copy the Paddle inference model in ``source`` (program, parameters and their ``.info``) into ``dest``;
    returns the copy's :class:`export.backends.base.ModelFiles`."""
    from export.predictor import find_model_files

    files = find_model_files(source)
    os.makedirs(dest, exist_ok=True)
    for path in (files.model_file, files.params_file, (files.params_file or "") + ".info"):
        if path and os.path.isfile(path):
            shutil.copy2(path, os.path.join(dest, os.path.basename(path)))
    return find_model_files(dest)


def fan_in_order(model_dir, op_types):
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
