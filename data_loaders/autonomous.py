"""Multi-camera driving data: a ray-cast rig generator, a rig-folder importer, splits, readers.

One record (:data:`SCHEMA`) is one rig sample: 8 camera images, 8 depth maps, 2D boxes and lane
polylines per camera. :func:`generate` renders them from real geometry (a pinhole camera ring
over a straight multi-lane road with cuboid cars, trucks and pedestrians); :func:`import_rig`
reads the same thing from a folder; :func:`prepare` writes Parquet shards plus ``stats.npz``
(training-split baselines); :func:`read_split` (Ray Data) and :func:`iter_split_numpy` (plain
pyarrow) decode them through :func:`preprocess_images`, the image transform serving reuses.

Geometry (ego frame: x forward, y left, z up, metres; ego at the origin): camera ``k`` sits at
height :data:`CAMERA_HEIGHT`, yaw ``k * 45`` degrees (0 looks forward, counter-clockwise), pitched
down :data:`CAMERA_PITCH_DEG`, horizontal field of view :data:`HFOV_DEG` (adjacent views overlap
by ~21 degrees). Pixel ``(col, row)`` covers ``[col, col + 1) x [row, row + 1)``; boxes and lane
points are in these continuous pixel coordinates. Depth is z-depth along the optical axis.

Rig folder layout (``source: rig``)::

    <rig>/<sample_id>/cam0.png .. cam7.png      RGB (any PNG/JPEG mode), all the same size
    <rig>/<sample_id>/depth0.png .. depth7.png  optional 16-bit grayscale PNG, depth in millimetres
                                                (0 = no depth; a missing file = no depth there)
    <rig>/<sample_id>/annotations.json
        {"cameras": [                          exactly 8 entries, camera k at index k
            {"boxes": [{"label": "car", "xyxy": [x1, y1, x2, y2]}, ...],   pixels, label in CLASSES
             "lanes": [{"slot": 0, "points": [[u, v], ...]}, ...]},        slot < num_lanes, >= 2 points
            ...]}

Lane slot ``k`` is the ``k``-th painted line from the left of the road. A lane with exactly
``lane_points`` points is kept as given; any other count (>= 2) is resampled to ``lane_points``
points evenly spaced by arc length in the image. :func:`export_rig` writes this layout.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import math
import os
import re
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image

from .errors import DataError
from .retinopathy import _check_fractions, assign_split, encode_png
from .shards import ShardWriter, iter_tables, load_manifest, readable_paths, reusable

if TYPE_CHECKING:  # ray is heavy; importing data_loaders must stay cheap
    import ray.data

TASK = "autonomous"
NUM_CAMERAS = 8
CLASSES = ("car", "truck", "pedestrian")
SPLITS = ("train", "val", "test")
SOURCES = ("synthetic", "rig")
BAD_SAMPLE_POLICIES = ("skip", "fail")
STATS_FILE = "stats.npz"

BOX_TYPE = pa.struct(
    [
        ("camera", pa.int8()),
        ("label", pa.int8()),  # index into CLASSES
        ("x1", pa.float32()),  # pixels, continuous coordinates (x2, y2 exclusive edges)
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
    ]
)
SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("images", pa.list_(pa.binary())),  # 8 PNG, RGB uint8, camera order
        ("depths", pa.list_(pa.binary())),  # 8 PNG, 16-bit grayscale, millimetres, 0 = invalid
        ("boxes", pa.list_(BOX_TYPE)),
        ("lanes", pa.list_(pa.float32())),  # [8, num_lanes, lane_points, 2] (u, v) pixels, flattened
        ("lane_exists", pa.list_(pa.bool_())),  # [8, num_lanes], flattened
        ("height", pa.int16()),
        ("width", pa.int16()),
    ]
)

# Per-channel mean and std of generated rig images (all 8 cameras, sky included; measured on 200
# rigs at 64 x 96), so inputs are about zero-mean, unit-variance. Fixed constants, not
# per-dataset statistics: serving must normalise a lone rig exactly as training did.
MEAN = np.array([0.45, 0.51, 0.55], dtype=np.float32)
STD = np.array([0.15, 0.18, 0.26], dtype=np.float32)

# --- rig and world geometry ---
CAMERA_HEIGHT = 1.6  # m above the ground
CAMERA_PITCH_DEG = 4.0  # down: a little more road, a little less sky
HFOV_DEG = 66.0
MAX_DEPTH = 60.0  # m; farther hits get depth 0 (invalid), as from a real depth sensor
LANE_WIDTH = 3.5  # m between painted lines
LINE_WIDTH = 0.2  # m of paint
DASH_ON, DASH_PERIOD = 3.0, 9.0  # m: inner lines are 3 m dashes every 9 m
LANE_NEAR, LANE_FAR = 2.0, 40.0  # lane labels: camera depth >= 2 m, within 40 m along the road
MIN_LANE_LENGTH = 3.0  # m of visible line below which a lane does not "exist" in a camera
MIN_BOX_PIXELS = 12  # visible pixels below which an object gets no box in a camera
OBJECT_RANGE = (4.0, 25.0)  # m from the ego to an object's centre
CLASS_MIX = (0.55, 0.2, 0.25)
# (length, width, height) ranges in metres per class
_SIZES = {
    0: ((4.0, 5.0), (1.7, 1.95), (1.4, 1.6)),
    1: ((7.0, 9.5), (2.4, 2.6), (2.8, 3.4)),
    2: ((0.45, 0.7), (0.45, 0.7), (1.6, 1.9)),
}
# HSV colour families per class: blue cars, red/orange trucks, magenta pedestrians' tops
_HUES = {0: (0.56, 0.66), 1: (0.0, 0.08), 2: (0.78, 0.9)}

# Value-noise tables for ground texture, tiled; fixed so the stream depends only on the seed.
_NOISE = np.random.default_rng(1234).standard_normal((2, 256, 256)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Cameras
# ---------------------------------------------------------------------------------------------


def _hw(image_size: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (height, width), got {image_size!r}") from None
    if h < 8 or w < 8:
        raise ValueError(f"image_size must be at least 8 x 8, got {h} x {w}")
    return h, w


def camera_model(image_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intrinsics ``K`` [3, 3], camera-to-ego rotations ``R`` [8, 3, 3] and the shared centre [3].

    Camera axes follow OpenCV (x right, y down, z forward): ``R[k] @ p_cam`` is a direction in
    the ego frame; a point ``X`` projects as ``K @ R[k].T @ (X - centre)``.
    """
    h, w = _hw(image_size)
    f = (w / 2) / math.tan(math.radians(HFOV_DEG) / 2)
    K = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]], dtype=np.float64)
    p = math.radians(CAMERA_PITCH_DEG)
    R = np.empty((NUM_CAMERAS, 3, 3))
    for k in range(NUM_CAMERAS):
        yaw = math.radians(45.0 * k)
        fwd = np.array([math.cos(p) * math.cos(yaw), math.cos(p) * math.sin(yaw), -math.sin(p)])
        right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
        R[k] = np.stack([right, np.cross(fwd, right), fwd], axis=1)
    return K, R, np.array([0.0, 0.0, CAMERA_HEIGHT])


def project(points: np.ndarray, camera: int, image_size: Sequence[int]) -> np.ndarray:
    """Project ego-frame points [..., 3] into ``camera``: [..., 3] of (u, v, depth) in pixels, metres."""
    K, R, c = camera_model(image_size)
    pc = (np.asarray(points, dtype=np.float64) - c) @ R[camera]
    z = pc[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = K[0, 0] * pc[..., 0] / z + K[0, 2]
        v = K[1, 1] * pc[..., 1] / z + K[1, 2]
    return np.stack([u, v, z], axis=-1)


class _Rays:
    """Per image size: every pixel's ray (camera z = 1, so the hit distance is z-depth)."""

    _cache: dict[tuple[int, int], _Rays] = {}

    def __init__(self, h: int, w: int) -> None:
        K, R, c = camera_model((h, w))
        vv, uu = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
        rc = np.stack([(uu - K[0, 2]) / K[0, 0], (vv - K[1, 2]) / K[1, 1], np.ones_like(uu)], -1)
        d = np.einsum("kij,nj->kni", R, rc.reshape(-1, 3))  # [8, N, 3] ego-frame directions
        self.K, self.R, self.c, self.f = K, R, c, float(K[0, 0])
        self.d = d.astype(np.float32)
        self.dz = np.ascontiguousarray(self.d[..., 2])
        # widest azimuth any pixel of a camera sees (bottom corners, with pitch): camera culling
        self.half_az = float(np.abs(np.arctan2(d[0, :, 1], d[0, :, 0])).max())
        # sine of each ray's elevation, for the sky gradient
        self.elev = (d[..., 2] / np.linalg.norm(d, axis=-1)).astype(np.float32)

    @classmethod
    def get(cls, h: int, w: int) -> _Rays:
        r = cls._cache.get((h, w))
        if r is None:
            r = cls._cache[(h, w)] = cls(h, w)
        return r


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


@dataclass
class Cuboid:
    """An object standing on the ground: centre (x, y), yaw about z, extents in metres."""

    label: int
    x: float
    y: float
    yaw: float
    length: float
    width: float
    height: float
    colour: tuple[float, float, float] = (128.0, 128.0, 128.0)  # 0-255

    @property
    def radius(self) -> float:
        """Half the footprint's diagonal: a circle that holds the footprint."""
        return 0.5 * math.hypot(self.length, self.width)

    def corners(self) -> np.ndarray:
        """The 8 corners in the ego frame, [8, 3]."""
        sx, sy = self.length / 2, self.width / 2
        local = np.array([(a * sx, b * sy, z) for a in (-1, 1) for b in (-1, 1) for z in (0.0, self.height)])
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        xy = local[:, :2] @ np.array([[c, s], [-s, c]]) + (self.x, self.y)
        return np.concatenate([xy, local[:, 2:]], axis=1)


@dataclass
class Scene:
    """Everything one rig sample shows; :func:`render_scene` turns it into images and labels."""

    heading: float  # road direction in the ego frame (rad); the ego drives a little off-axis
    lateral: float  # ego's offset from the road centre line (m, + = left)
    lane_offsets: np.ndarray  # [L] lateral offsets of the painted lines from the road centre, slot order
    dashed: np.ndarray  # [L] bool
    paint: np.ndarray  # [L, 3] paint colour
    dash_phase: np.ndarray  # [L] m
    road_half_width: float  # asphalt from the centre line to the verge
    objects: list[Cuboid] = field(default_factory=list)
    sun: np.ndarray = field(default_factory=lambda: np.array([0.5, 0.3, 0.81]))  # unit vector to the sun
    asphalt: np.ndarray = field(default_factory=lambda: np.array([95.0, 95.0, 100.0]))
    verge: np.ndarray = field(default_factory=lambda: np.array([85.0, 110.0, 60.0]))
    sky_top: np.ndarray = field(default_factory=lambda: np.array([95.0, 145.0, 215.0]))
    sky_horizon: np.ndarray = field(default_factory=lambda: np.array([200.0, 212.0, 225.0]))
    gains: np.ndarray = field(default_factory=lambda: np.ones((NUM_CAMERAS, 3)))  # per camera exposure
    noise: float = 2.0  # sensor noise std, 0-255 units
    texture_shift: tuple[int, int] = (0, 0)
    noise_seed: int = 0


def _lane_lines(num_lanes: int) -> np.ndarray:
    """Lateral offsets of ``num_lanes`` painted lines, left (+y) to right, centred on the road."""
    return ((num_lanes - 1) / 2 - np.arange(num_lanes)) * LANE_WIDTH


def _free(obj: Cuboid, placed: list[Cuboid]) -> bool:
    # bounding circles: conservative, cheap, and keeps a visible gap between objects
    if math.hypot(obj.x, obj.y) - obj.radius < 2.0:  # the ego car and its cameras
        return False
    return all(math.hypot(obj.x - o.x, obj.y - o.y) > obj.radius + o.radius + 0.3 for o in placed)


def make_scene(rng: np.random.Generator, max_boxes: int, num_lanes: int) -> Scene:
    """Draw a random scene with 1..``max_boxes`` objects; :func:`generate` calls this per sample.

    Sample ``i`` of ``generate(..., seed)`` is ``make_scene(np.random.default_rng([seed, i]), ...)``.
    """
    if max_boxes < 1 or num_lanes < 1:
        raise ValueError(f"max_boxes and num_lanes must be >= 1, got {max_boxes} and {num_lanes}")
    heading = math.radians(rng.uniform(-8, 8))
    offsets = _lane_lines(num_lanes)
    centres = (offsets[:-1] + offsets[1:]) / 2 if num_lanes > 1 else offsets - LANE_WIDTH / 2
    lateral = float(rng.choice(centres) + rng.uniform(-0.45, 0.45))
    dashed = np.zeros(num_lanes, dtype=bool)
    if num_lanes >= 3:
        dashed[1:-1] = True  # outer lines solid, lane dividers dashed
    paint = np.tile(np.array([232.0, 232.0, 226.0]) * rng.uniform(0.85, 1.0), (num_lanes, 1))
    if rng.random() < 0.35:
        paint[0] = (225.0, 185.0, 55.0)  # a yellow left edge line
    sun_az, sun_el = rng.uniform(0, 2 * math.pi), math.radians(rng.uniform(35, 65))
    scene = Scene(
        heading=heading,
        lateral=lateral,
        lane_offsets=offsets,
        dashed=dashed,
        paint=paint,
        dash_phase=rng.uniform(0, DASH_PERIOD, num_lanes),
        road_half_width=float(max(np.abs(offsets).max(), LANE_WIDTH) + rng.uniform(0.8, 2.0)),
        sun=np.array(
            [math.cos(sun_el) * math.cos(sun_az), math.cos(sun_el) * math.sin(sun_az), math.sin(sun_el)]
        ),
        asphalt=np.array([92.0, 92.0, 97.0]) * rng.uniform(0.75, 1.2) + rng.normal(0, 3, 3),
        verge=np.array([80.0, 108.0, 58.0]) * rng.uniform(0.8, 1.2) + rng.normal(0, 6, 3),
        sky_top=np.array([90.0, 140.0, 212.0]) * rng.uniform(0.85, 1.1),
        sky_horizon=np.array([198.0, 210.0, 224.0]) * rng.uniform(0.9, 1.08),
        gains=rng.uniform(0.9, 1.1, (NUM_CAMERAS, 1)) * rng.uniform(0.95, 1.05, (1, 3)),
        noise=float(rng.uniform(1.0, 3.5)),
        texture_shift=(int(rng.integers(0, 256)), int(rng.integers(0, 256))),
    )
    n = int(rng.integers(1, max_boxes + 1))
    for j in range(n):
        label = int(rng.choice(len(CLASSES), p=CLASS_MIX))
        (l0, l1), (w0, w1), (h0, h1) = _SIZES[label]
        length, width, height = rng.uniform(l0, l1), rng.uniform(w0, w1), rng.uniform(h0, h1)
        hue = rng.uniform(*_HUES[label])
        colour = tuple(
            255 * c for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 0.85), rng.uniform(0.55, 0.95))
        )
        # Half the rigs get an object straddling a camera seam (yaw 22.5 + 45k): fusion across
        # cameras must then stitch one object from two views.
        seam = j == 0 and rng.random() < 0.5
        for _ in range(40):
            r_min = max(OBJECT_RANGE[0], 0.5 * math.hypot(length, width) + 2.05)
            if seam:
                az = math.radians(22.5 + 45 * int(rng.integers(0, 8)) + rng.normal(0, 3))
                r = rng.uniform(r_min, min(18.0, OBJECT_RANGE[1]))
            else:
                az, r = rng.uniform(0, 2 * math.pi), rng.uniform(r_min, OBJECT_RANGE[1])
            if label != 2 and rng.random() < 0.75:  # vehicles mostly follow the road, either way
                yaw = heading + (math.pi if rng.random() < 0.3 else 0.0) + rng.normal(0, 0.08)
            else:
                yaw = rng.uniform(-math.pi, math.pi)
            obj = Cuboid(label, r * math.cos(az), r * math.sin(az), yaw, length, width, height, colour)
            if _free(obj, scene.objects):
                scene.objects.append(obj)
                break
    scene.noise_seed = int(rng.integers(0, 2**31))
    return scene


# ---------------------------------------------------------------------------------------------
# Rendering: one ray per pixel against the ground plane and the cuboids (slab method)
# ---------------------------------------------------------------------------------------------


def _slab(ox, oy, oz, dx, dy, dz, obj: Cuboid):
    """Entry distance and entry-face axis of rays vs. ``obj``; miss = inf. Inputs in the ego frame."""
    c, s = math.cos(obj.yaw), math.sin(obj.yaw)
    # into the object's frame: centre at the origin of x/y, ground at z = 0
    lx, ly = c * (ox - obj.x) + s * (oy - obj.y), -s * (ox - obj.x) + c * (oy - obj.y)
    ldx, ldy = c * dx + s * dy, -s * dx + c * dy
    tnear = np.full(np.broadcast(lx, ly, oz, ldx, ldy, dz).shape, -np.inf, dtype=np.float32)
    tfar = np.full_like(tnear, np.inf)
    axis = np.zeros(tnear.shape, dtype=np.int8)
    with np.errstate(divide="ignore", invalid="ignore"):
        for a, (o, d, lo, hi) in enumerate(
            (
                (lx, ldx, -obj.length / 2, obj.length / 2),
                (ly, ldy, -obj.width / 2, obj.width / 2),
                (oz, dz, 0.0, obj.height),
            )
        ):
            inv = 1.0 / d
            t1, t2 = (lo - o) * inv, (hi - o) * inv
            tmin, tmax = np.fmin(t1, t2), np.fmax(t1, t2)  # fmin/fmax: 0 * inf = nan loses to a number
            later = tmin > tnear
            tnear = np.where(later, tmin, tnear)
            axis[later] = a
            tfar = np.fmin(tfar, tmax)
    hit = (tnear <= tfar) & (tnear > 1e-4)
    return np.where(hit, tnear, np.float32(np.inf)), axis, ldx, ldy


def render_scene(scene: Scene, image_size: Sequence[int], lane_points: int) -> dict[str, Any]:
    """Render all cameras of ``scene`` and derive its labels from the same geometry.

    Returns ``image`` uint8 [8, H, W, 3], ``depth`` float32 [8, H, W] (z-depth, 0 = sky or beyond
    :data:`MAX_DEPTH`), ``instance`` int16 [8, H, W] (-1 sky, 0 ground, j + 1 object j),
    ``boxes`` list of (camera, label, x1, y1, x2, y2, object index), ``lanes`` float32
    [8, L, lane_points, 2] and ``lane_exists`` bool [8, L].
    """
    h, w = _hw(image_size)
    rays = _Rays.get(h, w)
    d, dz = rays.d, rays.dz
    ch = np.float32(CAMERA_HEIGHT)
    with np.errstate(divide="ignore"):
        t = np.where(dz < -1e-6, ch / -dz, np.float32(np.inf)).astype(np.float32)  # [8, N] ground
    inst = np.where(np.isfinite(t), 0, -1).astype(np.int16)
    shade = np.ones_like(t)
    part = np.zeros(t.shape, dtype=np.int8)  # object detail: 0 body, 1 window/dark, 2 skin, 3 legs

    cam_yaw = np.radians(45.0 * np.arange(NUM_CAMERAS))
    for j, obj in enumerate(scene.objects):
        # cull cameras that cannot see the object's bounding circle
        az = math.atan2(obj.y, obj.x)
        spread = math.asin(min(1.0, obj.radius / math.hypot(obj.x, obj.y)))
        gap = np.abs((cam_yaw - az + math.pi) % (2 * math.pi) - math.pi)
        cams = np.flatnonzero(gap <= rays.half_az + spread + 0.02)
        if cams.size == 0:
            continue
        sub = d[cams]
        tj, axis, ldx, ldy = _slab(0.0, 0.0, CAMERA_HEIGHT, sub[..., 0], sub[..., 1], sub[..., 2], obj)
        closer = tj < t[cams]
        if not closer.any():
            continue
        # face normal (entering face opposes the ray), back to the ego frame, then Lambert shading
        c, s = math.cos(obj.yaw), math.sin(obj.yaw)
        sign = np.where(axis == 0, -np.sign(ldx), np.where(axis == 1, -np.sign(ldy), 1.0))
        nx = np.where(axis == 0, c, np.where(axis == 1, -s, 0.0)) * sign
        ny = np.where(axis == 0, s, np.where(axis == 1, c, 0.0)) * sign
        nz = np.where(axis == 2, 1.0, 0.0)
        lam = np.maximum(0.0, nx * scene.sun[0] + ny * scene.sun[1] + nz * scene.sun[2])
        zrel = (CAMERA_HEIGHT + tj * sub[..., 2]) / obj.height  # hit height / object height
        if obj.label == 0:  # car: windows band on the sides, dark sills and wheels
            detail = np.where((axis < 2) & (zrel > 0.62) & (zrel < 0.9), 1, np.where(zrel < 0.12, 1, 0))
        elif obj.label == 1:  # truck: dark chassis
            detail = np.where(zrel < 0.12, 1, 0)
        else:  # pedestrian: head, top in the class colour, dark legs
            detail = np.where(zrel > 0.87, 2, np.where(zrel < 0.47, 3, 0))
        t[cams] = np.where(closer, tj, t[cams])
        inst[cams] = np.where(closer, j + 1, inst[cams])
        shade[cams] = np.where(closer, 0.45 + 0.6 * lam, shade[cams]).astype(np.float32)
        part[cams] = np.where(closer, detail, part[cams])

    rgb = np.empty(t.shape + (3,), dtype=np.float32)
    sky = inst < 0
    frac = np.clip(rays.elev[sky] / 0.35, 0, 1)[:, None]
    rgb[sky] = scene.sky_horizon * (1 - frac) + scene.sky_top * frac
    ground = inst == 0
    rgb[ground] = _shade_ground(scene, rays, ground, t[ground])
    if scene.objects:
        palette = np.array([(0, 0, 0)] + [o.colour for o in scene.objects], dtype=np.float32)
        obj_px = inst > 0
        col = palette[inst[obj_px]]
        p = part[obj_px]
        col[p == 1] = (38, 44, 52)
        col[p == 2] = (205, 165, 135)
        col[p == 3] = (48, 48, 68)
        col = col * shade[obj_px][:, None]
        fog = 1 - np.exp(-t[obj_px] / 180.0)[:, None]
        rgb[obj_px] = col * (1 - fog) + scene.sky_horizon * fog

    noise_rng = np.random.default_rng(scene.noise_seed)
    rgb = rgb.reshape(NUM_CAMERAS, h, w, 3) * scene.gains[:, None, None, :].astype(np.float32)
    rgb += noise_rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(scene.noise)
    image = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)

    depth = np.where(np.isfinite(t) & (t <= MAX_DEPTH), t, 0).astype(np.float32).reshape(NUM_CAMERAS, h, w)
    inst = inst.reshape(NUM_CAMERAS, h, w)
    lanes, exists = _lanes(scene, rays, h, w, lane_points)
    return {
        "image": image,
        "depth": depth,
        "instance": inst,
        "boxes": _boxes(scene, inst),
        "lanes": lanes,
        "lane_exists": exists,
    }


def _shade_ground(scene: Scene, rays: _Rays, ground: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Colours of ground pixels: asphalt or verge with texture, painted lines, shadows, haze."""
    cam = np.nonzero(ground)[0]
    d = rays.d[ground]
    x, y = t * d[:, 0], t * d[:, 1]  # hit points on z = 0
    ch, sh = math.cos(scene.heading), math.sin(scene.heading)
    along = x * ch + y * sh  # distance along the road
    lat = -x * sh + y * ch + scene.lateral  # offset from the road centre line
    road = np.abs(lat) <= scene.road_half_width
    col = np.where(road[:, None], scene.asphalt.astype(np.float32), scene.verge.astype(np.float32))
    # texture: smooth blotches plus a fine grain that fades once a pixel spans more than a grain
    sx, sy = scene.texture_shift
    pixel = t / rays.f  # metres of ground per pixel (at least)
    blotch = _value_noise(_NOISE[1], x / 2.5 + sx, y / 2.5 + sy)
    grain = _NOISE[
        0, np.floor(x * 12 + sy).astype(np.int64) & 255, np.floor(y * 12 + sx).astype(np.int64) & 255
    ]
    grain_amp = np.where(road, 0.06, 0.12) * np.clip(0.5 / (12 * pixel), 0, 1)
    col = col * (1 + np.where(road, 0.05, 0.1) * blotch + grain_amp * grain)[:, None]
    # Painted lines with analytic anti-aliasing: ``foot`` is the ground a pixel spans across the
    # line (one pixel right moves t/f sideways; one pixel down moves ~t^2/(f h) along the view).
    yaw = np.radians(45.0 * cam)
    across_right = np.abs(np.sin(yaw) * -sh - np.cos(yaw) * ch)  # |n_road . camera right|
    across_fwd = np.abs(np.cos(yaw) * -sh + np.sin(yaw) * ch)  # |n_road . camera forward|
    foot = t / rays.f * (across_right + t / CAMERA_HEIGHT * across_fwd) + 1e-3
    # only the nearest line can cover a pixel (lines are 3.5 m apart, far wider than the paint
    # wherever a pixel is small enough to see it)
    k = np.clip(np.rint((len(scene.lane_offsets) - 1) / 2 - lat / LANE_WIDTH), 0, len(scene.lane_offsets) - 1)
    k = k.astype(np.int64)
    alpha = np.clip((LINE_WIDTH / 2 - np.abs(lat - scene.lane_offsets[k])) / foot + 0.5, 0, 1) * 0.9
    gap = scene.dashed[k] & (((along - scene.dash_phase[k]) % DASH_PERIOD) >= DASH_ON)
    alpha = np.where(gap, 0, alpha).astype(np.float32)[:, None]
    col = col * (1 - alpha) + scene.paint[k].astype(np.float32) * alpha
    # Cast shadows: does the ray from the ground point towards the sun hit an object?
    lit = np.ones_like(t)
    sun = scene.sun
    reach = math.hypot(sun[0], sun[1]) / sun[2]  # shadow length per metre of object height
    for obj in scene.objects:
        near = np.flatnonzero(np.hypot(x - obj.x, y - obj.y) <= obj.radius + obj.height * reach + 0.2)
        if near.size:
            tj, *_ = _slab(x[near], y[near], 0.0, sun[0], sun[1], sun[2], obj)
            lit[near[np.isfinite(tj)]] = 0.55
    col = col * (lit * (0.8 + 0.25 * sun[2]))[:, None]
    fog = 1 - np.exp(-t / 180.0)[:, None]
    return col * (1 - fog) + scene.sky_horizon.astype(np.float32) * fog


def _value_noise(table: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Bilinearly interpolated lattice noise (unit lattice, the table tiled)."""
    x0, y0 = np.floor(x), np.floor(y)
    fx, fy = (x - x0).astype(np.float32), (y - y0).astype(np.float32)
    i, j = x0.astype(np.int64) & 255, y0.astype(np.int64) & 255
    i1, j1 = (i + 1) & 255, (j + 1) & 255
    top = table[i, j] * (1 - fy) + table[i, j1] * fy
    bottom = table[i1, j] * (1 - fy) + table[i1, j1] * fy
    return top * (1 - fx) + bottom * fx


def _boxes(scene: Scene, inst: np.ndarray) -> list[tuple]:
    """Tight boxes of each object's visible pixels per camera (camera, label, x1, y1, x2, y2, j)."""
    out = []
    for k in range(NUM_CAMERAS):
        ids = inst[k]
        present = np.unique(ids[ids > 0])
        for j1 in present:
            m = ids == j1
            if m.sum() < MIN_BOX_PIXELS:
                continue
            rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
            obj = scene.objects[int(j1) - 1]
            out.append(
                (
                    k,
                    obj.label,
                    float(cols[0]),
                    float(rows[0]),
                    float(cols[-1] + 1),
                    float(rows[-1] + 1),
                    int(j1) - 1,
                )
            )
    return out


def _lane_order(num_cameras: int = NUM_CAMERAS) -> np.ndarray:
    """+1 where a camera lists lane points in the travel direction, -1 against it.

    Front and side cameras (0, 1, 2, 6, 7) go with the travel direction, rear ones (3, 4, 5)
    against it, so the front and rear cameras both list a lane from near to far.
    """
    return np.where(np.cos(np.radians(45.0 * np.arange(num_cameras))) > -0.1, 1.0, -1.0)


def _lanes(scene: Scene, rays: _Rays, h: int, w: int, lane_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Visible part of each painted line per camera, as ``lane_points`` (u, v) evenly spaced in 3D.

    A line is ``P(s) = A + s * dir``; in camera coordinates it is ``a + s * b``, and every limit
    (depth >= LANE_NEAR, |s| <= LANE_FAR, inside the image) is one linear inequality in ``s``,
    so the visible part is an interval found without sampling.
    """
    if lane_points < 2:
        raise ValueError(f"lane_points must be >= 2, got {lane_points}")
    direction = np.array([math.cos(scene.heading), math.sin(scene.heading), 0.0])
    normal = np.array([-math.sin(scene.heading), math.cos(scene.heading), 0.0])
    anchor = (scene.lane_offsets - scene.lateral)[:, None] * normal  # [L, 3] on the ground
    a = np.einsum("kji,lj->kli", rays.R, anchor - rays.c)  # [8, L, 3]
    b = np.einsum("kji,j->ki", rays.R, direction)[:, None, :]  # [8, 1, 3]
    f, cx, cy = rays.f, rays.K[0, 2], rays.K[1, 2]
    ones = np.ones_like(a[..., 0])
    # each constraint alpha * s + beta >= 0; [8, L, 7]
    alpha = np.stack(
        [
            b[..., 2] * ones,
            (f * b[..., 0] + cx * b[..., 2]) * ones,
            -(f * b[..., 0] + (cx - w) * b[..., 2]) * ones,
            (f * b[..., 1] + cy * b[..., 2]) * ones,
            -(f * b[..., 1] + (cy - h) * b[..., 2]) * ones,
            ones,
            -ones,
        ],
        -1,
    )
    beta = np.stack(
        [
            a[..., 2] - LANE_NEAR,
            f * a[..., 0] + cx * a[..., 2],
            -(f * a[..., 0] + (cx - w) * a[..., 2]),
            f * a[..., 1] + cy * a[..., 2],
            -(f * a[..., 1] + (cy - h) * a[..., 2]),
            LANE_FAR * ones,
            LANE_FAR * ones,
        ],
        -1,
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = -beta / alpha
    lo = np.where(alpha > 1e-12, bound, -np.inf).max(-1)
    hi = np.where(alpha < -1e-12, bound, np.inf).min(-1)
    feasible = np.where(np.abs(alpha) <= 1e-12, beta >= 0, True).all(-1)
    exists = feasible & (hi - lo >= MIN_LANE_LENGTH)
    frac = np.linspace(0.0, 1.0, lane_points)
    order = _lane_order()[:, None, None]
    lo_, hi_ = np.where(exists, lo, 0)[..., None], np.where(exists, hi, 0)[..., None]
    s = np.where(order > 0, lo_ + frac * (hi_ - lo_), hi_ - frac * (hi_ - lo_))  # [8, L, P]
    pc = a[:, :, None, :] + s[..., None] * b[:, :, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.clip(f * pc[..., 0] / pc[..., 2] + cx, 0, w)
        v = np.clip(f * pc[..., 1] / pc[..., 2] + cy, 0, h)
    lanes = np.where(exists[..., None, None], np.stack([u, v], -1), 0.0).astype(np.float32)
    return lanes, exists


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def encode_depth_png(depth_m: np.ndarray) -> bytes:
    """16-bit grayscale PNG of an H x W depth map in metres (stored in millimetres, 0 = invalid)."""
    mm = np.clip(np.rint(np.nan_to_num(depth_m, nan=0.0) * 1000.0), 0, 65535).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(mm).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_depth_png(data: bytes) -> np.ndarray:
    """Depth in metres (float32 H x W) from a 16-bit (or 8-bit) grayscale PNG in millimetres."""
    img = Image.open(io.BytesIO(data))
    if img.mode not in ("I;16", "I;16B", "I;16L", "I", "L"):
        raise ValueError(f"depth map must be a single-channel 16-bit PNG, got mode {img.mode}")
    return np.asarray(img).astype(np.float32) / 1000.0


def _record(sample_id: str, out: dict[str, Any]) -> dict:
    _, h, w, _ = out["image"].shape
    return {
        "sample_id": sample_id,
        "images": [encode_png(im) for im in out["image"]],
        "depths": [encode_depth_png(dm) for dm in out["depth"]],
        "boxes": [
            {"camera": b[0], "label": b[1], "x1": b[2], "y1": b[3], "x2": b[4], "y2": b[5]}
            for b in out["boxes"]
        ],
        "lanes": out["lanes"].reshape(-1).tolist(),
        "lane_exists": out["lane_exists"].reshape(-1).tolist(),
        "height": h,
        "width": w,
    }


def generate(
    num_samples: int,
    image_size: Sequence[int],
    seed: int,
    max_boxes: int = 8,
    num_lanes: int = 4,
    lane_points: int = 12,
) -> Iterator[dict]:
    """Yield ``num_samples`` synthetic rig records in :data:`SCHEMA`.

    Deterministic for a seed, and sample ``i`` depends only on ``(seed, i)``: see
    :func:`make_scene` and :func:`render_scene` to get the scene and pixel-exact labels
    (instance ids, float depth) behind a record.
    """
    h, w = _hw(image_size)
    for i in range(num_samples):
        scene = make_scene(np.random.default_rng([seed, i]), max_boxes, num_lanes)
        yield _record(f"synth_{i:06d}", render_scene(scene, (h, w), lane_points))


# ---------------------------------------------------------------------------------------------
# The shared image transform (training, evaluation, serving) and batch decoding
# ---------------------------------------------------------------------------------------------


def _jitter(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Photometric augmentation per camera on float [8, H, W, 3] in [0, 1]; geometry untouched."""
    n = x.shape[0]
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    contrast = rng.uniform(0.8, 1.2, (n, 1, 1, 1)).astype(np.float32)
    bright = rng.uniform(0.8, 1.2, (n, 1, 1, 1)).astype(np.float32)
    colour = rng.uniform(0.92, 1.08, (n, 1, 1, 3)).astype(np.float32)
    x = ((x - mean) * contrast + mean * bright) * colour
    sigma = rng.uniform(0, 0.02, (n, 1, 1, 1)).astype(np.float32)
    x = x + rng.standard_normal(x.shape, dtype=np.float32) * sigma
    return np.clip(x, 0, 1)


def preprocess_images(
    images: Sequence[np.ndarray],
    image_size: Sequence[int] | None = None,
    augment: bool = False,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """8 uint8 H x W x 3 camera images (camera order) -> uint8 [8, 3, H, W].

    The one transform that training (via :func:`decode_batch`), evaluation and serving use.
    Pixels stay uint8 until they reach the model's device, where the task normalises them with
    MEAN and STD (jobs.tasks.normalised): a quarter of the bytes through Ray and the bus.
    Raises DataError for a wrong camera count, a non-RGB image, or a size other than
    ``image_size`` (H, W) or the first camera's.
    """
    if len(images) != NUM_CAMERAS:
        raise DataError(f"expected {NUM_CAMERAS} camera images, got {len(images)}")
    arrs = [np.asarray(im) for im in images]
    want = tuple(image_size) if image_size is not None else arrs[0].shape[:2]
    for k, a in enumerate(arrs):
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
            raise DataError(f"camera {k} image must be uint8 H x W x 3, got {a.dtype} {a.shape}")
        if a.shape[:2] != want:
            raise DataError(
                f"camera {k} image is {a.shape[0]}x{a.shape[1]} (HxW), expected {want[0]}x{want[1]}"
            )
    x = np.stack(arrs)
    if augment:
        x = _jitter(
            x.astype(np.float32) / np.float32(255.0), rng if rng is not None else np.random.default_rng()
        )
        x = np.rint(x * 255).astype(np.uint8)  # _jitter clips to [0, 1]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _field(box: Any, name: str, i: int) -> Any:
    return box[name] if isinstance(box, dict) else box[i]


def decode_batch(
    batch: dict[str, Any],
    image_size: Sequence[int],
    max_boxes: int,
    num_lanes: int,
    lane_points: int,
    augment: bool,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """Decode stored rig records for a model (B = rows, C = 8 cameras, M = max_boxes).

    Returns ``sample_id`` object [B], ``images`` uint8 [B, C, 3, H, W],
    ``depth`` float32 [B, C, H, W] (metres, 0 = invalid), ``boxes`` float32 [B, C, M, 4]
    (xyxy / (W, H), zero padded), ``box_labels`` int64 [B, C, M] (-1 padded; a camera with more
    than M boxes keeps its M largest), ``lanes`` float32 [B, C, L, P, 2] ((u, v) / (W, H)) and
    ``lane_exists`` float32 [B, C, L]. ``augment`` jitters colours only; with ``seed`` it depends
    only on (seed, sample_id).
    """
    h, w = _hw(image_size)
    ids = [str(s) for s in batch["sample_id"]]
    n = len(ids)
    out = {
        "sample_id": np.asarray(ids, dtype=object),
        "images": np.empty((n, NUM_CAMERAS, 3, h, w), dtype=np.uint8),
        "depth": np.empty((n, NUM_CAMERAS, h, w), dtype=np.float32),
        "boxes": np.zeros((n, NUM_CAMERAS, max_boxes, 4), dtype=np.float32),
        "box_labels": np.full((n, NUM_CAMERAS, max_boxes), -1, dtype=np.int64),
        "lanes": np.empty((n, NUM_CAMERAS, num_lanes, lane_points, 2), dtype=np.float32),
        "lane_exists": np.empty((n, NUM_CAMERAS, num_lanes), dtype=np.float32),
    }
    scale = np.array([w, h], dtype=np.float32)
    for i, sid in enumerate(ids):
        rng = None
        if augment:
            rng = np.random.default_rng(None if seed is None else [seed, zlib.crc32(sid.encode())])
        try:
            rgbs = [np.asarray(Image.open(io.BytesIO(bytes(b))).convert("RGB")) for b in batch["images"][i]]
            depths = [decode_depth_png(bytes(b)) for b in batch["depths"][i]]
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot decode images of sample {sid}: {_short(err)}") from None
        try:
            out["images"][i] = preprocess_images(rgbs, (h, w), augment=augment, rng=rng)
        except DataError as err:
            raise DataError(f"sample {sid}: {err}") from None
        if len(depths) != NUM_CAMERAS or any(dm.shape != (h, w) for dm in depths):
            raise DataError(f"sample {sid}: expected {NUM_CAMERAS} depth maps of {h}x{w} (HxW)")
        out["depth"][i] = np.stack(depths)
        lanes = np.asarray(batch["lanes"][i], dtype=np.float32)
        exists = np.asarray(batch["lane_exists"][i], dtype=np.float32)
        if lanes.size != NUM_CAMERAS * num_lanes * lane_points * 2 or exists.size != NUM_CAMERAS * num_lanes:
            raise DataError(
                f"sample {sid} has {lanes.size} lane values and {exists.size} lane flags, expected "
                f"{NUM_CAMERAS} cameras x num_lanes={num_lanes} x lane_points={lane_points}"
            )
        out["lanes"][i] = lanes.reshape(NUM_CAMERAS, num_lanes, lane_points, 2) / scale
        out["lane_exists"][i] = exists.reshape(NUM_CAMERAS, num_lanes)
        try:
            _fill_boxes(batch["boxes"][i], out["boxes"][i], out["box_labels"][i], w, h, max_boxes)
        except (IndexError, KeyError, TypeError, ValueError) as err:
            raise DataError(f"bad boxes in sample {sid}: {_short(err)}") from None
    return out


def _fill_boxes(boxes: Iterable, xyxy: np.ndarray, labels: np.ndarray, w: int, h: int, m: int) -> None:
    per_cam: list[list[tuple[float, int, tuple]]] = [[] for _ in range(NUM_CAMERAS)]
    for b in boxes:
        cam = int(_field(b, "camera", 0))
        if not 0 <= cam < NUM_CAMERAS:
            raise ValueError(f"camera {cam} of an {NUM_CAMERAS}-camera rig")
        x1, y1, x2, y2 = (float(_field(b, k, 2 + i)) for i, k in enumerate(("x1", "y1", "x2", "y2")))
        per_cam[cam].append(
            ((x2 - x1) * (y2 - y1), int(_field(b, "label", 1)), (x1 / w, y1 / h, x2 / w, y2 / h))
        )
    for cam, items in enumerate(per_cam):
        if len(items) > m:  # keep the largest, in their stored order
            keep = sorted(sorted(range(len(items)), key=lambda j: -items[j][0])[:m])
            items = [items[j] for j in keep]
        for j, (_, label, box) in enumerate(items):
            xyxy[cam, j] = np.clip(box, 0, 1)
            labels[cam, j] = label


def _short(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------
# Rig folders: import and export
# ---------------------------------------------------------------------------------------------

_CAM_RE = re.compile(r"^cam(\d+)\.png$")
_DEPTH_RE = re.compile(r"^depth(\d+)\.png$")
ANNOTATIONS = "annotations.json"


def _resample_polyline(points: np.ndarray, n: int) -> np.ndarray:
    """``n`` points evenly spaced by arc length along a polyline [m, 2] (m >= 2)."""
    seg = np.hypot(*np.diff(points, axis=0).T)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    if cum[-1] <= 0:
        return np.repeat(points[:1], n, axis=0)
    at = np.linspace(0.0, cum[-1], n)
    return np.stack([np.interp(at, cum, points[:, 0]), np.interp(at, cum, points[:, 1])], -1)


def _read_rig_sample(
    sample_dir: str, sid: str, image_size: tuple[int, int], num_lanes: int, lane_points: int
) -> dict:
    """One rig folder -> a :data:`SCHEMA` record; DataError (naming the folder) for anything wrong."""

    def bad(problem: str) -> DataError:
        return DataError(f"bad rig sample {sid} ({sample_dir}): {problem}")

    names = os.listdir(sample_dir)
    cams = sorted(int(m[1]) for m in map(_CAM_RE.match, names) if m)
    if cams != list(range(NUM_CAMERAS)):
        raise bad(f"expected {NUM_CAMERAS} camera images cam0.png..cam7.png, found {len(cams)}")
    depth_ids = {int(m[1]) for m in map(_DEPTH_RE.match, names) if m}
    if depth_ids - set(range(NUM_CAMERAS)):
        raise bad(f"depth maps for cameras {sorted(depth_ids - set(range(NUM_CAMERAS)))} of an 8-camera rig")
    h, w = image_size
    images, depths = [], []
    for k in range(NUM_CAMERAS):
        name = f"cam{k}.png"
        try:
            with open(os.path.join(sample_dir, name), "rb") as f:
                rgb = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            raise bad(f"cannot read {name}: {_short(err)}") from None
        if images and rgb.shape[:2] != images[0].shape[:2]:
            raise bad(
                f"{name} is {rgb.shape[0]}x{rgb.shape[1]} (HxW) but cam0.png is "
                f"{images[0].shape[0]}x{images[0].shape[1]}"
            )
        if rgb.shape[:2] != (h, w):
            raise bad(f"{name} is {rgb.shape[0]}x{rgb.shape[1]} (HxW), the dataset's image_size is {h}x{w}")
        images.append(rgb)
        dname = f"depth{k}.png"
        if k in depth_ids:
            try:
                with open(os.path.join(sample_dir, dname), "rb") as f:
                    dm = decode_depth_png(f.read())
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                raise bad(f"cannot read {dname}: {_short(err)}") from None
            if dm.shape != (h, w):
                raise bad(f"{dname} is {dm.shape[0]}x{dm.shape[1]} (HxW), its camera image is {h}x{w}")
        else:
            dm = np.zeros((h, w), dtype=np.float32)
        depths.append(dm)

    ann_path = os.path.join(sample_dir, ANNOTATIONS)
    try:
        with open(ann_path) as f:
            ann = json.load(f)
    except (OSError, ValueError) as err:
        raise bad(f"cannot read {ANNOTATIONS}: {_short(err)}") from None
    cameras = ann.get("cameras") if isinstance(ann, dict) else None
    if not isinstance(cameras, list) or len(cameras) != NUM_CAMERAS:
        found = len(cameras) if isinstance(cameras, list) else "no"
        raise bad(f"{ANNOTATIONS} must list {NUM_CAMERAS} cameras under 'cameras', found {found}")
    boxes: list[dict] = []
    lanes = np.zeros((NUM_CAMERAS, num_lanes, lane_points, 2), dtype=np.float32)
    exists = np.zeros((NUM_CAMERAS, num_lanes), dtype=bool)
    for k, entry in enumerate(cameras):
        entry = entry if isinstance(entry, dict) else {}
        for b in entry.get("boxes", []) or []:
            label = b.get("label") if isinstance(b, dict) else None
            if label not in CLASSES:
                raise bad(f"camera {k}: unknown class label {label!r} (classes: {', '.join(CLASSES)})")
            try:
                x1, y1, x2, y2 = (float(v) for v in b["xyxy"])
            except (KeyError, TypeError, ValueError):
                raise bad(f"camera {k}: box xyxy must be 4 numbers, got {b.get('xyxy')!r}") from None
            if not (x2 > x1 and y2 > y1):
                raise bad(f"camera {k}: empty box {[x1, y1, x2, y2]} (needs x2 > x1 and y2 > y1)")
            if x1 < -1 or y1 < -1 or x2 > w + 1 or y2 > h + 1 or not np.isfinite([x1, y1, x2, y2]).all():
                raise bad(f"camera {k}: box {[x1, y1, x2, y2]} lies outside the {w}x{h} (WxH) image")
            boxes.append(
                {
                    "camera": k,
                    "label": CLASSES.index(label),
                    "x1": min(max(x1, 0.0), w),
                    "y1": min(max(y1, 0.0), h),
                    "x2": min(max(x2, 0.0), w),
                    "y2": min(max(y2, 0.0), h),
                }
            )
        for lane in entry.get("lanes", []) or []:
            slot = lane.get("slot") if isinstance(lane, dict) else None
            if not isinstance(slot, int) or not 0 <= slot < num_lanes:
                raise bad(
                    f"camera {k}: lane slot {slot!r} is not in 0..{num_lanes - 1} (num_lanes={num_lanes})"
                )
            if exists[k, slot]:
                raise bad(f"camera {k}: lane slot {slot} given twice")
            try:
                pts = np.asarray(lane["points"], dtype=np.float64)
            except (KeyError, TypeError, ValueError):
                raise bad(f"camera {k}: lane slot {slot} points must be [[u, v], ...]") from None
            if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 2 or not np.isfinite(pts).all():
                raise bad(f"camera {k}: lane slot {slot} needs >= 2 finite [u, v] points")
            lanes[k, slot] = pts if len(pts) == lane_points else _resample_polyline(pts, lane_points)
            exists[k, slot] = True
    return {
        "sample_id": sid,
        "images": [encode_png(im) for im in images],
        "depths": [encode_depth_png(dm) for dm in depths],
        "boxes": boxes,
        "lanes": lanes.reshape(-1).tolist(),
        "lane_exists": exists.reshape(-1).tolist(),
        "height": h,
        "width": w,
    }


def _rig_samples(path: str) -> list[str]:
    if not os.path.exists(path):
        raise DataError(f"rig path not found: {path}")
    if not os.path.isdir(path):
        raise DataError(f"rig path is not a folder: {path}")
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def import_rig(
    path: str,
    image_size: Sequence[int],
    num_lanes: int,
    lane_points: int,
    on_bad_sample: str = "fail",
    skipped: list[str] | None = None,
    limit: int | None = None,
) -> Iterator[dict]:
    """Yield :data:`SCHEMA` records from a rig folder (layout in the module docstring), by name order.

    A bad sample raises DataError naming it (``on_bad_sample="fail"``) or is left out and its
    id appended to ``skipped``. ``limit`` stops after that many records.
    """
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise DataError(
            f"on_bad_sample must be one of {', '.join(BAD_SAMPLE_POLICIES)}, got {on_bad_sample!r}"
        )
    size = _hw(image_size)
    skipped = skipped if skipped is not None else []
    samples = _rig_samples(path)
    if not samples:
        raise DataError(f"no rig samples in {path}: expected <sample_id>/cam0.png..cam7.png folders")
    count = 0
    for sid in samples:
        if limit is not None and count >= limit:
            return
        try:
            record = _read_rig_sample(os.path.join(path, sid), sid, size, num_lanes, lane_points)
        except DataError:
            if on_bad_sample == "fail":
                raise
            skipped.append(sid)
            continue
        yield record
        count += 1


def export_rig(records: Iterable[dict], path: str) -> int:
    """Write :data:`SCHEMA` records (e.g. from :func:`generate`) in the rig folder layout; returns the count."""
    os.makedirs(path, exist_ok=True)
    n = 0
    for r in records:
        sample_dir = os.path.join(path, r["sample_id"])
        os.makedirs(sample_dir, exist_ok=True)
        for k, (img, dep) in enumerate(zip(r["images"], r["depths"], strict=True)):
            with open(os.path.join(sample_dir, f"cam{k}.png"), "wb") as f:
                f.write(bytes(img))
            with open(os.path.join(sample_dir, f"depth{k}.png"), "wb") as f:
                f.write(bytes(dep))
        exists = np.asarray(r["lane_exists"], dtype=bool).reshape(NUM_CAMERAS, -1)
        lanes = np.asarray(r["lanes"], dtype=np.float32).reshape(NUM_CAMERAS, exists.shape[1], -1, 2)
        cameras: list[dict] = [{"boxes": [], "lanes": []} for _ in range(NUM_CAMERAS)]
        for b in r["boxes"]:
            # float32 -> float is exact and JSON keeps every digit: a re-import is bit-identical
            xyxy = [float(np.float32(b[k])) for k in ("x1", "y1", "x2", "y2")]
            cameras[int(b["camera"])]["boxes"].append({"label": CLASSES[int(b["label"])], "xyxy": xyxy})
        for k, slot in zip(*np.nonzero(exists), strict=True):
            cameras[k]["lanes"].append({"slot": int(slot), "points": lanes[k, slot].astype(float).tolist()})
        with open(os.path.join(sample_dir, ANNOTATIONS), "w") as f:
            json.dump({"cameras": cameras}, f)
        n += 1
    return n


def _rig_fingerprint(path: str) -> str:
    """sha256 over every file's relative path, size and mtime: a changed rig is imported again."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            st = os.stat(full)
            h.update(f"{os.path.relpath(full, path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# prepare: source -> shards + stats.npz + manifest
# ---------------------------------------------------------------------------------------------


class _Stats:
    """Training-split running sums for the trivial baselines in ``stats.npz``."""

    def __init__(self, h: int, w: int, num_lanes: int, lane_points: int) -> None:
        self.h, self.w = h, w
        self.depth_sum = np.zeros((NUM_CAMERAS, h, w))
        self.depth_n = np.zeros((NUM_CAMERAS, h, w), dtype=np.int64)
        self.lane_sum = np.zeros((NUM_CAMERAS, num_lanes, lane_points, 2))
        self.lane_n = np.zeros((NUM_CAMERAS, num_lanes), dtype=np.int64)
        self.samples = 0

    def add(self, r: dict) -> None:
        depth = np.stack([decode_depth_png(bytes(b)) for b in r["depths"]])
        valid = depth > 0
        self.depth_sum += np.where(valid, depth, 0)
        self.depth_n += valid
        exists = np.asarray(r["lane_exists"], dtype=bool).reshape(self.lane_n.shape)
        lanes = np.asarray(r["lanes"], dtype=np.float64).reshape(self.lane_sum.shape) / (self.w, self.h)
        self.lane_sum += np.where(exists[..., None, None], lanes, 0)
        self.lane_n += exists
        self.samples += 1

    def write(self, path: str) -> None:
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_depth = np.where(self.depth_n > 0, self.depth_sum / self.depth_n, 0)
            mean_lanes = np.where(
                self.lane_n[..., None, None] > 0, self.lane_sum / self.lane_n[..., None, None], 0
            )
        rate = self.lane_n / max(self.samples, 1)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(
                f,
                mean_depth=mean_depth.astype(np.float32),
                mean_lanes=mean_lanes.astype(np.float32),
                lane_exists_rate=rate.astype(np.float32),
                train_samples=np.int64(self.samples),
            )
        os.replace(tmp, path)


def train_statistics(root: str) -> dict[str, np.ndarray]:
    """The training-split statistics :func:`prepare` wrote to ``root/stats.npz``.

    ``mean_depth`` float32 [8, H, W] (mean over valid pixels; 0 where never valid),
    ``mean_lanes`` float32 [8, L, P, 2] ((u, v) / (W, H), averaged where the lane exists; 0 where
    it never does), ``lane_exists_rate`` float32 [8, L], ``train_samples`` int64.
    """
    path = os.path.join(str(root), STATS_FILE)
    if not os.path.isfile(path):
        raise DataError(f"no training statistics at {path} (run `deepfleet prepare` first)")
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zlib.error) as err:
        raise DataError(f"unreadable training statistics {path}: {_short(err)}") from None


def prepare(
    source: str,
    root: str,
    num_samples: int,
    image_size: Sequence[int],
    rows_per_shard: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    max_boxes: int,
    num_lanes: int,
    lane_points: int,
    import_path: str | None,
    on_bad_sample: str,
) -> dict:
    """Write the autonomous dataset to ``root`` (shards, ``stats.npz``, manifest) and return the manifest.

    ``source`` is "synthetic" (scenes of 1..``max_boxes`` objects, so no camera holds more boxes)
    or "rig" (a folder at ``import_path``, layout in the module docstring; ``num_samples`` caps it,
    0 or less: all; every box is kept, :func:`decode_batch` caps them per camera). Splits come
    from a seeded hash of the sample id. A ``root`` already holding a
    dataset prepared with the same arguments is returned as is.
    """
    if source not in SOURCES:
        raise DataError(f"unknown data source {source!r}: choose one of {', '.join(SOURCES)}")
    if on_bad_sample not in BAD_SAMPLE_POLICIES:
        raise DataError(
            f"on_bad_sample must be one of {', '.join(BAD_SAMPLE_POLICIES)}, got {on_bad_sample!r}"
        )
    _check_fractions(val_fraction, test_fraction)
    try:
        h, w = _hw(image_size)
    except ValueError as err:
        raise DataError(str(err)) from None
    if max_boxes < 1 or num_lanes < 1 or lane_points < 2:
        raise DataError(
            f"need max_boxes >= 1, num_lanes >= 1 and lane_points >= 2, got {max_boxes}, {num_lanes}, {lane_points}"
        )
    root = str(root)
    fingerprint = None
    if source == "rig":
        if not import_path:
            raise DataError("data source 'rig' needs an import path (the folder of <sample_id>/ rigs)")
        import_path = os.path.abspath(import_path)
        _rig_samples(import_path)  # a missing folder is named before anything is written
        fingerprint = _rig_fingerprint(import_path)
    else:
        import_path = None
    args = {
        "source": source,
        "image_size": [h, w],
        "num_samples": num_samples,
        "seed": seed,
        "max_boxes": max_boxes if source == "synthetic" else None,  # imports keep every box
        "num_lanes": num_lanes,
        "lane_points": lane_points,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "rows_per_shard": rows_per_shard,
        "import_path": import_path,
        "import_fingerprint": fingerprint,
        "on_bad_sample": on_bad_sample,
    }
    existing = _existing(root, args)
    if existing is not None:
        return existing

    skipped: list[str] = []
    if source == "synthetic":
        records: Iterable[dict] = generate(num_samples, (h, w), seed, max_boxes, num_lanes, lane_points)
    else:
        limit = num_samples if num_samples and num_samples > 0 else None
        records = import_rig(import_path, (h, w), num_lanes, lane_points, on_bad_sample, skipped, limit)
    counts = {s: dict.fromkeys(CLASSES, 0) for s in SPLITS}
    stats = _Stats(h, w, num_lanes, lane_points)
    with ShardWriter(root, TASK, SCHEMA, rows_per_shard, SPLITS) as writer:
        for r in records:
            split = assign_split(r["sample_id"], val_fraction, test_fraction, seed)
            writer.add(split, r)
            for b in r["boxes"]:
                counts[split][CLASSES[b["label"]]] += 1
            if split == "train":
                stats.add(r)
        if skipped:
            shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
            print(
                f"warning: skipped {len(skipped)} bad rig sample(s) from {import_path}: {shown} "
                f"(listed in {os.path.join(root, 'manifest.json')} meta.skipped_samples)",
                file=sys.stderr,
            )
        # statistics before the manifest: the manifest commits the dataset, stats.npz included
        stats.write(os.path.join(root, STATS_FILE))
        meta = {
            **args,
            "classes": list(CLASSES),
            "num_cameras": NUM_CAMERAS,
            "box_counts": counts,
            "skipped_samples": skipped,
        }
        return writer.close(meta)


def _existing(root: str, args: dict[str, Any]) -> dict | None:
    """The manifest at ``root`` if it was prepared with ``args``; None if there is none or it differs.

    Missing or damaged shards (or statistics) of a matching dataset are an error naming the file.
    """
    manifest = reusable(root, TASK, lambda meta: all(meta.get(k) == v for k, v in args.items()))
    if manifest is not None:
        train_statistics(root)
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

_READ_COLUMNS = ["sample_id", "images", "depths", "boxes", "lanes", "lane_exists"]


def read_split(
    root: str,
    split: str,
    image_size: Sequence[int],
    max_boxes: int,
    num_lanes: int,
    lane_points: int,
    augment: bool,
    manifest: dict | None = None,
) -> ray.data.Dataset:
    """A Ray Dataset of decoded ``split`` batches (columns as :func:`decode_batch` returns them).

    The shards are checked first, so a corrupt file is named before Ray Data fails on it with a
    message that does not say which file it was.
    """
    import ray.data

    manifest = manifest if manifest is not None else load_manifest(root)
    paths = readable_paths(root, manifest, split)
    ds = ray.data.read_parquet(paths).select_columns(_READ_COLUMNS)
    return ds.map_batches(
        decode_batch,
        fn_kwargs={
            "image_size": tuple(image_size),
            "max_boxes": max_boxes,
            "num_lanes": num_lanes,
            "lane_points": lane_points,
            "augment": augment,
        },
        batch_format="numpy",
        batch_size=16,  # a decoded rig is 8 images: small batches keep Ray Data's blocks small
    )


def iter_split_numpy(
    root: str,
    split: str,
    batch_size: int,
    image_size: Sequence[int],
    max_boxes: int,
    num_lanes: int,
    lane_points: int,
    manifest: dict | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Decoded batches of ``split`` in file order with plain pyarrow (no Ray, no augmentation)."""
    manifest = manifest if manifest is not None else load_manifest(root)
    kw = {
        "image_size": image_size,
        "max_boxes": max_boxes,
        "num_lanes": num_lanes,
        "lane_points": lane_points,
    }
    for table in iter_tables(readable_paths(root, manifest, split), _READ_COLUMNS, batch_size):
        yield decode_batch(table.to_pydict(), augment=False, **kw)


# ---------------------------------------------------------------------------------------------
# Looking at a rig
# ---------------------------------------------------------------------------------------------

_CLASS_COLOURS = ("#00e5ff", "#ff6d00", "#ff00ff")
_LANE_COLOURS = ("#ffee58", "#76ff03", "#40c4ff", "#ff4081", "#ffffff", "#b388ff")


def _as_view(sample: dict) -> dict[str, Any]:
    """A stored record or a decoded row/batch -> uint8 images, depth, pixel boxes and lanes."""
    if "depths" in sample:  # a SCHEMA record
        images = np.stack(
            [np.asarray(Image.open(io.BytesIO(bytes(b))).convert("RGB")) for b in sample["images"]]
        )
        depth = np.stack([decode_depth_png(bytes(b)) for b in sample["depths"]])
        h, w = images.shape[1:3]
        exists = np.asarray(sample["lane_exists"], dtype=bool).reshape(NUM_CAMERAS, -1)
        lanes = np.asarray(sample["lanes"], dtype=np.float32).reshape(NUM_CAMERAS, exists.shape[1], -1, 2)
        boxes = [
            (int(_field(b, "camera", 0)), int(_field(b, "label", 1)),
             *(float(_field(b, k, 2 + i)) for i, k in enumerate(("x1", "y1", "x2", "y2"))))
            for b in sample["boxes"]
        ]  # fmt: skip
        return {"id": str(sample["sample_id"]), "images": images, "depth": depth, "boxes": boxes,
                "lanes": lanes, "exists": exists}  # fmt: skip
    x = np.asarray(sample["images"])
    pick = x.ndim == 5  # a whole decoded batch: show its first row
    row = {k: (np.asarray(v)[0] if pick else v) for k, v in sample.items()}
    x = np.asarray(row["images"]).transpose(0, 2, 3, 1) * STD + MEAN
    images = np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)
    h, w = images.shape[1:3]
    scale = np.array([w, h, w, h])
    boxes = [
        (cam, int(lab), *(np.asarray(row["boxes"])[cam, j] * scale).tolist())
        for cam, j in zip(*np.nonzero(np.asarray(row["box_labels"]) >= 0), strict=True)
        for lab in [np.asarray(row["box_labels"])[cam, j]]
    ]
    return {
        "id": str(row.get("sample_id", "")),
        "images": images,
        "depth": np.asarray(row["depth"]),
        "boxes": boxes,
        "lanes": np.asarray(row["lanes"]) * (w, h),
        "exists": np.asarray(row["lane_exists"]) > 0.5,
    }


def plot_sample(sample: dict, path: str) -> str:
    """Save a contact sheet of one rig to ``path`` (PNG): per camera the image with boxes and lanes
    drawn, and its depth map. ``sample`` is a stored record or a decoded row (or batch: row 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    v = _as_view(sample)
    h, w = v["images"].shape[1:3]
    fig, axes = plt.subplots(4, 4, figsize=(16, 16 * h / w * 0.95 + 0.6))
    vmax = max(float(v["depth"].max()), 1.0)
    for k in range(NUM_CAMERAS):
        ax = axes[2 * (k // 4), k % 4]
        ax.imshow(v["images"][k], extent=(0, w, h, 0))
        for cam, label, x1, y1, x2, y2 in v["boxes"]:
            if cam == k:
                colour = _CLASS_COLOURS[label % len(_CLASS_COLOURS)]
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1.5, ec=colour))
                ax.text(x1, y1, CLASSES[label] if label < len(CLASSES) else str(label), color=colour, fontsize=7,
                        va="bottom")  # fmt: skip
        for slot in np.flatnonzero(v["exists"][k]):
            pts = v["lanes"][k, slot]
            ax.plot(pts[:, 0], pts[:, 1], ".-", lw=1, ms=3, color=_LANE_COLOURS[slot % len(_LANE_COLOURS)])
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(f"cam {k} (yaw {45 * k} deg)", fontsize=9)
        ax.axis("off")
        dax = axes[2 * (k // 4) + 1, k % 4]
        shown = np.ma.masked_where(v["depth"][k] <= 0, v["depth"][k])
        dax.imshow(shown, cmap="magma_r", vmin=0, vmax=vmax, extent=(0, w, h, 0))
        dax.set_title(f"depth {k} (0-{vmax:.0f} m, blank = none)", fontsize=8)
        dax.axis("off")
    legend = ", ".join(f"{c} {col}" for c, col in zip(CLASSES, ("cyan", "orange", "magenta"), strict=True))
    fig.suptitle(f"rig {v['id']}: boxes {legend}; lanes by slot", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)
