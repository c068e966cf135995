"""Diabetic-retinopathy data: synthetic fundus generator, EyePACS/APTOS importers, patient splits, readers.

Every source yields records in :data:`SCHEMA` (one per eye photo); :func:`prepare` writes them as
Parquet shards split by patient; :func:`read_split` (Ray Data) and :func:`iter_split_numpy`
(plain pyarrow) read them back through :func:`preprocess_image`, the one transform that training,
evaluation and serving share.

- ``schema``: the record, grades, normalisation constants.
- ``settings``: :class:`RetinopathySettings`, what ``prepare`` takes (from the recipe's data section).
- ``synthetic``: the fundus renderer and :func:`generate`.
- ``eyepacs``: importers for the EyePACS and APTOS layouts.
- ``transform``: :func:`preprocess_image` and the decoder the importers share.
- ``prepare``: source -> shards + manifest; ``read``: shards -> decoded batches.
"""

from ..shards import assign_split, encode_png
from .eyepacs import detect_layout, import_images
from .prepare import prepare, split_by_patient
from .read import decode_batch, iter_split_numpy, read_split
from .schema import (
    BAD_IMAGE_POLICIES,
    CLASS_MIX,
    GRADE_NAMES,
    MEAN,
    NUM_CLASSES,
    READ_COLUMNS,
    SCHEMA,
    SOURCES,
    SPLITS,
    STD,
    TASK,
)
from .settings import RetinopathySettings
from .synthetic import generate, render_fundus
from .transform import load_rgb, preprocess_image

_READ_COLUMNS = READ_COLUMNS  # the name jobs.bench.ingest reads

__all__ = [
    "BAD_IMAGE_POLICIES",
    "CLASS_MIX",
    "GRADE_NAMES",
    "MEAN",
    "NUM_CLASSES",
    "READ_COLUMNS",
    "SCHEMA",
    "SOURCES",
    "SPLITS",
    "STD",
    "TASK",
    "RetinopathySettings",
    "assign_split",
    "decode_batch",
    "detect_layout",
    "encode_png",
    "generate",
    "import_images",
    "iter_split_numpy",
    "load_rgb",
    "prepare",
    "preprocess_image",
    "read_split",
    "render_fundus",
    "split_by_patient",
]
