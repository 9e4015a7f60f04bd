"""ONNX export of exported Paddle models (paddle2onnx 1.3.1, in a child process) and ONNX Runtime parity.

The conversion itself is ``compress.quant.onnx_int8.export_onnx``: paddle2onnx can abort the whole process on
some quantised graphs, so it always runs in a subprocess. paddle2onnx raises the opset above the requested one
when an op needs it (PP-OCRv4 det and rec come out at opset 14 when 13 is asked for).
"""
import compress  # noqa: F401  (imports zlib before paddle/onnxruntime, see compress/__init__.py)

import dataclasses
import os
import time

from compress.errors import InputError
from export.deploy import ONNX_FILE
from export.exporter import compare_outputs, predictor_outputs
from export.predictor import DeployConfig

DEFAULT_OPSET = 13


@dataclasses.dataclass(frozen=True)
class OnnxExport:
    """An ONNX file written by :func:`export_to_onnx`.

    Attributes:
        path: the ``.onnx`` file.
        opset: the opset the file declares (may exceed the one requested).
        bytes: file size.
        seconds: conversion wall time.
    """

    path: str
    opset: int
    bytes: int
    seconds: float


def export_to_onnx(model_dir, onnx_path=None, opset=DEFAULT_OPSET):
    """Convert the Paddle inference model in ``model_dir`` to ONNX (float or QDQ-quantised alike).

    Args:
        model_dir: exported Paddle model folder.
        onnx_path: output file (default ``<model_dir>/model.onnx``).
        opset: requested ONNX opset.

    Returns:
        OnnxExport.

    Raises:
        InputError: when paddle2onnx fails or crashes.
    """
    from compress.quant.onnx_int8 import export_onnx

    onnx_path = onnx_path or os.path.join(model_dir, ONNX_FILE)
    started = time.time()
    export_onnx(model_dir, onnx_path, opset_version=opset)
    return OnnxExport(path=onnx_path, opset=onnx_opset(onnx_path), bytes=os.path.getsize(onnx_path),
                      seconds=round(time.time() - started, 2))


def onnx_opset(onnx_path):
    """The default-domain opset an ONNX file declares."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    return int(next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0))


def onnx_parity(reference_dir, onnx_path, inputs, task, precision="fp32", tolerance=None, threads=1,
                reference=None):
    """Compare ONNX Runtime on ``onnx_path`` with the float Paddle model in ``reference_dir``.

    Args:
        reference_dir: the float Paddle inference model the ONNX file must reproduce (for an INT8 ONNX file: the
            float model it was quantised from; agreement is then judged on decoded results).
        onnx_path: the ``.onnx`` file.
        inputs: list of NCHW float32 batches.
        task: ``"det"`` or ``"rec"``.
        precision: precision of the ONNX model (``fp32`` or ``int8``).
        tolerance: ParityTolerance.
        threads: CPU threads for both runtimes.
        reference: precomputed reference outputs for ``inputs`` (skips running ``reference_dir``).

    Returns:
        ParityReport with backend ``onnxruntime``.
    """
    inputs = list(inputs)
    if not inputs:
        raise InputError("ONNX parity needs at least one input batch")
    if reference is None:
        reference, _ = predictor_outputs(reference_dir, DeployConfig(threads=threads), inputs)
    candidate, predictor = predictor_outputs(onnx_path, DeployConfig(backend="onnxruntime", precision=precision,
                                                                     threads=threads), inputs)
    return compare_outputs(reference, candidate, task, precision, tolerance, backend=predictor.backend)
