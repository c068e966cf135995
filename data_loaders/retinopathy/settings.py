"""What ``prepare`` needs to know: one typed settings object, checked once when it is built."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError, check_local
from ..shards import check_at_least, check_choice, check_fractions, check_source
from .schema import BAD_IMAGE_POLICIES, SOURCES


@dataclass(frozen=True)
class RetinopathySettings:
    """The data section of a retinopathy recipe that ``prepare`` reads (field docs: ``jobs.config``).

    Building one checks every rule on these values and raises a one-line DataError; a recipe is
    checked through it when it loads (``jobs.config.RetinopathyData.settings``).
    """

    source: str  # one of SOURCES; "auto" detects EyePACS or APTOS from import_path
    root: str  # dataset folder: shards + manifest.json
    num_images: int  # synthetic: images to draw; imports: at most this many (0 or less: all)
    image_size: int  # side of the stored square photos
    rows_per_shard: int
    val_fraction: float  # share of patients, by a seeded hash of the patient id
    test_fraction: float
    seed: int
    label_noise: float  # synthetic only: share of labels moved to a neighbouring grade
    import_path: str | None  # importers: the folder with the labels CSV
    on_bad_image: str  # "skip" (count it in the manifest) or "fail"

    def __post_init__(self) -> None:
        check_source(self.source, SOURCES)
        check_local(root=self.root, import_path=self.import_path)
        check_choice("on_bad_image", self.on_bad_image, BAD_IMAGE_POLICIES)
        check_fractions(self.val_fraction, self.test_fraction)
        check_at_least(rows_per_shard=(self.rows_per_shard, 1))
        if not 0 <= self.label_noise <= 1:
            raise DataError(f"label_noise must be in [0, 1], got {self.label_noise}")
