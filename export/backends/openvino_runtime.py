"""OpenVINO backend (CPU plugin): reads the Paddle program itself, an ONNX file or an OpenVINO IR (``.xml`` + ``.bin``).

Models are compiled with ``INFERENCE_PRECISION_HINT f32``: on CPUs with AMX or AVX512-BF16 the CPU plugin otherwise
runs float ops in bf16 (PP-OCRv4 det probability maps moved by up to 0.75). INT8: NNCF post-training quantization
of the folded float model (FakeQuantize ops in an IR, run by the CPU plugin's int8 kernels), ``model_type
TRANSFORMER`` for rec so that the SVTR neck gets NNCF's transformer patterns, and the depthwise convolutions kept
float: the CPU plugin ran all 14 of PP-OCRv4's in f32 even when NNCF had quantized them (their ``runtimePrecision``),
so their quantizers only added rounding. Measured on the demo Eval split (Xeon with VNNI and AMX, 2 threads): rec
accuracy 0.870 float, 0.830 INT8 with the depthwise convs quantized, 0.857 without (ONNX Runtime's recipe: 0.857);
det hmean 0.971 float, 0.976 and 0.980; det at 960x960 38.9 ms and 33.4 ms (float 71.9 ms). The MatMuls (rec's SVTR
attention, its MLPs and the CTC head; det has none) stay float too: judged first on unlabelled lines the quant stage
never reports on (lines 1000-2999 of the unlabeled split, agreement with the float model), they raised normalised
edit similarity 0.9375 -> 0.9442 and per-frame argmax agreement 0.9792 -> 0.9810; then in the quant stage rec acc
0.8567 -> 0.8600 and fidelity 0.9681 -> 0.9721 (int8 at 1.97x the float model on OpenVINO). On CPUs without VNNI,
NNCF's overflow fix (half-range weights of the first convolution) stays on. The export copies the INT8 IR into its
``int8/`` folder as ``model_int8_openvino.xml``; float folders are run from the Paddle program or ``model.onnx``.
"""
import functools
import importlib.util
import logging
import os
import shutil
import time

import numpy as np

from compress.errors import ConfigError, InputError
from export.backends.base import Backend, register_backend

OPENVINO_INT8_DIR = "int8_openvino"
FLOAT_IR = "model_fp32.xml"
INT8_IR = "model_int8.xml"
EXPORTED_INT8_IR = "model_int8_openvino.xml"  # the IR's name in the export's int8/ folder
DEVICE = "CPU"
# op types NNCF leaves float by default (Quant.openvino_float_op_types; see the module docstring): depth-wise
# convolutions and the matrix products of rec's SVTR neck and CTC head
FLOAT_OP_TYPES = ("GroupConvolution", "MatMul")


@functools.lru_cache(maxsize=1)
def ov_core():
    """The process's one ``openvino.Core`` (it holds the loaded plugins; creating one per model costs time)."""
    import openvino

    return openvino.Core()


def read_model(files):
    """The ``openvino.Model`` of a :class:`export.backends.base.ModelFiles` (Paddle program, ONNX or IR)."""
    if files.params_file and files.format == "openvino":
        return ov_core().read_model(files.model_file, files.params_file)
    return ov_core().read_model(files.model_file)


def compile_properties(deploy):
    """``compile_model`` properties of a :class:`export.predictor.DeployConfig`.

    Raises:
        ConfigError: when the precision is fp16 (the hint is checked by :class:`export.predictor.OpenVinoConfig`).
    """
    import openvino
    import openvino.properties as props
    import openvino.properties.hint as hints

    if deploy.precision == "fp16":
        raise ConfigError("Deploy.precision fp16: the openvino backend runs fp32 and int8 models; use fp32")
    settings = deploy.openvino
    return {props.inference_num_threads: deploy.threads, props.num_streams: settings.streams,
            hints.performance_mode: hints.PerformanceMode.__members__[settings.hint],
            hints.enable_cpu_pinning: bool(settings.pinning),
            # for the float ops of INT8 models too: NNCF calibrated them in f32
            hints.inference_precision: openvino.Type.f32}


@register_backend
class OpenVino(Backend):
    name = "openvino"
    formats = ("pdmodel", "onnx", "openvino")
    int8_dir = OPENVINO_INT8_DIR
    int8_format = "openvino"
    int8_weight_grid = True  # NNCF: symmetric narrow-range int8 weights, scale max|W[c]| / 127
    summary = "OpenVINO on CPU (Paddle, ONNX or IR models; INT8 through NNCF)"

    def unavailable(self, capabilities):
        if importlib.util.find_spec("openvino") is None:
            return "openvino is not installed (pip install openvino)"
        return None

    def create(self, files, deploy):
        model = read_model(files)
        compiled = ov_core().compile_model(model, DEVICE, compile_properties(deploy))
        input_names = [port.get_any_name() for port in compiled.inputs]
        output_names = [port.get_any_name() for port in compiled.outputs]
        request = compiled.create_infer_request()

        def run(inputs):
            # share_outputs=False: the request reuses its output buffers on the next call
            results = request.infer({name: np.ascontiguousarray(inputs[name]) for name in input_names},
                                    share_outputs=False)
            return list(results.to_tuple())

        return run, input_names, output_names

    def model_path(self, folder, model_files):
        if model_files.get("openvino"):
            return os.path.join(folder, model_files["openvino"])
        if str(model_files.get("paddle") or "").endswith(".pdmodel"):
            return folder  # the CPU plugin reads the Paddle program directly
        if model_files.get("onnx"):
            return os.path.join(folder, model_files["onnx"])
        return None

    def int8_source(self, folder):
        if self.name not in folder.options.backends or not folder.quant_passed(self.name):
            return None
        return folder.quant_file(self.name, self.int8_dir)

    def export_model(self, folder, source=None):
        if source is None:
            if folder.quant_made(self.name):
                folder.notes.append(f"{folder.name}/{self.name} skipped: the quant stage's OpenVINO INT8 model did "
                                    "not pass its gate")
            return {}
        for src, dst in ((source, EXPORTED_INT8_IR), (ir_weights(source), ir_weights(EXPORTED_INT8_IR))):
            shutil.copyfile(src, os.path.join(folder.path, dst))
        folder.metrics[f"{folder.name}/openvino_bytes"] = ir_bytes(os.path.join(folder.path, EXPORTED_INT8_IR))
        return {self.int8_files_key: EXPORTED_INT8_IR}

    def ptq(self, job):
        if importlib.util.find_spec("nncf") is None:
            raise ConfigError(f"Quant.backends: {self.name} INT8 needs NNCF; pip install nncf, or drop {self.name} "
                              f"from Quant.backends")
        import openvino

        from export.predictor import find_model_files

        main = job.main_metric
        out_dir = os.path.join(job.out_dir, self.int8_dir)
        os.makedirs(out_dir, exist_ok=True)
        float_ir, int8_ir = os.path.join(out_dir, FLOAT_IR), os.path.join(out_dir, INT8_IR)
        model = read_model(find_model_files(job.folded_dir))
        openvino.save_model(model, float_ir, compress_to_fp16=False)
        if job.rounded_dir:
            model = read_model(find_model_files(job.rounded_dir))
        quantized, settings = nncf_quantize(model, job.calibration, job.task,
                                            fast_bias_correction=job.options.bias_correction == "fast",
                                            min_macs_per_element=job.options.openvino_min_macs_per_element,
                                            float_op_types=job.options.openvino_float_op_types)
        openvino.save_model(quantized, int8_ir)
        return {"float_metric": job.evaluate(float_ir, self.name, "fp32")[main],
                "int8_metric": job.evaluate(int8_ir, self.name, "int8")[main],
                "float_bytes": ir_bytes(float_ir), "int8_bytes": ir_bytes(int8_ir), "dir": self.int8_dir,
                "files": {"fp32": FLOAT_IR, "int8": INT8_IR}, "float_model": float_ir, "int8_model": int8_ir,
                "weight_rounding": "gptq" if job.rounded_dir else "nearest", **settings}

    def weight_rounding_skip(self, options):
        from compress.quant.onnx_int8 import macs_per_element

        float_types = set(options.openvino_float_op_types)

        def skip(name, layer):
            if "Convolution" in float_types:
                return "Quant.openvino_float_op_types keeps Convolution float"
            if layer._in_channels <= 3:
                return "reads the image: NNCF quantizes it with the overflow fix's grid on CPUs without VNNI"
            kernel = [int(k) for k in layer._kernel_size]
            stride = int(np.prod([int(s) for s in layer._stride]))
            work = macs_per_element(layer._in_channels, layer._out_channels, kernel, stride)
            if options.openvino_min_macs_per_element and work < options.openvino_min_macs_per_element:
                return "light conv: stays float (Quant.openvino_min_macs_per_element)"
            return ""
        return skip


def _nncf():
    """``import nncf`` with its telemetry off: NNCF sends usage events to Google Analytics unless ``NNCF_CI`` (or
    ``NNCF_DEV``) is set when it is first imported, and this project never talks to the network at run time."""
    os.environ.setdefault("NNCF_CI", "1")
    import nncf

    return nncf


def light_convolutions(model, min_macs_per_element):
    """Friendly names of the group-1 ``Convolution`` ops of an ``openvino.Model`` doing fewer than
    ``min_macs_per_element`` multiply-adds per activation element (``compress.quant.onnx_int8.macs_per_element``;
    convs reading 3 channels or fewer count as light): INT8 saves less there than its reorders cost."""
    from compress.quant.onnx_int8 import macs_per_element

    light = []
    for op in model.get_ops():
        if op.get_type_name() != "Convolution":
            continue
        out_channels, in_channels, *kernel = [dim.get_length() for dim in op.input_value(1).get_partial_shape()]
        stride = int(np.prod(list(op.get_strides())))
        if in_channels <= 3 or macs_per_element(in_channels, out_channels, kernel, stride) < min_macs_per_element:
            light.append(op.get_friendly_name())
    return light


def nncf_quantize(model, calibration, task, fast_bias_correction=True, min_macs_per_element=0,
                  float_op_types=FLOAT_OP_TYPES):
    """NNCF post-training INT8 of an ``openvino.Model``: NNCF's defaults, with ``float_op_types`` left float.

    Args:
        model: the float model (dynamic input shapes are fine: NNCF runs one inference per calibration item).
        calibration: ``[{input name: batch}]``.
        task: ``det`` or ``rec``.
        fast_bias_correction: NNCF's fast bias correction (one shift per layer from its own statistics); False:
            its full BiasCorrection, which re-runs each quantized layer's sub-graph (rec: about 2x the time).
        min_macs_per_element: convs doing fewer multiply-adds per activation element stay float
            (:func:`light_convolutions`); 0: every conv but the depth-wise ones is quantized.
        float_op_types: OpenVINO op types NNCF leaves float (default :data:`FLOAT_OP_TYPES`).

    Returns:
        (quantized model, the settings used: ``model_type``, ``overflow_fix``, ``float_op_types``,
        ``bias_correction``, ``min_macs_per_element``, ``float_convs``, ``calibration_items``, ``seconds_nncf``).

    Raises:
        InputError: when ``calibration`` is empty or lacks one of the model's inputs.
    """
    nncf = _nncf()
    from nncf.quantization.advanced_parameters import OverflowFix

    from compress.quant.onnx_int8 import cpu_has_vnni

    input_names = [port.get_any_name() for port in model.inputs]
    if not calibration:
        raise InputError("OpenVINO INT8: the Calibration split gave no batch; check Calibration.label_file")
    missing = [name for name in input_names if name not in calibration[0]]
    if missing:
        raise InputError(f"OpenVINO INT8: calibration batches lack the model inputs {missing}; they hold "
                         f"{sorted(calibration[0])}")
    model_type = nncf.ModelType.TRANSFORMER if task == "rec" else None
    # VNNI multiplies int8 pairs into int32 without the 16-bit intermediate that saturates on AVX2 / AVX-512
    overflow_fix = OverflowFix.DISABLE if cpu_has_vnni() else OverflowFix.FIRST_LAYER
    light = light_convolutions(model, min_macs_per_element) if min_macs_per_element else []
    started = time.time()
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # at INFO it lists every node the ignored scope matched
    try:
        quantized = nncf.quantize(
            model, nncf.Dataset(calibration, lambda feed: {name: feed[name] for name in input_names}),
            subset_size=len(calibration), model_type=model_type, fast_bias_correction=fast_bias_correction,
            ignored_scope=nncf.IgnoredScope(names=light, types=list(float_op_types), validate=False),  # may be none
            advanced_parameters=nncf.AdvancedQuantizationParameters(overflow_fix=overflow_fix))
    finally:
        nncf_logger.setLevel(level)
    return quantized, {"model_type": model_type.value if model_type else None, "overflow_fix": overflow_fix.value,
                       "float_op_types": list(float_op_types),
                       "bias_correction": "fast" if fast_bias_correction else "full",
                       "min_macs_per_element": min_macs_per_element, "float_convs": len(light),
                       "calibration_items": len(calibration),
                       "seconds_nncf": round(time.time() - started, 1)}


def ir_weights(xml_path):
    """The weights file (``.bin``) of an OpenVINO IR."""
    return os.path.splitext(xml_path)[0] + ".bin"


def ir_bytes(xml_path):
    """Bytes of an OpenVINO IR: the ``.xml`` and its ``.bin``."""
    return os.path.getsize(xml_path) + os.path.getsize(ir_weights(xml_path))
