"""Multi-camera driving data: a ray-cast rig generator, a rig-folder importer, splits, readers.

One record (:data:`SCHEMA`) is one rig sample: 8 camera images, 8 depth maps, 2D boxes and lane
polylines per camera. :func:`generate` renders them from real geometry (a pinhole camera ring
over a straight multi-lane road with cuboid cars, trucks and pedestrians); :func:`import_rig`
reads the same thing from a folder; :func:`prepare` writes Parquet shards plus ``stats.npz``
(training-split baselines); :func:`read_split` (Ray Data) and :func:`iter_split_numpy` (plain
pyarrow) decode them through :func:`preprocess_images`, the image transform serving reuses.

- ``schema``: the record and its depth PNGs; ``camera``: the camera ring (geometry in its docstring).
- ``settings``: :class:`AutonomousSettings`, what ``prepare`` takes (from the recipe's data section).
- ``scene``, ``render``, ``synthetic``: random road scenes, ray casting and labels, :func:`generate`.
- ``rig``: the rig folder importer and exporter (layout in its docstring).
- ``prepare``: source -> shards + stats + manifest; ``read``: shards -> decoded batches.
- ``plot``: a contact sheet of one rig.
"""

from .camera import CAMERA_HEIGHT, CAMERA_PITCH_DEG, HFOV_DEG, camera_model, project
from .plot import plot_sample
from .prepare import prepare, train_statistics
from .read import decode_batch, iter_split_numpy, preprocess_images, read_split
from .render import LANE_FAR, LANE_NEAR, MAX_DEPTH, MIN_BOX_PIXELS, MIN_LANE_LENGTH, render_scene
from .rig import ANNOTATIONS, export_rig, import_rig
from .scene import (
    CLASS_MIX,
    DASH_ON,
    DASH_PERIOD,
    LANE_WIDTH,
    LINE_WIDTH,
    OBJECT_RANGE,
    Cuboid,
    Scene,
    make_scene,
)
from .schema import (
    BAD_SAMPLE_POLICIES,
    BOX_TYPE,
    CLASSES,
    MEAN,
    NUM_CAMERAS,
    READ_COLUMNS,
    SCHEMA,
    SOURCES,
    SPLITS,
    STATS_FILE,
    STD,
    TASK,
    decode_depth_png,
    encode_depth_png,
)
from .settings import AutonomousSettings
from .synthetic import generate

_READ_COLUMNS = READ_COLUMNS  # the name jobs.bench.ingest reads

__all__ = [
    "ANNOTATIONS",
    "BAD_SAMPLE_POLICIES",
    "BOX_TYPE",
    "CAMERA_HEIGHT",
    "CAMERA_PITCH_DEG",
    "CLASSES",
    "CLASS_MIX",
    "DASH_ON",
    "DASH_PERIOD",
    "HFOV_DEG",
    "LANE_FAR",
    "LANE_NEAR",
    "LANE_WIDTH",
    "LINE_WIDTH",
    "MAX_DEPTH",
    "MEAN",
    "MIN_BOX_PIXELS",
    "MIN_LANE_LENGTH",
    "NUM_CAMERAS",
    "OBJECT_RANGE",
    "READ_COLUMNS",
    "SCHEMA",
    "SOURCES",
    "SPLITS",
    "STATS_FILE",
    "STD",
    "TASK",
    "AutonomousSettings",
    "Cuboid",
    "Scene",
    "camera_model",
    "decode_batch",
    "decode_depth_png",
    "encode_depth_png",
    "export_rig",
    "generate",
    "import_rig",
    "iter_split_numpy",
    "make_scene",
    "plot_sample",
    "prepare",
    "preprocess_images",
    "project",
    "read_split",
    "render_scene",
    "train_statistics",
]
