"""PaddlePaddle model-compression workflow for PP-OCR and other Paddle vision models.

``zlib`` is imported before anything pulls in ``paddle``: Paddle 2.6's ``libpaddle.so``
carries its own zlib symbols, and modules that use zlib after paddle is loaded
(pyclipper, gzip, onnxruntime, paddle2onnx) can otherwise segfault in ``inflateReset2``.
"""
import zlib  # noqa: F401  (must precede any paddle import, see module docstring)

__version__ = "0.1.0"
