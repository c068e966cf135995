"""The camera ring: intrinsics, poses and per-pixel rays shared by the renderer and the tests.

Ego frame: x forward, y left, z up, metres; ego at the origin. Camera ``k`` sits at height
:data:`CAMERA_HEIGHT`, yaw ``k * 45`` degrees (0 looks forward, counter-clockwise), pitched down
:data:`CAMERA_PITCH_DEG`, horizontal field of view :data:`HFOV_DEG` (adjacent views overlap by
~21 degrees). Pixel ``(col, row)`` covers ``[col, col + 1) x [row, row + 1)``; boxes and lane
points are in these continuous pixel coordinates. Depth is z-depth along the optical axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .schema import NUM_CAMERAS

CAMERA_HEIGHT = 1.6  # m above the ground
CAMERA_PITCH_DEG = 4.0  # down: a little more road, a little less sky
HFOV_DEG = 66.0


def image_hw(image_size: Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` as ints; ValueError for anything else or a side below 8 pixels."""
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
    h, w = image_hw(image_size)
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


class Rays:
    """Per image size: every pixel's ray (camera z = 1, so the hit distance is z-depth)."""

    _cache: dict[tuple[int, int], Rays] = {}

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
    def get(cls, h: int, w: int) -> Rays:
        r = cls._cache.get((h, w))
        if r is None:
            r = cls._cache[(h, w)] = cls(h, w)
        return r
