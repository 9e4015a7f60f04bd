"""Calibration batches for PP-OCR det/rec models: from an image folder, or rendered text when none is given.

Pre-processing follows PP-OCRv4 inference: images are BGR (as ``cv2.imread`` gives them);
det: resize to multiples of 32, ``(x/255 - ImageNet mean) / ImageNet std``; rec: height 48, width scaled with
the aspect ratio and right-padded to 320, ``(x/255 - 0.5) / 0.5``.
"""
import glob
import os

import numpy as np

from compress.errors import InputError

DET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
DET_STD = np.array([0.229, 0.224, 0.225], np.float32)
REC_SHAPE = (48, 320)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
WORDS = ("total amount invoice receipt date paid cash card tax 2024 07/11 No. 00917 ID: 3.14 $12.50 "
         "model compression quantized text line paddle OCR detection recognition the quick brown fox").split()


def det_preprocess(image_bgr, size=(640, 640)):
    """HxWx3 uint8 BGR image -> 3xHxW float32 det input resized to ``size`` (multiples of 32)."""
    import cv2

    resized = cv2.resize(image_bgr, (size[1], size[0])).astype(np.float32) / 255.0
    return ((resized - DET_MEAN) / DET_STD).transpose(2, 0, 1).astype(np.float32)


def rec_preprocess(image_bgr, shape=REC_SHAPE):
    """HxWx3 uint8 BGR text-line crop -> 3x48x320 float32 rec input (aspect kept, right-padded)."""
    import cv2

    height, width = shape
    scaled_width = min(width, int(np.ceil(height * image_bgr.shape[1] / max(image_bgr.shape[0], 1))))
    resized = cv2.resize(image_bgr, (scaled_width, height)).astype(np.float32)
    out = np.zeros((height, width, 3), np.float32)
    out[:, :scaled_width] = (resized / 255.0 - 0.5) / 0.5
    return out.transpose(2, 0, 1)


def _font(rng, size):
    from PIL import ImageFont

    fonts = sorted(glob.glob("/usr/share/fonts/truetype/dejavu/DejaVu*.ttf"))
    if not fonts:
        return ImageFont.load_default()
    return ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], size)


def render_text_line(rng):
    """A rendered text line (uint8 BGR, height ~48) and its text."""
    from PIL import Image, ImageDraw

    font = _font(rng, int(rng.integers(24, 36)))
    text = " ".join(rng.choice(WORDS) for _ in range(int(rng.integers(2, 5))))
    background, ink = int(rng.integers(170, 256)), int(rng.integers(0, 90))
    width = int(font.getlength(text)) + 12 if hasattr(font, "getlength") else 8 * len(text) + 12
    image = Image.new("RGB", (width, 48), (background,) * 3)
    ImageDraw.Draw(image).text((6, 6), text, font=font, fill=(ink,) * 3)
    return np.asarray(image)[:, :, ::-1].copy(), text


def render_text_page(rng, size=(640, 640)):
    """A page-like image (uint8 BGR) with lines of text at random sizes and positions."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size[1], size[0]), tuple(int(v) for v in rng.integers(170, 256, 3)))
    draw = ImageDraw.Draw(image)
    top = int(rng.integers(5, 30))
    while top < size[0] - 40:
        font = _font(rng, int(rng.integers(16, 40)))
        text = " ".join(rng.choice(WORDS) for _ in range(int(rng.integers(2, 7))))
        draw.text((int(rng.integers(5, 120)), top), text, font=font, fill=tuple(int(v) for v in rng.integers(0, 90, 3)))
        top += font.size + int(rng.integers(8, 40))
    return np.asarray(image)[:, :, ::-1].copy()


def _read_images(image_dir):
    import cv2

    paths = sorted(p for p in glob.glob(os.path.join(image_dir, "**", "*"), recursive=True)
                   if p.lower().endswith(IMAGE_EXTENSIONS))
    images = [cv2.imread(p) for p in paths]
    return [image for image in images if image is not None]


def calibration_batches(kind, num_batches, batch_size=1, seed=0, image_dir=None, det_size=(640, 640)):
    """Batches ``[{"x": array}]`` for a det or rec model.

    Args:
        kind: ``"det"`` or ``"rec"``.
        num_batches: number of batches.
        batch_size: images per batch.
        seed: seed of the rendered images.
        image_dir: folder of images to use (cycled); rendered text when None.
        det_size: det input height, width (multiples of 32).

    Raises:
        InputError: unknown kind, or ``image_dir`` without images.
    """
    if kind not in ("det", "rec"):
        raise InputError(f"calibration kind {kind!r} is unknown; use det or rec")
    rng = np.random.default_rng(seed)
    total = num_batches * batch_size
    if image_dir is not None:
        images = _read_images(image_dir)
        if not images:
            raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {image_dir!r}")
        images = [images[i % len(images)] for i in range(total)]
    elif kind == "det":
        images = [render_text_page(rng, det_size) for _ in range(total)]
    else:
        images = [render_text_line(rng)[0] for _ in range(total)]
    inputs = [det_preprocess(im, det_size) if kind == "det" else rec_preprocess(im) for im in images]
    return [{"x": np.stack(inputs[i:i + batch_size])} for i in range(0, total, batch_size)]
