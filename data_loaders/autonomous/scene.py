"""Road scenes: a straight multi-lane road with cuboid cars, trucks and pedestrians (:func:`make_scene`)."""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import numpy as np

from .schema import CLASSES, NUM_CAMERAS

LANE_WIDTH = 3.5  # m between painted lines
LINE_WIDTH = 0.2  # m of paint
DASH_ON, DASH_PERIOD = 3.0, 9.0  # m: inner lines are 3 m dashes every 9 m
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
