"""Diabetic-retinopathy data: synthetic fundus generator, EyePACS/APTOS importers, splits, readers.

Every source yields records in :data:`SCHEMA` (one per eye photo); :func:`prepare` writes them as
Parquet shards split by patient; :func:`read_split` (Ray Data) and :func:`iter_split_numpy`
(plain pyarrow) read them back through :func:`preprocess_image`, the one transform that training,
evaluation and serving share.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import re
import sys
import zlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from .errors import DataError
from .shards import (
    ShardWriter,
    iter_tables,
    load_manifest,
    readable_paths,
    reusable,
    sha256_file,
)

if TYPE_CHECKING:  # ray is heavy; importing data_loaders must stay cheap
    import ray.data

TASK = "retinopathy"
NUM_CLASSES = 5
GRADE_NAMES = ("no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "proliferative DR")
SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("patient_id", pa.string()),
        ("eye", pa.string()),  # "left", "right" or "" when the source does not say
        ("image", pa.binary()),  # PNG, RGB uint8
        ("label", pa.int8()),  # ICDR grade 0-4
    ]
)
# Moderately imbalanced like screening data (where "no DR" dominates even more).
CLASS_MIX = (0.35, 0.2, 0.2, 0.13, 0.12)
# Per-channel mean and std of synthetic fundus photos (black corners included; measured on 300),
# so normalised inputs are about zero-mean, unit-variance. Fixed constants rather than per-dataset
# statistics: serving must normalise a lone photo exactly as training did.
MEAN = np.array([0.39, 0.17, 0.08], dtype=np.float32)
STD = np.array([0.30, 0.13, 0.07], dtype=np.float32)
SPLITS = ("train", "val", "test")
SOURCES = ("synthetic", "eyepacs", "aptos", "auto")
BAD_IMAGE_POLICIES = ("skip", "fail")


# ---------------------------------------------------------------------------------------------
# Synthetic fundus photos
# ---------------------------------------------------------------------------------------------

# Render at twice the size and box-downsample: thin vessels and tiny lesions get anti-aliased
# edges, as through a real camera's optics, instead of hard one-pixel steps.
_SS = 2
_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(w: int) -> tuple[np.ndarray, np.ndarray]:
    g = _GRIDS.get(w)
    if g is None:
        yy, xx = np.mgrid[0:w, 0:w].astype(np.float32)
        g = _GRIDS[w] = (yy, xx)
    return g


def _rgb(c: Iterable[float]) -> tuple[int, int, int]:
    r, g, b = (int(min(255, max(0, round(v)))) for v in c)
    return r, g, b


class _Fundus:
    """Geometry of one synthetic right-eye photo in working (supersampled) pixels."""

    def __init__(self, rng: np.random.Generator, w: int) -> None:
        self.w = w
        self.cx = w / 2 + rng.normal(0, 0.01 * w)
        self.cy = w / 2 + rng.normal(0, 0.01 * w)
        self.r = w * rng.uniform(0.44, 0.48)
        # Right eye as photographed: the optic disc sits on the nasal (right) side, the macula
        # about 2.5 disc diameters temporal to it, a little below the disc's level.
        self.rd = self.r * rng.uniform(0.11, 0.13)
        self.dx = self.cx + self.r * rng.uniform(0.36, 0.46)
        self.dy = self.cy + self.r * rng.normal(0, 0.06)
        self.mx = self.dx - self.rd * rng.uniform(4.6, 5.2)
        self.my = self.dy + self.r * rng.uniform(0.0, 0.06)

    def inside(self, x: float, y: float, margin: float = 0.97) -> bool:
        return (x - self.cx) ** 2 + (y - self.cy) ** 2 < (margin * self.r) ** 2

    def spot(self, rng: np.random.Generator, quadrant: int | None = None, rmax: float = 0.9) -> tuple:
        """A random point on the retina away from the disc, optionally in one quadrant (0-3)."""
        for _ in range(50):
            if quadrant is None:
                a = rng.uniform(0, 2 * math.pi)
            else:
                a = rng.uniform(quadrant * math.pi / 2, (quadrant + 1) * math.pi / 2)
            rho = self.r * math.sqrt(rng.uniform(0.02, rmax**2))
            x, y = self.cx + rho * math.cos(a), self.cy + rho * math.sin(a)
            if (x - self.dx) ** 2 + (y - self.dy) ** 2 > (1.6 * self.rd) ** 2:
                return x, y
        return x, y


def _walk(rng, x, y, angle, step, n, curl, wobble, f: _Fundus) -> list[tuple[float, float]]:
    pts = [(x, y)]
    for _ in range(n):
        angle += curl + rng.normal(0, wobble)
        x += step * math.cos(angle)
        y += step * math.sin(angle)
        if not f.inside(x, y):
            break
        pts.append((x, y))
    return pts


def _vessel(draw, rng, f: _Fundus, x, y, angle, width, length, curl, color, depth=0) -> None:
    """A vessel as a wobbly polyline that branches into thinner children."""
    step = f.r * 0.06
    pts = _walk(rng, x, y, angle, step, max(2, int(length / step)), curl, 0.10, f)
    if len(pts) < 2:
        return
    draw.line(pts, fill=color, width=max(1, round(width)), joint="curve")
    if depth >= 3 or width < 1.5 or len(pts) < 4:
        return
    for _ in range(int(rng.integers(1, 4))):
        i = int(rng.integers(1, len(pts) - 2))
        (x0, y0), (x1, y1) = pts[i], pts[i + 1]
        heading = math.atan2(y1 - y0, x1 - x0) + rng.choice((-1.0, 1.0)) * rng.uniform(0.45, 1.0)
        _vessel(
            draw, rng, f, x0, y0, heading, width * 0.62, length * rng.uniform(0.3, 0.55),
            rng.normal(0, 0.06), color, depth + 1,
        )  # fmt: skip


def _blob(draw, rng, x, y, r, color, elong=1.0) -> None:
    """An irregular rotated ellipse (haemorrhage, exudate, cotton-wool spot)."""
    a = rng.uniform(0, math.pi)
    ra, rb = r * elong, r / max(elong, 1e-3) ** 0.5
    t = np.linspace(0, 2 * math.pi, 10, endpoint=False)
    jag = rng.uniform(0.8, 1.15, t.size)
    px = x + jag * (ra * np.cos(t) * math.cos(a) - rb * np.sin(t) * math.sin(a))
    py = y + jag * (ra * np.cos(t) * math.sin(a) + rb * np.sin(t) * math.cos(a))
    draw.polygon(list(zip(px.tolist(), py.tolist(), strict=True)), fill=color)


def _dot(draw, x, y, r, color) -> None:
    draw.ellipse((x - r, y - r, x + r, y + r), fill=color)


def _lesions(draw, rng, f: _Fundus, grade: int, base: np.ndarray, size: int) -> None:
    """Draw the findings that define ``grade`` (ICDR scale in spirit)."""
    if grade == 0:
        return
    # Sizes are relative to the image, but never below ~1 output pixel so that a tiny flavour
    # at 64-128 px still sees them; a real microaneurysm is far smaller than this.
    px = f.w / size  # working pixels per output pixel
    ma_col = _rgb(base * (0.42, 0.20, 0.28))
    hem_col = _rgb(base * (0.50, 0.24, 0.30))
    ex_col = _rgb((238 + rng.normal(0, 8), 214 + rng.normal(0, 10), 96 + rng.normal(0, 15)))

    def microaneurysms(n: int) -> None:
        for _ in range(n):
            x, y = f.spot(rng, rmax=0.8)
            _dot(draw, x, y, max(0.75 * px, f.w * rng.uniform(0.007, 0.010)), ma_col)

    def haemorrhages(n: int, quadrant: int | None = None) -> None:
        for _ in range(n):
            x, y = f.spot(rng, quadrant)
            _blob(
                draw, rng, x, y, max(1.2 * px, f.w * rng.uniform(0.014, 0.024)), hem_col, rng.uniform(1, 1.8)
            )

    def exudates(clusters: int) -> None:
        for _ in range(clusters):
            x0, y0 = f.spot(rng, rmax=0.7)
            for _ in range(int(rng.integers(3, 8))):
                x, y = x0 + rng.normal(0, 0.05 * f.r), y0 + rng.normal(0, 0.05 * f.r)
                if f.inside(x, y, 0.9):
                    _blob(draw, rng, x, y, max(0.7 * px, f.w * rng.uniform(0.006, 0.011)), ex_col, 1.2)

    def cotton_wool(n: int) -> None:
        col = _rgb(base * 0.45 + 255 * 0.5)
        for _ in range(n):
            x, y = f.spot(rng, rmax=0.6)
            _blob(draw, rng, x, y, f.w * rng.uniform(0.016, 0.026), col, rng.uniform(1.2, 1.8))

    # Grade 4 carries grade-2-like or grade-3-like background findings under its new vessels.
    background = grade if grade < 4 else (3 if rng.random() < 0.6 else 2)
    if background == 1:
        microaneurysms(int(rng.integers(3, 8)))
    elif background == 2:
        microaneurysms(int(rng.integers(5, 12)))
        kind = rng.random()
        if kind < 0.8:  # haemorrhages in at most three quadrants
            quads = rng.choice(4, size=int(rng.integers(1, 4)), replace=False)
            for q in quads:
                haemorrhages(int(rng.integers(1, 3)), int(q))
        if kind > 0.5:
            exudates(int(rng.integers(1, 3)))
        if rng.random() < 0.2:
            cotton_wool(1)
    elif background == 3:
        microaneurysms(int(rng.integers(8, 16)))
        for q in range(4):  # the 4-2-1 rule's "haemorrhages in all four quadrants"
            haemorrhages(int(rng.integers(3, 6)), q)
        exudates(int(rng.integers(1, 4)))
        cotton_wool(int(rng.integers(0, 3)))
    if grade == 4:
        _neovascularisation(draw, rng, f, base)


def _neovascularisation(draw, rng, f: _Fundus, base: np.ndarray) -> None:
    """Fine, tortuous, bright-red new vessels: at the disc (NVD) and/or elsewhere (NVE)."""
    col = _rgb(base * (0.78, 0.22, 0.30))
    width = max(1, round(f.w / 180))
    sites = []
    if rng.random() < 0.75:
        sites.append((f.dx, f.dy, 1.8 * f.rd))
    if not sites or rng.random() < 0.5:
        x, y = f.spot(rng, rmax=0.75)
        sites.append((x, y, 1.3 * f.rd))
    for x0, y0, spread in sites:
        for _ in range(int(rng.integers(6, 11))):
            a = rng.uniform(0, 2 * math.pi)
            x, y = x0 + rng.normal(0, 0.5 * spread), y0 + rng.normal(0, 0.5 * spread)
            pts = _walk(rng, x, y, a, f.rd * 0.22, int(rng.integers(6, 12)), rng.choice((-0.6, 0.6)), 0.5, f)
            if len(pts) > 1:
                draw.line(pts, fill=col, width=width, joint="curve")
    if rng.random() < 0.25:  # a pre-retinal (boat-shaped) haemorrhage from a bleeding new vessel
        x, y = f.spot(rng, rmax=0.7)
        r = f.w * rng.uniform(0.03, 0.045)
        draw.chord((x - r, y - r, x + r, y + r), 0, 180, fill=_rgb(base * (0.45, 0.18, 0.22)))


def render_fundus(rng: np.random.Generator, grade: int, size: int, eye: str) -> np.ndarray:
    """Draw one synthetic fundus photo of DR ``grade`` as a ``size`` x ``size`` x 3 uint8 array.

    The grade shows only through lesions; colour, exposure, disc position, vessel layout, noise
    and the eye (left is the mirror image of right) vary independently of it.
    """
    if not 0 <= grade < NUM_CLASSES:
        raise ValueError(f"grade must be 0-4, got {grade}")
    w = size * _SS
    f = _Fundus(rng, w)
    base = np.array([rng.uniform(170, 235), rng.uniform(70, 110), rng.uniform(25, 55)], dtype=np.float32)
    pil = Image.new("RGB", (w, w), _rgb(base))
    _optic_disc(pil, f, rng)
    draw = ImageDraw.Draw(pil)
    # Vessels: four arcades from the disc, each a vein beside a lighter, thinner artery.
    vein = _rgb(base * (0.62, 0.42, 0.55))
    artery = _rgb(base * (0.82, 0.55, 0.62))
    main_w = w * rng.uniform(0.014, 0.018)
    for heading, curl, length in (
        (-2.0, -0.08, 1.35),  # superior temporal, arching around the macula
        (2.0, 0.08, 1.35),  # inferior temporal
        (-0.9, 0.02, 0.8),  # superior nasal
        (0.9, -0.02, 0.8),  # inferior nasal
    ):
        for col, scale, da in ((vein, 1.0, 0.0), (artery, 0.75, rng.uniform(-0.3, 0.3))):
            _vessel(
                draw, rng, f, f.dx, f.dy, heading + da + rng.normal(0, 0.12), main_w * scale,
                f.r * length * rng.uniform(0.8, 1.1), curl + rng.normal(0, 0.015), col,
            )  # fmt: skip
    _lesions(draw, rng, f, grade, base, size)

    # Everything below is smooth, so it runs at the output size (4x fewer pixels).
    img = np.asarray(pil.reduce(_SS), dtype=np.float32)
    s = 1.0 / _SS
    cx, cy, r = f.cx * s, f.cy * s, f.r * s
    yy, xx = _grid(size)
    # Illumination: radial fall-off, an uneven sweep across the field, a darker macula, and a
    # faint low-frequency mottle of the choroid.
    rho2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / r**2
    light = 1 - rng.uniform(0.3, 0.5) * rho2 ** rng.uniform(1.0, 1.6)
    a = rng.uniform(0, 2 * math.pi)
    light *= 1 + rng.uniform(0, 0.12) * ((xx - cx) * math.cos(a) + (yy - cy) * math.sin(a)) / r
    dm2 = ((xx - f.mx * s) ** 2 + (yy - f.my * s) ** 2) / (f.rd * s * rng.uniform(1.4, 1.8)) ** 2
    light *= 1 - rng.uniform(0.25, 0.4) * np.exp(-0.5 * dm2)
    mottle = Image.fromarray(rng.standard_normal((6, 6), dtype=np.float32))  # mode "F"
    light *= 1 + 0.04 * np.asarray(mottle.resize((size, size), Image.BILINEAR))
    # Outside the field of view the camera sees (almost) black; a soft edge like a real aperture.
    edge = np.clip((r - np.sqrt(rho2) * r) / 1.2, 0, 1)
    gain = rng.uniform(0.8, 1.15) * rng.uniform(0.92, 1.08, 3).astype(np.float32)  # exposure, white balance
    img = img * (light * edge)[..., None] * gain + (4.0 * (1 - edge))[..., None]
    contrast = rng.uniform(0.85, 1.15)
    mean = img.mean()
    img = (img - mean) * contrast + mean
    img += rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(1.0, 3.5)  # sensor noise
    out = img.clip(0, 255).astype(np.uint8)
    if eye == "left":  # the left eye is the right eye's mirror image: disc on the other side
        out = np.ascontiguousarray(out[:, ::-1])
    return out


def _optic_disc(pil: Image.Image, f: _Fundus, rng: np.random.Generator) -> None:
    """Blend a pale disc with a brighter cup and soft rim into ``pil`` (only its bounding box)."""
    x0, y0 = max(0, int(f.dx - 1.5 * f.rd)), max(0, int(f.dy - 1.5 * f.rd))
    x1, y1 = min(f.w, int(f.dx + 1.5 * f.rd) + 1), min(f.w, int(f.dy + 1.5 * f.rd) + 1)
    box = (x0, y0, x1, y1)
    patch = np.asarray(pil.crop(box), dtype=np.float32)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    d = np.sqrt((xx - f.dx) ** 2 + (yy - f.dy) ** 2)
    disc_col = np.array([250, 222, 150], dtype=np.float32) * rng.uniform(0.92, 1.02)
    alpha = np.clip((f.rd - d) / (0.3 * f.rd) + 0.5, 0, 1)[..., None]
    patch = patch * (1 - alpha) + disc_col * alpha
    cup = np.clip((rng.uniform(0.35, 0.5) * f.rd - d) / (0.2 * f.rd) + 0.5, 0, 1)[..., None] * 0.6
    patch = patch * (1 - cup) + np.float32(255) * cup
    pil.paste(Image.fromarray(patch.clip(0, 255).astype(np.uint8)), box)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an H x W x 3 uint8 array."""
    buf = io.BytesIO()
    # Level 1: noisy photos shrink only ~10% more at level 6, which costs ~50% more encode time.
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _neighbour_grade(grade: int, u: float) -> int:
    if grade == 0:
        return 1
    if grade == NUM_CLASSES - 1:
        return grade - 1
    return grade + (1 if u < 0.5 else -1)


def generate(num_images: int, image_size: int, seed: int, label_noise: float = 0.05) -> Iterator[dict]:
    """Yield ``num_images`` synthetic records in :data:`SCHEMA`, two eyes per patient.

    Deterministic for a seed: patient ``i`` draws from its own generator seeded by ``(seed, i)``, so
    any slice of the stream can be regenerated alone. A patient's two grades are correlated (60%
    share the patient's grade, otherwise an independent draw), which keeps the class mix at
    :data:`CLASS_MIX`. A ``label_noise`` fraction of labels move to a neighbouring grade, as
    graders disagree by one grade; the images do not depend on ``label_noise``.
    """
    if not 0 <= label_noise <= 1:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    mix = np.asarray(CLASS_MIX)
    for p in range((num_images + 1) // 2):
        rng = np.random.default_rng([seed, p])
        patient_grade = int(rng.choice(NUM_CLASSES, p=mix))
        for eye in ("left", "right")[: min(2, num_images - 2 * p)]:
            grade = patient_grade if rng.random() < 0.6 else int(rng.choice(NUM_CLASSES, p=mix))
            # Always draw both numbers, so the images do not depend on label_noise: changing it
            # only moves labels.
            u_noise, u_side = rng.random(2)
            label = _neighbour_grade(grade, u_side) if u_noise < label_noise else grade
            yield {
                "image_id": f"synth_{p:05d}_{eye}",
                "patient_id": f"synth_{p:05d}",
                "eye": eye,
                "image": encode_png(render_fundus(rng, grade, image_size, eye)),
                "label": label,
            }


# ---------------------------------------------------------------------------------------------
# The shared image transform (training, evaluation, serving)
# ---------------------------------------------------------------------------------------------


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


def decode_batch(
    batch: dict[str, np.ndarray], image_size: int, augment: bool, seed: int | None = None
) -> dict[str, np.ndarray]:
    """Decode a batch of stored records for a model.

    Returns ``{"image": uint8 N x 3 x H x W, "label": int64 N, "image_id": str N}``. With
    ``seed`` the augmentation of each image depends only on (seed, image_id); vary the seed per
    epoch. Without it, augmentation is fresh randomness.
    """
    ids = np.asarray(batch["image_id"]).astype(str)
    out = np.empty((len(ids), 3, image_size, image_size), dtype=np.uint8)
    for i, (image_id, data) in enumerate(zip(ids, batch["image"], strict=True)):
        rng = None
        if augment:
            rng = np.random.default_rng(None if seed is None else [seed, zlib.crc32(image_id.encode())])
        try:
            out[i] = preprocess_image(bytes(data), image_size, augment=augment, rng=rng)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot decode image {image_id}: {_short(err)}") from None
    return {
        "image": out,
        "label": np.asarray(batch["label"]).astype(np.int64),
        "image_id": ids.astype(object),
    }


def _short(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------
# Importers for the public layouts
# ---------------------------------------------------------------------------------------------

_LAYOUTS = {
    # layout: (labels CSV, id column, label column, image folders tried in order, extensions)
    "eyepacs": ("trainLabels.csv", "image", "level", ("", "images", "train"), (".jpeg", ".jpg", ".png")),
    "aptos": ("train.csv", "id_code", "diagnosis", ("train_images", ""), (".png", ".jpg", ".jpeg")),
}
_EYE_RE = re.compile(r"^(?P<patient>.+)_(?P<eye>left|right)$", re.IGNORECASE)


def detect_layout(path: str) -> str:
    """Return "eyepacs" or "aptos" from the labels CSV found in ``path``."""
    if not os.path.exists(path):
        raise DataError(f"data path not found: {path}")
    if not os.path.isdir(path):
        raise DataError(f"data path is not a folder: {path}")
    for layout, (csv_name, *_rest) in _LAYOUTS.items():
        if os.path.isfile(os.path.join(path, csv_name)):
            return layout
    wanted = " or ".join(spec[0] for spec in _LAYOUTS.values())
    raise DataError(f"no labels file in {path}: expected {wanted} (EyePACS or APTOS 2019 layout)")


def _find_image(path: str, folders: tuple[str, ...], exts: tuple[str, ...], name: str) -> str | None:
    for folder in folders:
        for ext in exts:
            candidate = os.path.join(path, folder, name + ext)
            if os.path.isfile(candidate):
                return candidate
    return None


def import_images(
    layout: str,
    path: str,
    image_size: int | None,
    on_bad_image: str = "fail",
    skipped: list[str] | None = None,
    limit: int | None = None,
) -> Iterator[dict]:
    """Yield :data:`SCHEMA` records from an EyePACS (``trainLabels.csv``) or APTOS (``train.csv``) folder.

    Each photo is decoded, cropped to the retina, resized to ``image_size`` (None keeps its size)
    and re-encoded as PNG. EyePACS names (``<patient>_left``) give the patient and eye; APTOS has
    no patient ids, so each photo is its own patient. A missing or undecodable photo raises
    DataError (``on_bad_image="fail"``) or is left out and its id appended to ``skipped``.
    ``limit`` stops after that many records.
    """
    if layout not in _LAYOUTS:
        raise DataError(f"unknown data layout {layout!r}: choose one of {', '.join(_LAYOUTS)}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise DataError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
    csv_name, id_col, label_col, folders, exts = _LAYOUTS[layout]
    if not os.path.isdir(path):
        raise DataError(f"data path not found: {path}")
    csv_path = os.path.join(path, csv_name)
    if not os.path.isfile(csv_path):
        raise DataError(f"labels file not found: {csv_path}")
    skipped = skipped if skipped is not None else []
    count = 0
    # utf-8-sig: CSVs saved by spreadsheet tools start with a byte-order mark that would
    # otherwise glue itself to the first column's name.
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        found = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in (id_col, label_col) if c not in found]
        if missing:
            raise DataError(
                f"{csv_path} lacks column(s) {', '.join(missing)} (found: {', '.join(found) or 'none'})"
            )
        reader.fieldnames = found
        for line, row in enumerate(reader, start=2):
            if limit is not None and count >= limit:
                return
            name = (row[id_col] or "").strip()
            try:
                label = int(str(row[label_col]).strip())
            except ValueError:
                label = -1
            if not name or not 0 <= label < NUM_CLASSES:
                raise DataError(
                    f"{csv_path} line {line}: bad row {name or '?'}: {label_col} must be a grade 0-4, "
                    f"got {row[label_col]!r}"
                )
            file = _find_image(path, folders, exts, name)
            try:
                if file is None:
                    raise FileNotFoundError(f"no {name}{exts[0]} in {path}")
                with open(file, "rb") as img_f:
                    png = encode_png(load_rgb(img_f.read(), image_size))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                if on_bad_image == "fail":
                    where = file or os.path.join(path, folders[0], name + exts[0])
                    raise DataError(f"bad image {where} (id {name}): {_short(err)}") from None
                skipped.append(name)
                continue
            m = _EYE_RE.match(name) if layout == "eyepacs" else None
            yield {
                "image_id": name,
                "patient_id": m["patient"] if m else name,
                "eye": m["eye"].lower() if m else "",
                "image": png,
                "label": label,
            }
            count += 1


# ---------------------------------------------------------------------------------------------
# Splits by patient
# ---------------------------------------------------------------------------------------------


def assign_split(patient_id: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    """Return the split ("train", "val" or "test") of a patient, from a seeded hash of its id.

    Hashing (instead of shuffling a list) keeps both eyes of a patient together, needs no memory
    for huge datasets, and gives a patient the same split whatever else is in the dataset.
    """
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_by_patient(
    records: Iterable[dict], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[dict]]:
    """Group records into train/val/test lists by :func:`assign_split` of their ``patient_id``."""
    _check_fractions(val_fraction, test_fraction)
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for r in records:
        out[assign_split(r["patient_id"], val_fraction, test_fraction, seed)].append(r)
    return out


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be >= 0 "
            "and leave some training data (sum < 1)"
        )


# ---------------------------------------------------------------------------------------------
# prepare: source -> shards + manifest
# ---------------------------------------------------------------------------------------------


def prepare(
    source: str,
    root: str,
    num_images: int,
    image_size: int,
    rows_per_shard: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    label_noise: float,
    import_path: str | None,
    on_bad_image: str,
) -> dict:
    """Write the retinopathy dataset to ``root`` (Parquet shards + manifest) and return the manifest.

    ``source`` is "synthetic", "eyepacs", "aptos" or "auto" (detected from ``import_path``). For
    imports, ``num_images`` caps the number of photos (0 or less: all). A ``root`` already holding
    a dataset prepared with the same arguments is returned as is.
    """
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}: choose one of {', '.join(SOURCES)}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise DataError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
    _check_fractions(val_fraction, test_fraction)
    root = str(root)
    if source != "synthetic":
        if not import_path:
            raise DataError(f"data source {source!r} needs an import path (the folder with the labels CSV)")
        layout = detect_layout(import_path)
        if source != "auto" and layout != source:
            raise DataError(f"{import_path} holds a {layout} layout, not {source}")
        import_path = os.path.abspath(import_path)
        source = layout
        # Fingerprint the labels file too, so corrected labels are re-imported, not reused.
        labels_sha256 = sha256_file(os.path.join(import_path, _LAYOUTS[layout][0]))
    else:
        layout, import_path, labels_sha256 = None, None, None
    args = {
        "source": source,
        "image_size": image_size,
        "num_images": num_images,
        "label_noise": label_noise if layout is None else None,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "rows_per_shard": rows_per_shard,
        "import_path": import_path,
        "import_labels_sha256": labels_sha256,
        "on_bad_image": on_bad_image,
    }
    existing = _existing(root, args)
    if existing is not None:
        return existing

    skipped: list[str] = []
    if layout is None:
        records: Iterable[dict] = generate(num_images, image_size, seed, label_noise)
    else:
        limit = num_images if num_images and num_images > 0 else None
        records = import_images(layout, import_path, image_size, on_bad_image, skipped, limit)
    counts = {s: [0] * NUM_CLASSES for s in SPLITS}
    with ShardWriter(root, TASK, SCHEMA, rows_per_shard, SPLITS) as writer:
        for r in records:
            split = assign_split(r["patient_id"], val_fraction, test_fraction, seed)
            writer.add(split, r)
            counts[split][r["label"]] += 1
        if skipped:
            shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
            print(
                f"warning: skipped {len(skipped)} unreadable image(s) from {import_path}: {shown} "
                f"(listed in {os.path.join(root, 'manifest.json')} meta.skipped_images)",
                file=sys.stderr,
            )
        return writer.close({**args, "class_counts": counts, "skipped_images": skipped})


def _existing(root: str, args: dict[str, Any]) -> dict | None:
    """The manifest at ``root`` if it was prepared with ``args`` (see :func:`shards.reusable`)."""
    return reusable(root, TASK, lambda meta: all(meta.get(k) == v for k, v in args.items()))


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

_READ_COLUMNS = ["image_id", "image", "label"]


def read_split(
    root: str, split: str, image_size: int, augment: bool, manifest: dict | None = None
) -> ray.data.Dataset:
    """A Ray Dataset of decoded ``split`` batches: columns image (3 x H x W float32), label, image_id.

    The shards are checked first, so a corrupt file is named before Ray Data fails on it with a
    message that does not say which file it was.
    """
    import ray.data

    manifest = manifest if manifest is not None else load_manifest(root)
    paths = readable_paths(root, manifest, split)
    # select_columns is pushed down into the Parquet read: patient_id and eye are never loaded
    ds = ray.data.read_parquet(paths).select_columns(_READ_COLUMNS)
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"image_size": image_size, "augment": augment},
        batch_format="numpy",
        batch_size=64,
    )


def iter_split_numpy(
    root: str, split: str, batch_size: int, image_size: int, manifest: dict | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Decoded batches of ``split`` in file order with plain pyarrow (no Ray, no augmentation)."""
    manifest = manifest if manifest is not None else load_manifest(root)
    for table in iter_tables(readable_paths(root, manifest, split), _READ_COLUMNS, batch_size):
        yield _decode_table(table, image_size)


def _decode_table(table: pa.Table, image_size: int) -> dict[str, np.ndarray]:
    batch = {
        "image_id": np.asarray(table.column("image_id").to_pylist(), dtype=object),
        "image": np.asarray(table.column("image").to_pylist(), dtype=object),
        "label": table.column("label").to_numpy(),
    }
    return decode_batch(batch, image_size, augment=False)
