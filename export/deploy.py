"""Deploy configs for exported models: one ``DeployConfig`` per backend and precision, plus ``deploy.yml``.

Every exported model folder holds

* ``deploy_<backend>[_fp16].yml``: a :class:`export.predictor.DeployConfig` (its ``to_dict`` form), loadable with
  :func:`load_deploy_config` and runnable with ``create_predictor(model_dir, deploy)``;
* ``deploy.yml``: what a deployment needs besides the backend settings: the task, the model files per format,
  the input (name, export shape, dynamic ranges), PaddleOCR's pre- and post-processing for the task, the index of
  the per-backend files and, for TensorRT, the tuned shape-range plan.

TensorRT dynamic shapes come from the model config's ``Input`` section: det ``[1..N, 3, H, W]`` with the min / opt
/ max image sizes; rec ``[1..N, 3, 48, W]`` with the width range. A tuned shape-range file (every intermediate
tensor's range, collected with ``Config.collect_shape_range_info`` on calibration images) is better still, but it
must be collected on the GPU graph: tensor names differ after the CPU passes, so on a CPU-only Paddle the plan
(file name and command) is recorded and the explicit ranges are used. ``python -m export.deploy`` collects it on a
GPU host.
"""
import compress  # noqa: F401  (imports zlib before paddle, see compress/__init__.py)

import argparse
import dataclasses
import logging
import os
import shutil
import sys

import yaml

from compress.errors import CompressError, ConfigError, InputError
from export.backends import backend_names, get_backend
from export.backends.base import FILES_KEYS
from export.backends.paddle_inference import PADDLE_FORMATS, SHAPE_RANGE_FILE, PaddleTrt, collect_shape_range_file
from export.predictor import DEFAULT_DELETE_PASSES, DeployConfig, detect_capabilities, find_model_files

logger = logging.getLogger(__name__)

DEPLOY_FILE = "deploy.yml"
ONNX_FILE = "model.onnx"

# IR passes PaddleOCR's own predictor (tools/infer/utility.py) switches off for every model because they produce
# wrong results on its graphs; rec also needs DEFAULT_DELETE_PASSES (self_attention_fuse_pass: SIGILL without
# AVX-512).
PPOCR_BROKEN_PASSES = ("conv_transpose_eltwiseadd_bn_fuse_pass", "matmul_transpose_reshape_fuse_pass")
TASK_DELETE_PASSES = {
    "det": PPOCR_BROKEN_PASSES,
    "rec": DEFAULT_DELETE_PASSES + PPOCR_BROKEN_PASSES,
}
# Transforms of an Eval section that read labels or files; inference starts from a decoded image.
_LABEL_OPS_SUFFIX = "LabelEncode"
_NOT_FOR_INFERENCE = ("DecodeImage", "KeepKeys")
# PaddleOCR batches recognised crops by aspect ratio in groups of six (predict_rec.py rec_batch_num).
REC_BATCH_SIZE = 6


@dataclasses.dataclass(frozen=True)
class DeploySettings:
    """Backend settings shared by the deploy configs of one export.

    Attributes:
        threads: CPU math threads (Paddle CPU, ONNX Runtime).
        mkldnn: use oneDNN on CPU.
        trt_workspace_mb: TensorRT builder workspace.
        trt_min_subgraph_size: smallest op group handed to TensorRT.
        trt_use_static: serialise TensorRT engines next to the model (``_trt_cache/``) and reuse them.
        gpu_memory_mb: initial GPU memory pool.
    """

    threads: int = 1
    mkldnn: bool = True
    trt_workspace_mb: int = 1024
    trt_min_subgraph_size: int = 3
    trt_use_static: bool = True
    gpu_memory_mb: int = 500


# ------------------------------------------------------------------------------------------------ shapes


def export_input_shape(task, input_cfg):
    """The InputSpec shape to export with: dynamic batch, and dynamic H/W (det) or W (rec).

    Args:
        task: ``"det"``, ``"rec"`` or another task name (fixed C/H/W from ``example_shape``).
        input_cfg: the model config's ``Input`` section.

    Returns:
        list with ``None`` for dynamic dims, e.g. ``[None, 3, 48, None]``.
    """
    channels, height, width = input_cfg.example_shape
    if task == "det":
        return [None, channels, None, None]
    if task == "rec":
        return [None, channels, height, None]
    return [None, channels, height, width]


def plan_dynamic_shapes(task, input_cfg):
    """TensorRT (min, opt, max) NCHW shapes of the model input from the ``Input`` section.

    Batch: 1 / max_batch_size / max_batch_size (PaddleOCR's rec uses its batch size as the optimum). Missing
    min/opt/max shapes default to ``example_shape``.

    Returns:
        ``{input name: (min, opt, max)}`` with 4-tuples.

    Raises:
        ConfigError: when a dim the export fixes (C; H for rec) differs between the ranges and the example shape.
    """
    example = tuple(input_cfg.example_shape)
    chw = {key: tuple(getattr(input_cfg, f"{key}_shape") or example) for key in ("min", "opt", "max")}
    spec = export_input_shape(task, input_cfg)
    for key, shape in chw.items():
        for axis, (fixed, size) in enumerate(zip(spec[1:], shape)):
            if fixed is not None and size != fixed:
                raise ConfigError(f"Input.{key}_shape: dim {axis} is {size} but the exported {task} model fixes it "
                                  f"at {fixed} (example_shape {list(example)}); make them equal")
    batch = input_cfg.max_batch_size
    return {input_cfg.name: ((1,) + chw["min"], (batch,) + chw["opt"], (batch,) + chw["max"])}


# ------------------------------------------------------------------------------------------------ configs


def gpu_backends():
    """Names of the registered backends that run on a GPU."""
    return [name for name in backend_names() if get_backend(name).gpu]


def delete_passes_for(task):
    """Paddle IR passes to switch off for a task (see ``TASK_DELETE_PASSES``)."""
    return TASK_DELETE_PASSES.get(task, DEFAULT_DELETE_PASSES)


def build_deploy_config(task, input_cfg, backend, precision, settings=None):
    """The DeployConfig for one model, backend and precision.

    Args:
        task: ``"det"`` or ``"rec"``.
        input_cfg: the model config's ``Input`` section (TensorRT ranges, max batch size).
        backend: one of ``export.predictor.BACKENDS``.
        precision: ``fp32``, ``fp16`` (GPU backends only) or ``int8`` (a quantised model).
        settings: DeploySettings (default values when None).

    Returns:
        DeployConfig with the backend's own settings (``Backend.deploy_settings``: TensorRT's, checked with
        :func:`validate_trt_settings`).

    Raises:
        ConfigError: fp16 on a CPU backend, or TensorRT settings that do not fit the input ranges.
    """
    settings = settings or DeploySettings()
    if precision == "fp16" and not get_backend(backend).gpu:
        raise ConfigError(f"deploy precision fp16 needs a GPU backend ({', '.join(gpu_backends())}), not {backend}")
    deploy = DeployConfig(backend=backend, precision=precision, threads=settings.threads, mkldnn=settings.mkldnn,
                          delete_passes=delete_passes_for(task), gpu_memory_mb=settings.gpu_memory_mb)
    return get_backend(backend).deploy_settings(deploy, task, input_cfg, settings)


def validate_trt_settings(deploy, input_cfg):
    """Check a TensorRT deploy config against the model's ``Input`` section.

    Checks: the input is named; min <= opt <= max on every dim; equal ranks; batch ranges within
    ``max_batch_size``; C equal to the model's; ``use_calib_mode`` off for INT8 (the quantised model's scales are
    used, TensorRT must not re-calibrate); positive workspace and subgraph size.

    Raises:
        ConfigError: listing every problem found.
    """
    trt = deploy.trt
    problems = []
    if trt.workspace_size <= 0:
        problems.append(f"workspace_size must be positive, got {trt.workspace_size}")
    if trt.min_subgraph_size < 1:
        problems.append(f"min_subgraph_size must be >= 1, got {trt.min_subgraph_size}")
    if trt.max_batch_size < 1:
        problems.append(f"max_batch_size must be >= 1, got {trt.max_batch_size}")
    if deploy.precision == "int8" and trt.use_calib_mode:
        problems.append("use_calib_mode must be false for int8: the quantised model carries its scales")
    if not trt.shape_range_file:
        if input_cfg.name not in trt.dynamic_shapes:
            problems.append(f"dynamic_shapes has no range for input {input_cfg.name!r} "
                            f"(has {sorted(trt.dynamic_shapes)})")
        for name, triple in trt.dynamic_shapes.items():
            problems.extend(f"{name}: {p}" for p in _range_problems(triple, trt.max_batch_size,
                                                                    input_cfg.example_shape[0]))
    if problems:
        raise ConfigError(f"Deploy.trt ({deploy.backend}, {deploy.precision}): {'; '.join(problems)}")


def _range_problems(triple, max_batch_size, channels):
    if len(triple) != 3:
        return [f"expected (min, opt, max) shapes, got {len(triple)} shapes"]
    low, opt, high = triple
    if not len(low) == len(opt) == len(high):
        return [f"min/opt/max ranks differ: {list(low)}, {list(opt)}, {list(high)}"]
    problems = []
    for axis, (a, b, c) in enumerate(zip(low, opt, high)):
        if a < 1 or not a <= b <= c:
            problems.append(f"dim {axis} needs 1 <= min <= opt <= max, got {a}, {b}, {c}")
    if high[0] > max_batch_size:
        problems.append(f"max batch {high[0]} exceeds max_batch_size {max_batch_size}")
    if len(low) == 4 and not low[1] == opt[1] == high[1] == channels:
        problems.append(f"channels must stay {channels}, got {low[1]}, {opt[1]}, {high[1]}")
    return problems


def deploy_file_name(backend, precision):
    """``deploy_<backend>.yml``; fp16 configs (same model files) get a ``_fp16`` suffix."""
    return f"deploy_{backend}{'_fp16' if precision == 'fp16' else ''}.yml"


def load_deploy_config(path):
    """Read a ``deploy_<backend>.yml`` file into a DeployConfig.

    Raises:
        InputError: missing or unreadable file.
        ConfigError: unknown keys or bad values (named by DeployConfig.from_dict).
    """
    data = _read_yaml(path)
    try:
        return DeployConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{path}: malformed deploy config ({exc})") from None


def _read_yaml(path):
    if not os.path.isfile(path):
        raise InputError(f"{path} not found; export the model with the pipeline's export stage first")
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    return data


# ------------------------------------------------------------------------------------------------ deploy.yml


def inference_preprocess(model_cfg):
    """The Eval transforms of a model config without the label/file ops, plus the KeepKeys inference needs."""
    ops = []
    for op in model_cfg.Eval.transforms:
        name = next(iter(op)) if isinstance(op, dict) and op else str(op)
        if name.endswith(_LABEL_OPS_SUFFIX) or name in _NOT_FOR_INFERENCE:
            continue
        ops.append(dict(op))
    if model_cfg.task == "det":
        ops.append({"KeepKeys": {"keep_keys": ["image", "shape"]}})
    return ops


@dataclasses.dataclass(frozen=True)
class ShapeRangePlan:
    """Where the tuned TensorRT shape-range file is (or would be) and how to collect it."""

    file: str = SHAPE_RANGE_FILE
    collected: bool = False
    note: str = ""


def write_deploy_bundle(model_dir, model_cfg, precision, deploys, onnx_file=None, shape_plan=None,
                        model_files=None):
    """Write ``deploy_<backend>.yml`` files and ``deploy.yml`` into an exported model folder.

    Args:
        model_dir: folder holding the exported Paddle model (and ``onnx_file`` if given).
        model_cfg: the model's ModelConfig (task, Input, Eval transforms, PostProcess, dictionary).
        precision: precision of the model files (``fp32`` or ``int8``).
        deploys: list of DeployConfig.
        onnx_file: file name of the ONNX model in ``model_dir``, or None.
        shape_plan: ShapeRangePlan for TensorRT, or None.
        model_files: ``Model.files`` entries of the models the backends put into ``model_dir`` (format key -> file
            name, e.g. an OpenVINO IR ``.xml`` with its ``.bin`` beside it); the Paddle files are read from the folder.

    Returns:
        path of ``deploy.yml``.
    """
    files = find_model_files(model_dir)
    paddle = files.format in PADDLE_FORMATS
    listed = {"paddle": os.path.basename(files.model_file) if paddle else None,
              "params": os.path.basename(files.params_file) if paddle and files.params_file else None,
              "onnx": onnx_file}
    listed.update((key, None) for key in FILES_KEYS.values() if key not in listed)
    listed.update((key, name) for key, name in (model_files or {}).items() if key != "paddle")
    index = {}
    for deploy in deploys:
        name = deploy_file_name(deploy.backend, deploy.precision)
        _write_yaml(os.path.join(model_dir, name), deploy.to_dict())
        index[name[len("deploy_"):-len(".yml")]] = name
    post_process = dict(model_cfg.PostProcess)
    if model_cfg.task == "rec" and model_cfg.Global.character_dict_path:
        dict_path = model_cfg.path(model_cfg.Global.character_dict_path)
        shutil.copyfile(dict_path, os.path.join(model_dir, os.path.basename(dict_path)))
        post_process.update(character_dict_path=os.path.basename(dict_path),
                            use_space_char=model_cfg.Global.use_space_char)
    input_cfg = model_cfg.Input
    export_shape = export_input_shape(model_cfg.task, input_cfg)
    ranges = plan_dynamic_shapes(model_cfg.task, input_cfg)[input_cfg.name]
    bundle = {
        "Model": {
            "task": model_cfg.task,
            "precision": precision,
            "files": listed,
        },
        "Input": {"name": input_cfg.name, "export_shape": [-1 if d is None else d for d in export_shape],
                  "ranges": dict(zip(("min", "opt", "max"), ([int(d) for d in shape] for shape in ranges)))},
        "PreProcess": inference_preprocess(model_cfg),
        "PostProcess": post_process,
        "Deploy": {"default": _default_backend(index), "configs": index},
    }
    if model_cfg.task == "rec":
        bundle["Rec"] = {"batch_size": REC_BATCH_SIZE, "max_width": int(bundle["Input"]["ranges"]["max"][3])}
    if shape_plan is not None:
        bundle["ShapeRangeTuning"] = dataclasses.asdict(shape_plan)
    path = os.path.join(model_dir, DEPLOY_FILE)
    _write_yaml(path, bundle)
    return path


def _default_backend(index):
    from export.backends import REFERENCE_BACKEND
    return REFERENCE_BACKEND if REFERENCE_BACKEND in index else next(iter(index), REFERENCE_BACKEND)


def _write_yaml(path, data):
    from compress.checkpoint import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    os.chmod(path, 0o644)  # deployment files are read by other users and services


@dataclasses.dataclass(frozen=True)
class DeployBundle:
    """A parsed ``deploy.yml``.

    Attributes:
        model_dir: the folder it was read from.
        task: ``det`` or ``rec``.
        precision: precision of the model files.
        data: the whole parsed file.
    """

    model_dir: str
    task: str
    precision: str
    data: dict

    @property
    def preprocess(self):
        return [dict(op) for op in self.data.get("PreProcess") or []]

    @property
    def postprocess(self):
        return dict(self.data.get("PostProcess") or {})

    def backends(self):
        """Deploy config keys available (e.g. ``paddle_cpu``, ``onnxruntime``, ``paddle_trt_fp16``)."""
        return list((self.data.get("Deploy") or {}).get("configs") or {})

    def deploy(self, backend=None):
        """The DeployConfig for ``backend`` (default: the bundle's default backend).

        Raises:
            InputError: when the folder has no deploy config for that backend.
        """
        deploy_section = self.data.get("Deploy") or {}
        backend = backend or deploy_section.get("default")
        configs = deploy_section.get("configs") or {}
        if backend not in configs:
            raise InputError(f"{self.model_dir}: no deploy config for backend {backend!r}; it has "
                             f"{', '.join(configs) or 'none'}")
        deploy = load_deploy_config(os.path.join(self.model_dir, configs[backend]))
        range_file = deploy.trt.shape_range_file
        if range_file and not os.path.isabs(range_file):
            trt = dataclasses.replace(deploy.trt, shape_range_file=os.path.join(self.model_dir, range_file))
            deploy = dataclasses.replace(deploy, trt=trt)
        return deploy

    def model_path(self, backend):
        """What ``create_predictor`` should load for ``backend`` (the folder, or one of its model files).

        Raises:
            InputError: when the folder holds no model that backend reads.
        """
        files = dict((self.data.get("Model") or {}).get("files") or {})
        path = get_backend(backend, f"{self.model_dir}/{DEPLOY_FILE}").model_path(self.model_dir, files)
        if path is None:
            listed = ", ".join(k for k, v in files.items() if v and k != "params") or "none"
            raise InputError(f"{self.model_dir}: {DEPLOY_FILE} lists no model backend {backend} reads (it lists: "
                             f"{listed}); use a deploy config of another backend")
        return path


def read_deploy_bundle(model_dir):
    """Read ``<model_dir>/deploy.yml``.

    Raises:
        InputError: missing folder or file, or a file without ``Model.task``.
    """
    model_dir = str(model_dir)
    if not os.path.isdir(model_dir):
        raise InputError(f"model folder {model_dir!r} does not exist; pass an exported model folder "
                         f"(one holding {DEPLOY_FILE})")
    path = os.path.join(model_dir, DEPLOY_FILE)
    data = _read_yaml(path)
    model = data.get("Model") or {}
    if model.get("task") not in ("det", "rec"):
        raise InputError(f"{path}: Model.task must be det or rec, got {model.get('task')!r}")
    return DeployBundle(model_dir, model["task"], model.get("precision", "fp32"), data)


# ------------------------------------------------------------------------------------------------ shape ranges


def shape_range_plan(model_dir, model_config_path=None):
    """Collect nothing; describe how to collect the tuned shape-range file for ``model_dir`` on a GPU host."""
    caps = detect_capabilities()
    config_arg = model_config_path or "<model config .yml>"
    command = f"python -m export.deploy --collect-shape-ranges {model_dir} -c {config_arg}"
    why = ("this Paddle build has no CUDA" if not caps.cuda else "no GPU is visible" if not caps.gpu_count
           else "collection was not run")
    return ShapeRangePlan(file=SHAPE_RANGE_FILE, collected=False,
                          note=f"not collected ({why}); on a GPU host with paddlepaddle-gpu run `{command}`: it runs "
                               f"the Calibration images through Config.collect_shape_range_info and sets "
                               f"trt.shape_range_file in the paddle_trt deploy configs")


def attach_shape_range_file(model_dir, backend, file_name=SHAPE_RANGE_FILE):
    """Point every deploy config of ``backend`` (TensorRT's, fp16 ones included) in ``model_dir`` at a collected
    shape-range file."""
    bundle = read_deploy_bundle(model_dir)
    for key, name in (bundle.data.get("Deploy") or {}).get("configs", {}).items():
        if not key.startswith(backend):
            continue
        deploy = load_deploy_config(os.path.join(model_dir, name))
        trt = dataclasses.replace(deploy.trt, shape_range_file=file_name)  # relative: resolved by DeployBundle
        _write_yaml(os.path.join(model_dir, name), dataclasses.replace(deploy, trt=trt).to_dict())
    record_shape_range_plan(model_dir, ShapeRangePlan(file_name, True, "collected"))


def record_shape_range_plan(model_dir, plan):
    """Set ``ShapeRangeTuning`` of ``model_dir``'s ``deploy.yml`` to a :class:`ShapeRangePlan`."""
    data = dict(read_deploy_bundle(model_dir).data, ShapeRangeTuning=dataclasses.asdict(plan))
    _write_yaml(os.path.join(model_dir, DEPLOY_FILE), data)


def main(argv=None):
    """``python -m export.deploy --collect-shape-ranges MODEL_DIR -c MODEL_CONFIG [--limit N]``."""
    parser = argparse.ArgumentParser(description="Collect a tuned TensorRT shape-range file for an exported model")
    parser.add_argument("--collect-shape-ranges", required=True, metavar="MODEL_DIR")
    parser.add_argument("-c", "--config", required=True, help="the model config (its Calibration split is used)")
    parser.add_argument("--limit", type=int, default=None, help="calibration samples to use")
    args = parser.parse_args(argv)
    try:
        from compress.config import ModelConfig, parse_section, read_yaml
        from compress.tasks import make_task

        raw = dict(read_yaml(args.config, "model config"), source_file=args.config, base_dir=os.getcwd())
        model_cfg = parse_section(ModelConfig, raw, args.config)
        task = make_task(model_cfg, show_progress=False)
        collect_shape_range_file(args.collect_shape_ranges, task.input_batches("calibration", limit=args.limit))
        attach_shape_range_file(args.collect_shape_ranges, PaddleTrt.name)
        print(f"wrote {os.path.join(args.collect_shape_ranges, SHAPE_RANGE_FILE)}")
        return 0
    except CompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())

