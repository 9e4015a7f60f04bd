"""One predictor interface over Paddle Inference (CPU/oneDNN, GPU, TensorRT) and ONNX Runtime.

``create_predictor(model_dir, DeployConfig(...))`` picks the backend. What the machine can do is detected up
front (CUDA build, GPU count, TensorRT build, ONNX Runtime providers); a GPU or TensorRT config on a machine that
cannot run it falls back to CPU (oneDNN) with one logged notice naming the reason, instead of relying on the
exceptions or silent fallbacks of the libraries.
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import dataclasses
import functools
import glob
import logging
import os

import numpy as np

from compress import threads as math_threads
from compress.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

BACKENDS = ("paddle_cpu", "paddle_gpu", "paddle_trt", "onnxruntime")
PRECISIONS = ("fp32", "fp16", "int8")
# self_attention_fuse_pass executes AVX-512 code while matching and dies with SIGILL on CPUs without AVX-512
# (seen on AMD EPYC with PP-OCRv4 rec); the fused op only helps AVX-512 machines anyway.
DEFAULT_DELETE_PASSES = ("self_attention_fuse_pass",)
# oneDNN INT8 quantises every op type it supports by default; its fc/matmul kernels broke PP-OCRv4 rec
# (recognised strings agreeing with float: 94% with convs only, 47% with everything).
DEFAULT_INT8_OPS = ("conv2d", "fused_conv2d", "depthwise_conv2d")


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    """Files of one inference model.

    Attributes:
        model_file: program file (``*.pdmodel``, ``*.json`` for PIR programs, or ``*.onnx``).
        params_file: ``*.pdiparams`` next to it (None for ONNX).
        format: ``"pdmodel"``, ``"json"`` or ``"onnx"``.
    """

    model_file: str
    params_file: "str | None"
    format: str


def find_model_files(model_dir):
    """Detect the inference model files in ``model_dir`` from what is there.

    Paddle programs win over ONNX when both are present; ``inference.*`` wins over other names.

    Args:
        model_dir: a folder, or the path of an ``.onnx`` / ``.pdmodel`` / ``.json`` file.

    Returns:
        ModelFiles.

    Raises:
        InputError: when no model, or several candidates with no ``inference.*`` among them, are found.
    """
    model_dir = str(model_dir)
    if os.path.isfile(model_dir):
        return _files_for_program(model_dir)
    if not os.path.isdir(model_dir):
        raise InputError(f"model folder {model_dir!r} does not exist: pass a folder holding an exported "
                         "inference model (*.pdmodel/*.json + *.pdiparams, or *.onnx)")
    for pattern, needs_params in (("*.pdmodel", False), ("*.json", True), ("*.onnx", False)):
        candidates = sorted(glob.glob(os.path.join(model_dir, pattern)))
        if needs_params:  # any JSON could sit in a model folder; a PIR program has its params beside it
            candidates = [c for c in candidates if os.path.exists(_params_for(c))]
        if candidates:
            return _files_for_program(_pick_one(candidates, model_dir))
    present = ", ".join(sorted(os.listdir(model_dir))[:10]) or "nothing"
    raise InputError(f"no inference model in {model_dir!r} (found: {present}); export one with "
                     "paddle.jit.save / tools/export, or point to the folder holding *.pdmodel + *.pdiparams")


def _params_for(program_file):
    return os.path.splitext(program_file)[0] + ".pdiparams"


def _pick_one(candidates, model_dir):
    if len(candidates) == 1:
        return candidates[0]
    preferred = [c for c in candidates if os.path.basename(c).startswith("inference.")]
    if len(preferred) == 1:
        return preferred[0]
    names = ", ".join(os.path.basename(c) for c in candidates)
    raise InputError(f"several models in {model_dir!r} ({names}): pass the path of the one to use")


def _files_for_program(path):
    extension = os.path.splitext(path)[1].lower()
    if extension == ".onnx":
        return ModelFiles(path, None, "onnx")
    if extension not in (".pdmodel", ".json"):
        raise InputError(f"{path!r} is not an inference model file (expected .pdmodel, .json or .onnx)")
    params = _params_for(path)
    return ModelFiles(path, params if os.path.exists(params) else None, extension.lstrip("."))


@dataclasses.dataclass(frozen=True)
class TrtConfig:
    """TensorRT settings for the ``paddle_trt`` backend.

    Attributes:
        workspace_size: TensorRT builder workspace in bytes.
        max_batch_size: largest batch the engine accepts.
        min_subgraph_size: smallest op group handed to TensorRT.
        use_static: serialise built engines into ``cache_dir`` and reuse them.
        cache_dir: folder for serialised engines (None: next to the model).
        use_calib_mode: run TensorRT's own INT8 calibration; False uses the scales stored in a quantised model.
        dynamic_shapes: input name -> (min_shape, opt_shape, max_shape).
        shape_range_file: a tuned shape-range file (``collect_shape_range_info``), used instead of dynamic_shapes.
    """

    workspace_size: int = 1 << 30
    max_batch_size: int = 8
    min_subgraph_size: int = 3
    use_static: bool = False
    cache_dir: "str | None" = None
    use_calib_mode: bool = False
    dynamic_shapes: dict = dataclasses.field(default_factory=dict)
    shape_range_file: "str | None" = None


@dataclasses.dataclass(frozen=True)
class DeployConfig:
    """How to run an inference model.

    Attributes:
        backend: one of ``paddle_cpu``, ``paddle_gpu``, ``paddle_trt``, ``onnxruntime``.
        precision: ``fp32``, ``fp16`` (GPU/TensorRT) or ``int8`` (quantised models).
        threads: CPU math threads.
        mkldnn: use oneDNN on CPU (Paddle backends).
        delete_passes: Paddle IR passes to switch off.
        int8_ops: op types oneDNN runs in INT8 (``precision='int8'``); empty means every supported type.
        gpu_id: GPU device index.
        gpu_memory_mb: initial GPU memory pool in MB.
        trt: TensorRT settings.
    """

    backend: str = "paddle_cpu"
    precision: str = "fp32"
    threads: int = 1
    mkldnn: bool = True
    delete_passes: tuple = DEFAULT_DELETE_PASSES
    int8_ops: tuple = DEFAULT_INT8_OPS
    gpu_id: int = 0
    gpu_memory_mb: int = 500
    trt: TrtConfig = dataclasses.field(default_factory=TrtConfig)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"deploy backend {self.backend!r} is unknown; use one of {', '.join(BACKENDS)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"deploy precision {self.precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"deploy threads must be a positive integer, got {self.threads!r}")
        object.__setattr__(self, "delete_passes", tuple(self.delete_passes))
        object.__setattr__(self, "int8_ops", tuple(self.int8_ops))

    def to_dict(self):
        """Plain dict (JSON/YAML safe): tuples become lists."""
        data = dataclasses.asdict(self)
        data["delete_passes"] = list(self.delete_passes)
        data["int8_ops"] = list(self.int8_ops)
        data["trt"]["dynamic_shapes"] = {name: [list(s) for s in shapes]
                                         for name, shapes in self.trt.dynamic_shapes.items()}
        return data

    @classmethod
    def from_dict(cls, data):
        """Build from :meth:`to_dict` output; unknown keys raise ConfigError naming the nearest valid key."""
        data = dict(data)
        _check_keys(data, cls, "Deploy")
        trt = dict(data.pop("trt", None) or {})
        _check_keys(trt, TrtConfig, "Deploy.trt")
        trt["dynamic_shapes"] = {name: tuple(tuple(int(d) for d in s) for s in shapes)
                                 for name, shapes in (trt.get("dynamic_shapes") or {}).items()}
        for key in ("delete_passes", "int8_ops"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(trt=TrtConfig(**trt), **data)


def _check_keys(data, klass, where):
    import difflib

    valid = [f.name for f in dataclasses.fields(klass)]
    for key in data:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {near[0]!r}?" if near else f"valid keys: {', '.join(valid)}"
            raise ConfigError(f"unknown key {where}.{key}: {hint}")


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What this machine's inference libraries can run."""

    cuda: bool
    gpu_count: int
    tensorrt: bool
    ort_providers: tuple


@functools.lru_cache(maxsize=1)
def detect_capabilities():
    """Probe the Paddle build and ONNX Runtime once (no exception-driven detection)."""
    import paddle
    import paddle.inference as paddle_infer

    cuda = bool(paddle.is_compiled_with_cuda())
    gpu_count = paddle.device.cuda.device_count() if cuda else 0
    tensorrt = cuda and tuple(paddle_infer.get_trt_compile_version()) != (0, 0, 0)
    try:
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
    except ImportError:
        providers = ()
    return Capabilities(cuda, gpu_count, tensorrt, providers)


def resolve_backend(deploy, capabilities=None):
    """The backend that will really run ``deploy`` here, and the reason when it differs (else None)."""
    caps = capabilities or detect_capabilities()
    if deploy.backend in ("paddle_gpu", "paddle_trt"):
        if not caps.cuda:
            return "paddle_cpu", "this Paddle build has no CUDA (paddle.is_compiled_with_cuda() is False)"
        if caps.gpu_count == 0:
            return "paddle_cpu", "no GPU is visible (paddle.device.cuda.device_count() == 0)"
        if deploy.backend == "paddle_trt" and not caps.tensorrt:
            return "paddle_gpu", "this Paddle build has no TensorRT (get_trt_compile_version() == (0, 0, 0))"
    return deploy.backend, None


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


def create_predictor(model_dir, deploy=None):
    """Create a predictor for the inference model in ``model_dir``.

    Args:
        model_dir: model folder or file (see :func:`find_model_files`).
        deploy: DeployConfig; default is Paddle on CPU with oneDNN, FP32, one thread.

    Returns:
        Predictor.

    Raises:
        InputError: no model found, or an ONNX model given to a Paddle backend (and vice versa).
    """
    deploy = deploy or DeployConfig()
    files = find_model_files(model_dir)
    backend, reason = resolve_backend(deploy)
    if reason:
        logger.warning("deploy backend %s is not available: %s; running on %s%s instead",
                       deploy.backend, reason, backend, " with oneDNN" if backend == "paddle_cpu" else "")
    if backend == "onnxruntime":
        if files.format != "onnx":
            raise InputError(f"backend onnxruntime needs an .onnx model but {model_dir!r} holds {files.format}; "
                             "convert it with compress.quant.onnx_int8.export_onnx")
        return _onnxruntime_predictor(files, deploy, reason)
    if files.format == "onnx":
        raise InputError(f"backend {backend} needs a Paddle model (*.pdmodel/*.json) but {model_dir!r} holds ONNX; "
                         "use backend onnxruntime")
    return _paddle_predictor(files, deploy, backend, reason)


def _paddle_config(files, deploy, backend):
    import paddle.inference as paddle_infer

    config = paddle_infer.Config(files.model_file, files.params_file)
    config.disable_glog_info()
    if backend == "paddle_cpu":
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(deploy.threads)
        # a GPU/TRT request that fell back keeps the CPU fast path (oneDNN) the notice promises
        if deploy.mkldnn or deploy.backend != "paddle_cpu":
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
        if backend == "paddle_trt":
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


def _paddle_predictor(files, deploy, backend, reason):
    import paddle.inference as paddle_infer

    predictor = paddle_infer.create_predictor(_paddle_config(files, deploy, backend))
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

    return Predictor(backend, reason, run, input_names, output_names)


def _onnxruntime_predictor(files, deploy, reason):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = deploy.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(files.model_file, options, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    output_names = [o.name for o in session.get_outputs()]

    def run(inputs):
        return session.run(output_names, {name: np.ascontiguousarray(inputs[name]) for name in input_names})

    return Predictor("onnxruntime", reason, run, input_names, output_names)
