"""ONNX Runtime backend (``onnxruntime``, CPU execution provider) for the ``model.onnx`` paddle2onnx writes.

Its worker threads do not spin after a call (``session.intra_op.allow_spinning`` off): a spinning pool keeps a core
busy for milliseconds after ``run`` returns and slows whatever runs next (a Paddle predictor measured right after
ONNX Runtime calls took 66 ms instead of 29 ms). INT8: ONNX Runtime ``quantize_static`` on the dense convs and
matmuls (7-bit weights on CPUs without VNNI, see :mod:`compress.quant.onnx_int8`). The export converts each float
Paddle model to ``model.onnx`` (paddle2onnx) and checks it against the Paddle model; its ``int8/`` folder gets the
quant stage's INT8 ONNX model, or a conversion of the Paddle QDQ model when the quant stage made none.
"""
import dataclasses
import glob
import os
import shutil

import numpy as np

from compress.checkpoint import atomic_write_bytes
from compress.errors import CompressError
from export.backends.base import INT8_RUNTIME_KEY, Backend, register_backend

ONNX_INT8_DIR = "int8_onnx"


@register_backend
class OnnxRuntime(Backend):
    name = "onnxruntime"
    formats = ("onnx",)
    int8_dir = ONNX_INT8_DIR
    checked_against = "paddle_cpu"
    summary = "ONNX Runtime, CPU execution provider"

    def create(self, files, deploy):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = deploy.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(files.model_file, options, providers=["CPUExecutionProvider"])
        input_names = [i.name for i in session.get_inputs()]
        output_names = [o.name for o in session.get_outputs()]

        def run(inputs):
            return session.run(output_names, {name: np.ascontiguousarray(inputs[name]) for name in input_names})

        return run, input_names, output_names

    def model_path(self, folder, model_files):
        name = model_files.get("onnx")
        return os.path.join(folder, name) if name else None

    def ptq(self, job):
        """``quantize_static`` of the folded model; of ``job.rounded_dir`` instead when the CPU has VNNI: its weights
        then lie on ONNX Runtime's own grid (symmetric per channel, ``max|W[c]| / 127``; without VNNI the recipe
        uses ``reduce_range``, ``max|W[c]| / 64``, and quantizes the float model). The float reference is always the
        folded model."""
        from compress.quant.onnx_int8 import build_onnx_int8, cpu_has_vnni, export_onnx, quantize_onnx

        main = job.main_metric
        out_dir = os.path.join(job.out_dir, ONNX_INT8_DIR)
        rounded = job.rounded_dir if job.rounded_dir and cpu_has_vnni() else None
        if rounded:
            float_onnx = export_onnx(job.folded_dir, os.path.join(out_dir, "model_fp32.onnx"))
            rounded_onnx = export_onnx(rounded, os.path.join(job.work_dir, "onnx_rounded", "model_fp32.onnx"))
            result = dataclasses.replace(quantize_onnx(rounded_onnx, os.path.join(out_dir, "model_int8.onnx"),
                                                       job.calibration, reduce_range=False), float_onnx=float_onnx)
        else:
            result = build_onnx_int8(job.folded_dir, out_dir, job.calibration, fold=False)
        mark_int8_runtime(result.int8_onnx, self.name)
        return {"float_metric": job.evaluate(result.float_onnx, self.name, "fp32")[main],
                "weight_rounding": "gptq" if rounded else "nearest",
                "int8_metric": job.evaluate(result.int8_onnx, self.name, "int8")[main],
                "float_bytes": os.path.getsize(result.float_onnx), "int8_bytes": os.path.getsize(result.int8_onnx),
                "quantized_nodes": result.quantized_nodes, "reduce_range": result.reduce_range,
                "dir": ONNX_INT8_DIR, "files": {"fp32": os.path.basename(result.float_onnx),
                                                 "int8": os.path.basename(result.int8_onnx)},
                "float_model": result.float_onnx, "int8_model": result.int8_onnx}

    def from_qdq(self, job, qdq_dir):
        """paddle2onnx of the QDQ model, its weights stored as int8 (7-bit on CPUs without VNNI, see
        :func:`compress.quant.onnx_int8.store_int8_weights`)."""
        from compress.quant.onnx_int8 import cpu_has_vnni, export_onnx, store_int8_weights

        main = job.main_metric
        out_dir = os.path.join(job.out_dir, ONNX_INT8_DIR)
        float_onnx = export_onnx(job.folded_dir, os.path.join(out_dir, "model_fp32.onnx"))
        int8_onnx = export_onnx(qdq_dir, os.path.join(out_dir, "model_int8.onnx"))
        weight_bits = 8 if cpu_has_vnni() else 7
        stored = store_int8_weights(int8_onnx, weight_bits)
        mark_int8_runtime(int8_onnx, self.name)
        return {"float_metric": job.evaluate(float_onnx, self.name, "fp32")[main],
                "weight_bits": weight_bits, "int8_weights": stored,
                "int8_metric": job.evaluate(int8_onnx, self.name, "int8")[main],
                "float_bytes": os.path.getsize(float_onnx), "int8_bytes": os.path.getsize(int8_onnx),
                "dir": ONNX_INT8_DIR, "files": {"fp32": os.path.basename(float_onnx),
                                                 "int8": os.path.basename(int8_onnx)},
                "float_model": float_onnx, "int8_model": int8_onnx}

    def int8_source(self, folder):
        if self.name not in folder.options.backends or not folder.quant_passed(self.name):
            return None
        return quant_onnx_int8(folder)

    def export_model(self, folder, source=None):
        """The quant stage's INT8 model as ``model.onnx``; without it, paddle2onnx of the folder's Paddle model
        (float, or the QDQ model when the quant stage made no ONNX INT8 model)."""
        from export.deploy import ONNX_FILE

        path = os.path.join(folder.path, ONNX_FILE)
        if source is not None:
            shutil.copyfile(source, path)
            folder.metrics[f"{folder.name}/onnx_bytes"] = os.path.getsize(path)
            return {self.files_key: ONNX_FILE}
        if folder.quant_made(self.name):
            folder.notes.append(f"{folder.name}/{self.name} skipped: the quant stage's ONNX Runtime INT8 model did not "
                                "pass its gate")
            return {}
        if not folder.files.get("paddle"):
            return {}
        from export.onnx_export import export_to_onnx

        try:
            exported = export_to_onnx(folder.path, path, folder.options.opset)
        except CompressError as exc:
            folder.fail(f"{folder.name}/{self.name}", f"paddle2onnx failed: {exc}")
            return {}
        folder.metrics[f"{folder.name}/onnx_bytes"] = exported.bytes
        folder.metrics[f"{folder.name}/onnx_opset"] = exported.opset
        return {self.files_key: ONNX_FILE}


def quant_onnx_int8(folder):
    """The quant stage's ONNX Runtime INT8 file for an :class:`export.backends.base.ExportFolder`, from its metadata
    (``dir`` + ``files.int8``), else by name."""
    path = folder.quant_file(OnnxRuntime.name, ONNX_INT8_DIR)
    if path:
        return path
    found = sorted(glob.glob(os.path.join(folder.quant_dir, ONNX_INT8_DIR, "*int8*.onnx")))
    return found[0] if found else None


def mark_int8_runtime(onnx_path, runtime):
    """Name ``runtime`` in the INT8 ONNX file's metadata (``export.predictor.INT8_RUNTIME_KEY``): its QDQ graph was
    calibrated and checked there, and other backends that read ONNX refuse it instead of computing something else
    (OpenVINO's outputs diverged from ONNX Runtime's at the SE blocks after GlobalAveragePool)."""
    import onnx

    model = onnx.load(onnx_path)
    kept = [p for p in model.metadata_props if p.key != INT8_RUNTIME_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=INT8_RUNTIME_KEY, value=runtime)
    atomic_write_bytes(onnx_path, model.SerializeToString())
