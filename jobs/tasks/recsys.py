"""Music recommendation: play probability of a candidate track after a listening history.

Validation scores every row of the candidate lists (1 real event + sampled tracks per query):
AUC over all rows, NDCG@10 and precision@10 per list, AUC over rows whose candidate is a
cold-start track. The same numbers for a popularity ranking and for matrix factorisation (trained
by this engine as the sibling run `<run>-mf`) land beside them in summary.json.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from data_loaders import recsys as data
from data_loaders.shards import load_manifest, shard_paths
from jobs.config import ConfigError, RecsysModel, RecsysRecipe
from jobs.tasks import save_figure

if TYPE_CHECKING:
    from jobs.tasks.recsys_metrics import RankingMetrics

METRICS = ("auc", "ndcg10", "precision10", "cold_auc")
# dtype auto on CPU workers: bf16, its matmuls and GRU run faster in bf16 on CPUs with native bf16
# (deepfleet bench --section train: bf16/fp32)
CPU_BF16 = True
TOP_K = 10
SHUFFLE_BUFFER_ROWS = data.SHUFFLE_BUFFER_ROWS  # jobs.worker.train_batches: rows mixed locally
LOWER_IS_BETTER: tuple[str, ...] = ()
REFERENCE_ROWS = None  # jobs.export.REFERENCE_ROWS


def _meta(recipe: RecsysRecipe) -> dict:
    return load_manifest(recipe.data.root)["meta"]


def check_table(recipe: RecsysRecipe, meta: dict) -> int:
    """Rows of the track-embedding table: the recipe's, if it holds the catalogue, else the catalogue's."""
    need, asked = meta["num_tracks"], recipe.model.num_tracks
    if asked is None:
        return need
    if asked < need:
        raise ConfigError(
            f"model.num_tracks ({asked}) is smaller than the catalogue at {recipe.data.root} ({need} rows with "
            "padding): raise it or set it to null"
        )
    return asked


def prepare(recipe: RecsysRecipe) -> dict:
    manifest = data.prepare(recipe.data.settings())
    check_table(recipe, manifest["meta"])  # before any worker starts
    return manifest


def datasets(recipe: RecsysRecipe, manifest: dict) -> dict:
    d = recipe.data
    return {
        # shards in a random order, rows mixed by the worker in windows of SHUFFLE_BUFFER_ROWS
        # (jobs.worker.train_batches): a batch mixes queries, sessions and days; seeded by the
        # recipe and the epoch, so a resumed epoch sees the order it saw before
        "train": data.read_split(d.root, "train", manifest, shuffle=True, seed=recipe.train.seed),
        # decoded once and kept in the object store for every epoch's validation
        "val": data.read_split(d.root, "val", manifest).materialize(),
    }


def model_kwargs(recipe: RecsysRecipe) -> dict:
    meta = _meta(recipe)
    kwargs = {"num_tracks": check_table(recipe, meta)}
    if recipe.model.name != "mf":
        kwargs |= {
            "event_features": meta["event_features"],
            "track_features": meta["track_features"],
            "context_features": meta["context_features"],
            # a spectrogram goes through the audio CNN; without one, the published acoustic vector
            "audio_shape": list(meta["audio_shape"]) if meta["has_audio"] else [meta["acoustic_dim"]],
        }
    return kwargs | recipe.model.build_kwargs()


def input_spec(recipe: RecsysRecipe) -> dict:
    """What a caller must send: history of `history_len` events (left-padded), candidate features
    encoded as in training (names and z-score statistics), audio or the acoustic vector."""
    meta = _meta(recipe)
    return {
        "history_len": meta["history_len"],
        "has_audio": meta["has_audio"],
        "audio_shape": meta["audio_shape"] if meta["has_audio"] else [meta["acoustic_dim"]],
        "acoustic_dim": meta["acoustic_dim"],
        "catalogue_tracks": meta["catalogue_tracks"],
        "event_feature_names": meta["event_feature_names"],
        "context_feature_names": meta["context_feature_names"],
        "track_feature_names": meta["track_feature_names"],
        "track_feature_stats": meta["track_feature_stats"],
        "tracks_file": meta["tracks_file"],
    }


def export_files(recipe: RecsysRecipe) -> list[Path]:
    """The track catalogue travels with an exported model: serving maps track ids to catalogue
    indices and reads candidate features and audio from it (data.load_catalogue(model_dir))."""
    return [Path(recipe.data.root) / _meta(recipe)["tracks_file"]]


def _tensor(x, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Arrow-backed batches are read-only; torch wants writable memory (a copy only when needed)
    return torch.as_tensor(np.require(x, requirements="W"), device=device, dtype=dtype)


def example_batch(recipe: RecsysRecipe, rows: int) -> dict[str, np.ndarray]:
    """Zeros shaped like a decoded training batch (deepfleet plan): B rows of a history of H
    events, the candidate and its audio ([mels, frames], or MSSD's 8 acoustic values)."""
    spec = input_spec(recipe)
    hist, audio = spec["history_len"], spec["audio_shape"]
    audio_key = "candidate_audio" if spec["has_audio"] else "candidate_acoustic"
    return {
        "history_tracks": np.ones((rows, hist), np.int64),
        "history_features": np.zeros((rows, hist, len(spec["event_feature_names"])), np.float32),
        "history_mask": np.ones((rows, hist), bool),
        "candidate": np.ones(rows, np.int64),
        "candidate_features": np.zeros((rows, len(spec["track_feature_names"])), np.float32),
        audio_key: np.zeros((rows, *audio), np.float32),
        "context": np.zeros((rows, len(spec["context_feature_names"])), np.float32),
    }


# Shape legend: B = rows, H = history events, E/T/X = event/track/context features.
def inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    audio = batch["candidate_audio"] if "candidate_audio" in batch else batch["candidate_acoustic"]
    return (
        _tensor(batch["history_tracks"], device, torch.long),  # [B, H]
        _tensor(batch["history_features"], device, dtype),  # [B, H, E]
        _tensor(batch["history_mask"], device, torch.bool),  # [B, H]
        _tensor(batch["candidate"], device, torch.long),  # [B]
        _tensor(batch["candidate_features"], device, dtype),  # [B, T]
        _tensor(audio, device, dtype),  # [B, mels, frames] or [B, 8]
        _tensor(batch["context"], device, dtype),  # [B, X]
    )


def query_index(query_ids) -> np.ndarray:
    """A stable 63-bit integer per query id (the retrieval metrics group rows by it): the same in
    every process and run, unlike hash(); collisions are negligible at millions of queries."""
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(str(q).encode(), digest_size=8).digest(), "little") >> 1
            for q in query_ids
        ],
        dtype=np.int64,
    )


def targets(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "label": _tensor(batch["label"], device, torch.float32),
        "is_cold": _tensor(batch["is_cold"], device, torch.bool),
        "index": torch.as_tensor(query_index(batch["query_id"]), device=device),
    }


def loss(recipe: RecsysRecipe, output, batch: dict, device: torch.device) -> torch.Tensor:
    # the labels only: targets() also hashes every query id for the ranking metrics, a cost the
    # training step need not pay
    return F.binary_cross_entropy_with_logits(output.float(), _tensor(batch["label"], device, torch.float32))


def sample_ids(batch: dict) -> list[str]:
    # the query, not the row: a candidate list is scored whole on one rank
    return [str(q) for q in batch["query_id"]]


def metrics(recipe: RecsysRecipe | None = None) -> RankingMetrics:
    # torchmetrics takes seconds to import: only processes that score rows pay for it (not
    # serving replicas, Tune's trial drivers or the CLI)
    from jobs.tasks.recsys_metrics import RankingMetrics

    return RankingMetrics()


# ------------------------------------------------------------------ baselines


def popularity(root: str | Path, split: str = "val") -> dict:
    """Rank every candidate by its plays in the training split (tracks.parquet `popularity`);
    cold tracks have none, so they tie. Scored by the same metric code as the models."""
    from jobs.tasks.recsys_metrics import RankingMetrics

    cat = data.load_catalogue(str(root))
    manifest = load_manifest(root)
    metric = RankingMetrics(with_loss=False)
    columns = ["query_id", "candidate", "label", "is_cold"]
    for path in shard_paths(root, manifest, split):
        for rb in pq.ParquetFile(path).iter_batches(batch_size=65536, columns=columns):
            b = rb.to_pydict()
            scores = torch.as_tensor(
                np.log1p(cat.popularity[np.asarray(b["candidate"])]), dtype=torch.float32
            )
            metric.update(scores, targets(b, torch.device("cpu")))
    result = metric.compute()
    return {"predictor": "popularity", **{k: result[k] for k in METRICS}}


def mf_recipe(recipe: RecsysRecipe) -> RecsysRecipe:
    """The sibling MF run: same data, engine, scaling and schedule; MF model and its own lr/epochs."""
    b = recipe.baselines
    mf = recipe.model_copy(deep=True)
    mf.model = RecsysModel(
        name="mf",
        flavour=recipe.model.flavour,
        num_tracks=recipe.model.num_tracks,
        embedding_dim=b.mf_embedding_dim or recipe.model.embedding_dim,
    )
    mf.train.epochs = b.mf_epochs or recipe.train.epochs
    mf.train.lr = b.mf_lr or recipe.train.lr
    mf.run.name = f"{recipe.run_name}-mf"
    return mf


def siblings(recipe: RecsysRecipe) -> dict[str, RecsysRecipe]:
    """The MF baseline, a run of its own that the driver trains after the recipe's (same data,
    engine, scaling and schedule: mf_recipe), unless turned off (baselines.mf) or the recipe's
    model is MF itself."""
    return {"mf": mf_recipe(recipe)} if recipe.baselines.mf and recipe.model.name != "mf" else {}


def baseline(
    recipe: RecsysRecipe, manifest: dict, siblings: dict[str, dict] | None = None
) -> dict[str, dict]:
    """Popularity ranking always; matrix factorisation from its sibling run's summary."""
    out = {"popularity": popularity(recipe.data.root, "val")}
    if mf := (siblings or {}).get("mf"):
        out["mf"] = {
            "predictor": "matrix factorisation",
            **{k: mf["metrics"].get(k) for k in METRICS},
            "steps": mf["steps"],
            "run": mf["paths"]["run_dir"],
        }
    return out


def drift_features(inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> dict[str, np.ndarray]:
    """Per row (float64): the predicted play probability; the history's length and share of
    skipped events (skip_2); the candidate's popularity estimate (z-scored catalogue feature:
    a shift towards the long tail or the charts); the context type (index into CONTEXT_TYPES,
    -1 for none: a new mix of playlists, radio, ...) and premium (a new mix of users). Not the
    hour or weekday: a serving window covers minutes, so they move with the clock, not with
    drift. Column positions come from the data loader's feature-name tuples, the order
    decode_batch writes. Cheap: serving computes them on every batch."""
    _, history_features, history_mask, _, candidate_features, _, context = inputs
    mask = history_mask.detach().double()  # [B, H]
    length = mask.sum(1)
    skips = history_features.detach()[..., data.EVENT_FEATURES.index("skip_2")].double()
    ctx = context.detach().double()
    first = data.CONTEXT_FEATURES.index(f"context_type_{data.CONTEXT_TYPES[0]}")
    types = ctx[:, first : first + len(data.CONTEXT_TYPES)]
    out = {
        "play_prob": torch.sigmoid(output.detach().double()),
        "history_length": length,
        "history_skip_rate": (skips * mask).sum(1) / length.clamp(min=1),
        "candidate_popularity": candidate_features.detach()[
            :, data.TRACK_FEATURES.index("us_popularity_estimate")
        ].double(),
        "context_type": torch.where(types.amax(1) > 0, types.argmax(1), -1).double(),
        "premium": ctx[:, data.CONTEXT_FEATURES.index("premium")],
    }
    return {k: v.cpu().numpy() for k, v in out.items()}


def iter_split(root: str | Path, split: str, batch_size: int, **_):
    """Decoded batches of a split without Ray (offline evaluation); lists may straddle batches,
    the retrieval metrics group rows by query."""
    return data.iter_split_numpy(str(root), split, batch_size)


def plot(metric: RankingMetrics, example, out_dir: Path) -> list[str]:
    """ROC curves (all rows and cold-start rows) and the play-probability distributions of played
    and not-played rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    result = metric.compute()
    scores, labels, cold, _ = (t.numpy() for t in metric.rows())
    fig, (roc, hist) = plt.subplots(1, 2, figsize=(12, 5))
    roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":", label="chance")
    roc.plot(*roc_curve(labels, scores)[:2], label=f"all rows (AUC {result['auc']:.3f})")
    if 0 < labels[cold].sum() < cold.sum():
        roc.plot(
            *roc_curve(labels[cold], scores[cold])[:2],
            label=f"cold-start tracks (AUC {result['cold_auc']:.3f})",
        )
    roc.set_xlabel("false-positive rate")
    roc.set_ylabel("true-positive rate")
    roc.set_title("ROC: played vs not played")
    roc.legend(loc="lower right")
    bins = np.linspace(0, 1, 51)
    hist.hist(scores[labels == 1], bins=bins, alpha=0.6, density=True, label="played")
    hist.hist(scores[labels == 0], bins=bins, alpha=0.6, density=True, label="skipped or sampled")
    hist.set_xlabel("predicted play probability")
    hist.set_title("score distributions (density)")
    hist.legend()
    fig.suptitle(
        f"{result['val_rows']} rows: NDCG@10 {result['ndcg10']:.3f}, precision@10 {result['precision10']:.3f}"
    )
    return save_figure(fig, out_dir, "roc_scores.png")
