"""Inference backends as plug-ins (see :mod:`export.backends.base`); importing this package registers the
built-in ones: Paddle Inference (CPU / GPU / TensorRT), ONNX Runtime and OpenVINO."""
from export.backends.base import (BACKENDS, INT8_RUNTIME_KEY, REFERENCE_BACKEND, Backend, ExportFolder,  # noqa: F401
                                  ModelFiles, Predictor, PtqJob, backend_names, get_backend, register_backend)
from export.backends import onnx_runtime, openvino_runtime, paddle_inference  # noqa: F401,E402  (register)
