"""Rendering: one ray per pixel against the ground plane and the cuboids (slab method), and the
labels (depth, boxes, lanes) derived from the same geometry."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .camera import CAMERA_HEIGHT, Rays, image_hw
from .scene import DASH_ON, DASH_PERIOD, LANE_WIDTH, LINE_WIDTH, Cuboid, Scene
from .schema import NUM_CAMERAS

MAX_DEPTH = 60.0  # m; farther hits get depth 0 (invalid), as from a real depth sensor
LANE_NEAR, LANE_FAR = 2.0, 40.0  # lane labels: camera depth >= 2 m, within 40 m along the road
MIN_LANE_LENGTH = 3.0  # m of visible line below which a lane does not "exist" in a camera
MIN_BOX_PIXELS = 12  # visible pixels below which an object gets no box in a camera

# Value-noise tables for ground texture, tiled; fixed so the stream depends only on the seed.
_NOISE = np.random.default_rng(1234).standard_normal((2, 256, 256)).astype(np.float32)


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
    h, w = image_hw(image_size)
    rays = Rays.get(h, w)
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


def _shade_ground(scene: Scene, rays: Rays, ground: np.ndarray, t: np.ndarray) -> np.ndarray:
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


def _lanes(scene: Scene, rays: Rays, h: int, w: int, lane_points: int) -> tuple[np.ndarray, np.ndarray]:
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
