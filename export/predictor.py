"""One predictor interface over the registered inference backends (:mod:`export.backends`: Paddle Inference on
CPU / GPU / TensorRT, ONNX Runtime, OpenVINO).

``create_predictor(model_dir, DeployConfig(...))`` picks the backend. What the machine can do is detected up
front (CUDA build, GPU count, TensorRT build, ONNX Runtime providers); a config whose backend cannot run here falls
back along the backend's ``fallback`` chain (TensorRT -> GPU -> CPU with oneDNN) with one logged notice naming the
reason, instead of relying on the exceptions or silent fallbacks of the libraries.
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import dataclasses
import functools
import glob
import logging
import os

from compress.errors import ConfigError, InputError
from export.backends import INT8_RUNTIME_KEY, REFERENCE_BACKEND, ModelFiles, Predictor, backend_names, \
    get_backend  # noqa: F401

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
OPENVINO_HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")  # openvino.properties.hint.PerformanceMode
# self_attention_fuse_pass executes AVX-512 code while matching and dies with SIGILL on CPUs without AVX-512
# (seen on AMD EPYC with PP-OCRv4 rec); the fused op only helps AVX-512 machines anyway.
DEFAULT_DELETE_PASSES = ("self_attention_fuse_pass",)
# oneDNN INT8 quantises every op type it supports by default; its fc/matmul kernels broke PP-OCRv4 rec
# (recognised strings agreeing with float: 94% with convs only, 47% with everything).
DEFAULT_INT8_OPS = ("conv2d", "fused_conv2d", "depthwise_conv2d")


def find_model_files(model_dir):
    """Detect the inference model files in ``model_dir`` from what is there.

    Paddle programs win over ONNX, ONNX over OpenVINO IR, when several are present; ``inference.*`` wins over
    other names.

    Args:
        model_dir: a folder, or the path of an ``.onnx`` / ``.pdmodel`` / ``.json`` / OpenVINO ``.xml`` file.

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
    for pattern, needs_params in (("*.pdmodel", False), ("*.json", True), ("*.onnx", False), ("*.xml", True)):
        candidates = sorted(glob.glob(os.path.join(model_dir, pattern)))
        if needs_params:  # any JSON / XML could sit in a model folder; a program has its weights beside it
            candidates = [c for c in candidates if os.path.exists(_params_for(c))]
        if candidates:
            return _files_for_program(_pick_one(candidates, model_dir))
    present = ", ".join(sorted(os.listdir(model_dir))[:10]) or "nothing"
    raise InputError(f"no inference model in {model_dir!r} (found: {present}); export one with "
                     "paddle.jit.save / tools/export, or point to the folder holding *.pdmodel + *.pdiparams")


def _params_for(program_file):
    suffix = ".bin" if program_file.lower().endswith(".xml") else ".pdiparams"
    return os.path.splitext(program_file)[0] + suffix


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
    if extension not in (".pdmodel", ".json", ".xml"):
        raise InputError(f"{path!r} is not an inference model file (expected .pdmodel, .json, .onnx or an OpenVINO "
                         f".xml)")
    params = _params_for(path)
    fmt = "openvino" if extension == ".xml" else extension.lstrip(".")
    return ModelFiles(path, params if os.path.exists(params) else None, fmt)


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
class OpenVinoConfig:
    """OpenVINO settings for the ``openvino`` backend (``compile_model`` properties).

    Attributes:
        streams: parallel inference streams (1: one request at a time, all threads on it).
        hint: ``LATENCY`` or ``THROUGHPUT`` (OpenVINO's performance hint).
        pinning: pin the worker threads to cores (off: they do not hold cores other runtimes need).
    """

    streams: int = 1
    hint: str = "LATENCY"
    pinning: bool = False

    def __post_init__(self):
        if self.hint not in OPENVINO_HINTS:
            raise ConfigError(f"Deploy.openvino.hint {self.hint!r} is unknown; use one of {', '.join(OPENVINO_HINTS)}")
        if not isinstance(self.streams, int) or self.streams < 1:
            raise ConfigError(f"Deploy.openvino.streams must be a positive integer, got {self.streams!r}")


@dataclasses.dataclass(frozen=True)
class DeployConfig:
    """How to run an inference model.

    Attributes:
        backend: a registered backend (``export.backends``): ``paddle_cpu``, ``paddle_gpu``, ``paddle_trt``,
            ``onnxruntime``, ``openvino``.
        precision: ``fp32``, ``fp16`` (GPU/TensorRT) or ``int8`` (quantised models).
        threads: CPU math threads.
        mkldnn: use oneDNN on CPU (Paddle backends).
        delete_passes: Paddle IR passes to switch off.
        int8_ops: op types oneDNN runs in INT8 (``precision='int8'``); empty means every supported type.
        gpu_id: GPU device index.
        gpu_memory_mb: initial GPU memory pool in MB.
        trt: TensorRT settings.
        openvino: OpenVINO settings.
    """

    backend: str = REFERENCE_BACKEND
    precision: str = "fp32"
    threads: int = 1
    mkldnn: bool = True
    delete_passes: tuple = DEFAULT_DELETE_PASSES
    int8_ops: tuple = DEFAULT_INT8_OPS
    gpu_id: int = 0
    gpu_memory_mb: int = 500
    trt: TrtConfig = dataclasses.field(default_factory=TrtConfig)
    openvino: OpenVinoConfig = dataclasses.field(default_factory=OpenVinoConfig)

    def __post_init__(self):
        get_backend(self.backend, "deploy backend")
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
        openvino = dict(data.pop("openvino", None) or {})
        _check_keys(openvino, OpenVinoConfig, "Deploy.openvino")
        trt["dynamic_shapes"] = {name: tuple(tuple(int(d) for d in s) for s in shapes)
                                 for name, shapes in (trt.get("dynamic_shapes") or {}).items()}
        for key in ("delete_passes", "int8_ops"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(trt=TrtConfig(**trt), openvino=OpenVinoConfig(**openvino), **data)


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


def onnx_int8_runtime(files):
    """The runtime an INT8 ONNX model was made and checked for (its ``INT8_RUNTIME_KEY`` metadata), or None."""
    if files.format != "onnx":
        return None
    stat = os.stat(files.model_file)
    return _onnx_metadata(os.path.abspath(files.model_file), stat.st_mtime_ns, stat.st_size).get(INT8_RUNTIME_KEY)


@functools.lru_cache(maxsize=64)
def _onnx_metadata(path, mtime_ns, size):
    """An ONNX file's metadata, parsed once per file version (a predictor is created many times per run)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def resolve_backend(deploy, capabilities=None):
    """The backend that will really run ``deploy`` here, and the reason when it differs (else None).

    Follows each unavailable backend's ``fallback`` (TensorRT -> GPU -> CPU); the reason is the first one met.

    Raises:
        InputError: when the backend cannot run here and has no fallback.
    """
    caps = capabilities or detect_capabilities()
    name, first_reason = deploy.backend, None
    while True:
        backend = get_backend(name)
        reason = backend.unavailable(caps)
        if reason is None:
            return name, first_reason
        first_reason = first_reason or reason
        if backend.fallback is None:
            raise InputError(f"deploy backend {deploy.backend} cannot run here: {reason}")
        name = backend.fallback


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
    name, reason = resolve_backend(deploy)
    if reason:
        logger.warning("deploy backend %s is not available: %s; running on %s instead", deploy.backend, reason, name)
    backend = get_backend(name)
    made_for = onnx_int8_runtime(files)
    if made_for and made_for != name:
        raise InputError(f"{files.model_file} is an INT8 model made for {made_for} (its metadata {INT8_RUNTIME_KEY}); "
                         f"backend {name} computes it differently (OpenVINO diverged from it at the SE blocks); run it "
                         f"with {made_for}, or use the {name} INT8 model of the export")
    if files.format not in backend.formats:
        readers = [n for n in backend_names() if files.format in get_backend(n).formats]
        raise InputError(f"backend {name} reads {' / '.join(backend.formats)} models but {model_dir!r} holds "
                         f"{files.format}; use backend {' or '.join(readers) or 'another'}")
    run, input_names, output_names = backend.create(files, deploy)
    return Predictor(name, reason, run, input_names, output_names)
