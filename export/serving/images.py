"""Request bodies to BGR images: a multipart file, or JSON ``{"image": <base64>}``, within the configured limits.

Every refusal is a :class:`RequestError` with its HTTP status and one line saying what is wrong and what to send.
The pixel limit is checked on the image header (Pillow reads it without decoding), before any decoding.
"""
import base64
import binascii
import io
import json

import numpy as np

JSON_TYPE = "application/json"
MULTIPART_TYPE = "multipart/form-data"
FORM_FIELD = "image"


class RequestError(Exception):
    """A request the service refuses: ``status`` (400, 401, 413, 415, ...) and a one-line message."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def image_bytes_from_json(body):
    """The image bytes of a JSON body ``{"image": <base64>}``."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(400, f"body is not valid JSON ({exc}); send {{\"image\": <base64 of the file>}}")
    if not isinstance(data, dict) or "image" not in data:
        raise RequestError(400, "JSON body has no \"image\" key; send {\"image\": <base64 of the file>}")
    unknown = sorted(set(data) - {"image"})
    if unknown:
        raise RequestError(400, f"unknown key {unknown[0]!r} in the JSON body; send only {{\"image\": <base64>}}")
    if not isinstance(data["image"], str):
        raise RequestError(400, "\"image\" must be a base64 string of the image file")
    try:
        return base64.b64decode(data["image"], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "\"image\" is not valid base64; send the image file's bytes base64-encoded")


def check_pixels(data, max_pixels):
    """Width and height of encoded image ``data`` from its header; RequestError 400 when unreadable or too large."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = "not an image file" if isinstance(exc, UnidentifiedImageError) else f"unreadable image header ({exc})"
        raise RequestError(400, f"cannot decode the image: {reason}; send a PNG, JPEG, BMP, TIFF or WebP file")
    if width * height > max_pixels:
        raise RequestError(400, f"image is {width}x{height} = {width * height} pixels, over the limit of "
                                f"{max_pixels} (Limits.max_image_pixels); send a smaller image")
    return width, height


def decode_image(data, max_pixels):
    """BGR uint8 array (what ``OcrSystem`` reads) from encoded image bytes, within ``max_pixels``."""
    import cv2

    if not data:
        raise RequestError(400, "the image is empty; send the image file's bytes")
    check_pixels(data, max_pixels)
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise RequestError(400, "cannot decode the image: OpenCV could not read it (corrupt or truncated file)")
    return image
