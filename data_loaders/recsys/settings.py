"""What ``prepare`` needs to know: one typed settings object, checked once when it is built."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

from ..errors import DataError, check_local
from ..shards import check_at_least, check_choice, check_fractions, check_source
from .schema import BAD_ROW_POLICIES, SOURCES, split_days


@dataclass(frozen=True)
class RecsysSettings:
    """The data section of a recsys recipe that ``prepare`` reads (field docs: ``jobs.config``).

    Building one checks every rule on these values and raises a one-line DataError; a recipe is
    checked through it when it loads (``jobs.config.RecsysData.settings``). The generator's values
    (tracks, users, sessions, days, cold share, audio size, start date) are checked only for
    ``source="synthetic"``: the importer does not use them. The defaults make a small dataset.
    """

    source: str  # "synthetic" or "mssd"
    root: str  # dataset folder: shards + tracks.parquet + manifest.json
    num_tracks: int = 2000
    num_users: int = 300
    num_sessions: int = 3000
    rows_per_shard: int = 50_000
    history_len: int = 10  # earlier events of the session stored per query
    negatives_per_event: int = 2  # sampled tracks per training query
    eval_negatives: int = 19  # sampled tracks per val/test query (a ranking list of 1 + this many)
    n_mels: int = 16  # synthetic audio: mel bands x frames
    frames: int = 32
    seed: int = 0
    import_path: str | None = None  # source mssd: the folder with the MSSD CSVs
    on_bad_row: str = "fail"  # importer: "fail" names the file and line, "skip" drops the session
    num_days: int = 60
    cold_fraction: float = 0.1  # share of tracks released after the train period
    val_fraction: float = 0.15  # share of days, after the train days
    test_fraction: float = 0.15  # share of days, the last ones
    start_date: str = "2018-07-15"

    def __post_init__(self) -> None:
        check_source(self.source, SOURCES)
        check_local(root=self.root, import_path=self.import_path)
        check_choice("on_bad_row", self.on_bad_row, BAD_ROW_POLICIES)
        check_at_least(
            history_len=(self.history_len, 1),
            negatives_per_event=(self.negatives_per_event, 0),
            eval_negatives=(self.eval_negatives, 1),  # a ranking list needs one sampled track
            rows_per_shard=(self.rows_per_shard, 1),
        )
        check_fractions(self.val_fraction, self.test_fraction, positive=True)
        if self.source == "synthetic":
            self._check_generator()
        elif not self.import_path:
            raise DataError("data source 'mssd' needs an import path (the folder with the MSSD CSVs)")

    def _check_generator(self) -> None:
        check_at_least(
            num_tracks=(self.num_tracks, 10),
            num_users=(self.num_users, 1),
            num_sessions=(self.num_sessions, 1),
        )
        if self.n_mels < 1 or self.frames < 1:
            raise DataError(f"n_mels and frames must be >= 1, got {self.n_mels} and {self.frames}")
        if not 0 <= self.cold_fraction < 1:
            raise DataError(f"cold_fraction must be in [0, 1), got {self.cold_fraction}")
        split_days(self.num_days, self.val_fraction, self.test_fraction)  # enough days for three splits
        try:
            _dt.date.fromisoformat(self.start_date)
        except (TypeError, ValueError):
            raise DataError(f"start_date must be YYYY-MM-DD, got {self.start_date!r}") from None
