"""Drift of live model inputs and predictions: the population stability index (PSI).

Export stores a reference per feature in the model card (:func:`reference`, computed on the
validation split); serving feeds every prediction batch's features (each task's
`drift_features`) to a :class:`DriftWindow` and reports the PSI of its recent rows. numpy only,
so the serving side imports it without torch.

Bins of one feature: the reference's deciles (fewer quantiles for a small reference),
deduplicated, as edges e_0 < ... < e_{k-1}; between and around them 2k + 1 bins alternate between open intervals and
the edges themselves:

    (-inf, e_0), {e_0}, (e_0, e_1), {e_1}, ..., {e_{k-1}}, (e_{k-1}, +inf)

For a continuous feature the point bins are all but empty and the intervals are the usual
deciles. For a discrete or tied feature (a count, a category, a constant) every value holding
more than a bin's share of the rows is an edge with a bin of its own, and values between or
beyond the edges land in bins the reference left (nearly) empty: a shift in either direction
shows, even for a constant.

PSI = sum over bins (observed - expected) * ln(observed / expected), proportions floored at eps.
Rules of thumb: < 0.1 stable, 0.1-0.2 moderate shift, > 0.2 drift (the default threshold).
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

BINS = 10
EPS = 1e-4
# Fewer bins for a small reference: each of its bins' proportions is an estimate, and a same-
# distribution sample of n rows against m reference rows scores about (bins - 1) * (1/n + 1/m)
# by chance alone.
MIN_BIN_ROWS = 20
# A same-distribution sample of n rows scores about (bins - 1) / n by chance alone (the PSI is
# close to a chi-square statistic over n), and a window's score is the largest over several
# features: 200 rows keep that noise near 0.05, far below the 0.2 threshold, where 50 rows would
# give ~0.2 and false alarms.
MIN_ROWS = 200


def _finite(values) -> np.ndarray:
    """1-D float64 without NaN/inf (a broken input is not a bin of its own)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    return v[np.isfinite(v)]


def _bin(edges: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bin index per value in the alternating interval/point layout of the module docstring."""
    i = np.searchsorted(edges, v, side="left")  # edges[i - 1] < v <= edges[i]
    on_edge = np.zeros(len(v), dtype=bool)
    inside = i < len(edges)
    on_edge[inside] = v[inside] == edges[i[inside]]
    return 2 * i + on_edge


def reference(values: dict[str, np.ndarray], bins: int = BINS) -> dict[str, dict]:
    """Per feature: quantile edges, expected proportion per bin, rows, mean and std (plain floats,
    JSON-ready). `bins` quantile bins at most, fewer when the feature has under MIN_BIN_ROWS rows
    per bin. A feature without a finite value is left out (nothing to compare with)."""
    out = {}
    for name, raw in values.items():
        v = _finite(raw)
        if not len(v):
            continue
        k = max(2, min(bins, len(v) // MIN_BIN_ROWS))
        # linear interpolation: a continuous feature's edges fall between its values (its point
        # bins stay empty), a value holding over a tenth of a discrete feature is an edge itself
        edges = np.unique(np.quantile(v, np.arange(1, k) / k))
        counts = np.bincount(_bin(edges, v), minlength=2 * len(edges) + 1)
        out[name] = {
            "edges": edges.tolist(),
            "expected": (counts / len(v)).tolist(),
            "rows": len(v),
            "mean": float(v.mean()),
            "std": float(v.std()),
        }
    return out


def psi(feature_ref: dict, values: np.ndarray, eps: float = EPS) -> float:
    """PSI of observed values against one feature's reference; ValueError without a finite value."""
    v = _finite(values)
    if not len(v):
        raise ValueError("no finite values to compare with the reference")
    edges = np.asarray(feature_ref["edges"], dtype=np.float64)
    expected = np.maximum(np.asarray(feature_ref["expected"], dtype=np.float64), eps)
    observed = np.maximum(np.bincount(_bin(edges, v), minlength=len(expected)) / len(v), eps)
    return float(np.sum((observed - expected) * np.log(observed / expected)))


def features_of(reference: dict) -> dict[str, dict]:
    """The per-feature mapping, given it or the model card's reference block holding it under
    "features" (a feature's own entry has "expected"; a block's "features" entry does not)."""
    inner = reference.get("features")
    if isinstance(inner, dict) and "expected" not in inner:
        return inner
    return reference


def scores(reference: dict, values: dict[str, np.ndarray]) -> dict[str, float]:
    """PSI of every feature present in both the reference and values (and holding a finite value)."""
    ref = features_of(reference)
    out = {}
    for name, v in values.items():
        if name in ref and np.isfinite(np.asarray(v, dtype=np.float64)).any():
            out[name] = psi(ref[name], v)
    return out


class DriftWindow:
    """The last `window` rows of every reference feature, scored against the reference.

    Serving calls `observe` per prediction batch and `report` for GET /<task>/drift. Thread-safe
    (a replica may observe from several request threads while another reads the report).
    """

    def __init__(self, reference: dict, window: int = 500, threshold: float = 0.2, min_rows: int = MIN_ROWS):
        if window < 1 or min_rows < 1:
            raise ValueError(f"window ({window}) and min_rows ({min_rows}) must be positive")
        self.reference = features_of(reference)
        self.window, self.threshold = window, threshold
        # never wait for more rows than the window holds
        self.min_rows = min(min_rows, window)
        self._rows = {name: deque(maxlen=window) for name in self.reference}
        self._lock = threading.Lock()

    def observe(self, values: dict[str, np.ndarray]) -> None:
        """Append a batch's rows; features the reference lacks are ignored."""
        with self._lock:
            for name, v in values.items():
                if name in self._rows:
                    self._rows[name].extend(_finite(v).tolist())

    def report(self) -> dict:
        """{"score": max PSI over features (None until a feature has `min_rows` rows), "features":
        {name: PSI} of the features with enough rows, "rows": rows in the window, "threshold",
        "drifted": score > threshold}."""
        with self._lock:
            windows = {name: np.fromiter(rows, dtype=np.float64) for name, rows in self._rows.items()}
        features = {
            name: round(psi(self.reference[name], v), 6)
            for name, v in windows.items()
            if len(v) >= self.min_rows
        }
        score = max(features.values()) if features else None
        return {
            "score": score,
            "features": features,
            "rows": max((len(v) for v in windows.values()), default=0),
            "threshold": self.threshold,
            "drifted": score is not None and score > self.threshold,
        }
