"""Importers for the public layouts: EyePACS/Kaggle (``trainLabels.csv``) and APTOS 2019 (``train.csv``)."""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterator

from ..errors import DataError, one_line
from ..shards import IMAGE_ERRORS, encode_png
from .schema import BAD_IMAGE_POLICIES, NUM_CLASSES
from .transform import load_rgb

LAYOUTS = {
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
    for layout, (csv_name, *_rest) in LAYOUTS.items():
        if os.path.isfile(os.path.join(path, csv_name)):
            return layout
    wanted = " or ".join(spec[0] for spec in LAYOUTS.values())
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
    if layout not in LAYOUTS:
        raise DataError(f"unknown data layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise DataError(f"on_bad_image must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {on_bad_image!r}")
    csv_name, id_col, label_col, folders, exts = LAYOUTS[layout]
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
            except IMAGE_ERRORS as err:
                if on_bad_image == "fail":
                    where = file or os.path.join(path, folders[0], name + exts[0])
                    raise DataError(f"bad image {where} (id {name}): {one_line(err)}") from None
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
