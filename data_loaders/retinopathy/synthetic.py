"""Synthetic fundus photos whose grade shows only through the lesions of the ICDR scale.

:func:`generate` yields :data:`~data_loaders.retinopathy.schema.SCHEMA` records, two eyes per
patient; :func:`render_fundus` draws one photo.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from ..shards import encode_png
from .schema import CLASS_MIX, NUM_CLASSES

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
