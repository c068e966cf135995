"""The one image transform that training, evaluation and serving share (and the importers' decoder)."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image


def _crop_to_retina(img: Image.Image) -> Image.Image:
    """Crop the black border around the field of view and pad to a square.

    Real photos are wide rectangles with the round retina in the middle; squashing them to a
    square would distort the lesions. Images that are already a square retina barely change.
    """
    small = img.convert("L")
    small.thumbnail((128, 128))
    mask = np.asarray(small) > 18
    rows, cols = np.flatnonzero(mask.mean(1) > 0.02), np.flatnonzero(mask.mean(0) > 0.02)
    if rows.size < 4 or cols.size < 4:  # a dark or odd image: keep it whole rather than guess
        box = (0, 0, img.width, img.height)
    else:
        sx, sy = img.width / small.width, img.height / small.height
        box = (
            int(cols[0] * sx), int(rows[0] * sy), math.ceil((cols[-1] + 1) * sx), math.ceil((rows[-1] + 1) * sy)
        )  # fmt: skip
    w, h = box[2] - box[0], box[3] - box[1]
    if w == h and box == (0, 0, img.width, img.height):
        return img
    side = max(w, h)
    square = Image.new("RGB", (side, side))
    square.paste(img.crop(box), ((side - w) // 2, (side - h) // 2))
    return square


def load_rgb(data: bytes, image_size: int | None) -> np.ndarray:
    """Decode PNG/JPEG bytes to an RGB uint8 array, retina-cropped to a square of ``image_size``.

    Raises whatever PIL raises for undecodable bytes; callers name the image in a DataError.
    ``image_size=None`` keeps the (square-padded) native size.
    """
    img = Image.open(io.BytesIO(data))
    if image_size and img.format == "JPEG":
        # Let libjpeg decode at a reduced scale: a 3000 px EyePACS photo decodes ~10x faster.
        img.draft("RGB", (2 * image_size, 2 * image_size))
    img = img.convert("RGB")
    if img.width != img.height or img.width != image_size:
        img = _crop_to_retina(img)
    if image_size and img.width != image_size:
        img = img.resize((image_size, image_size), Image.BILINEAR, reducing_gap=2.0)
    return np.asarray(img)


def _augment(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grade-preserving augmentation on uint8 H x W x 3; returns uint8 H x W x 3."""
    img = Image.fromarray(rgb)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)  # also turns a right eye into a left one
    img = img.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
    x = np.asarray(img, dtype=np.float32)
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.85, 1.15) + mean * rng.uniform(0.85, 1.15)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def preprocess_image(
    data: bytes, image_size: int, augment: bool = False, rng: np.random.Generator | None = None
) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 array of shape 3 x ``image_size`` x ``image_size``.

    The single transform that training (via :func:`decode_batch`), offline evaluation and serving
    all use, so a model sees the same pixels in production as in training. ``augment`` (training
    only) adds a random flip, a rotation up to 15 degrees and brightness/contrast jitter. Pixels
    stay uint8 until they reach the model's device, where the task normalises them with MEAN and
    STD (jobs.tasks.normalised): a quarter of the bytes through Ray's object store and the bus.
    """
    rgb = load_rgb(data, image_size)
    if augment:
        rgb = _augment(rgb, rng if rng is not None else np.random.default_rng())
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))
