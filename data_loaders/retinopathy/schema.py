"""What a retinopathy record is: one eye photo and its ICDR grade, stored as :data:`SCHEMA` rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

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
# Stored columns the readers decode: patient_id and eye are never loaded.
READ_COLUMNS = ["image_id", "image", "label"]
