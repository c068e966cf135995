"""What ``prepare`` needs to know: one typed settings object, checked once when it is built."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import DataError, check_local
from ..shards import check_at_least, check_choice, check_fractions, check_source
from .camera import image_hw
from .schema import BAD_SAMPLE_POLICIES, SOURCES


@dataclass(frozen=True)
class AutonomousSettings:
    """The data section of an autonomous recipe that ``prepare`` reads (field docs: ``jobs.config``).

    Building one checks every rule on these values and raises a one-line DataError; a recipe is
    checked through it when it loads (``jobs.config.AutonomousData.settings``).
    """

    source: str  # "synthetic" or "rig"
    root: str  # dataset folder: shards + stats.npz + manifest.json
    num_samples: int  # synthetic: rigs to draw; rig folders: at most this many (0 or less: all)
    image_size: Sequence[int]  # (height, width) of every camera image; kept as a tuple
    rows_per_shard: int
    val_fraction: float  # share of rigs, by a seeded hash of the sample id
    test_fraction: float
    seed: int
    max_boxes: int  # synthetic: objects per scene at most (decode_batch keeps this many per camera)
    num_lanes: int  # lane-line slots per camera
    lane_points: int  # points per lane
    import_path: str | None  # source rig: the folder of <sample_id>/ rigs
    on_bad_sample: str  # "skip" (count it in the manifest) or "fail"

    def __post_init__(self) -> None:
        check_source(self.source, SOURCES)
        check_local(root=self.root, import_path=self.import_path)
        check_choice("on_bad_sample", self.on_bad_sample, BAD_SAMPLE_POLICIES)
        check_fractions(self.val_fraction, self.test_fraction)
        try:
            object.__setattr__(self, "image_size", image_hw(self.image_size))
        except ValueError as err:
            raise DataError(str(err)) from None
        if self.max_boxes < 1 or self.num_lanes < 1 or self.lane_points < 2:
            raise DataError(
                "need max_boxes >= 1, num_lanes >= 1 and lane_points >= 2, "
                f"got {self.max_boxes}, {self.num_lanes}, {self.lane_points}"
            )
        check_at_least(rows_per_shard=(self.rows_per_shard, 1))
