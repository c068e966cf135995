"""Synthetic song reviews whose label follows a hidden rule, in deepfleet's Parquet shards.

A review mixes neutral words with praise and complaint words; it is positive when it holds more
praise words than complaint words (never as many). Words become ids through a fixed vocabulary
(no tokenizer to download): [PAD] 0, [UNK] 1, [CLS] 2, then the words.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from data_loaders.shards import (
    ShardWriter,
    assign_split,
    check_fractions,
    iter_tables,
    open_split,
    prepared_with,
    read_dataset,
)

TASK = "sentiment"
SPLITS = ("train", "val", "test")
SCHEMA = pa.schema([("text_id", pa.string()), ("text", pa.string()), ("label", pa.int8())])
COLUMNS = SCHEMA.names
LABELS = ("negative", "positive")

PRAISE = [
    "good",
    "great",
    "lovely",
    "catchy",
    "brilliant",
    "warm",
    "fun",
    "uplifting",
    "beautiful",
    "fresh",
    "smooth",
    "groovy",
]
COMPLAINT = [
    "bad",
    "dull",
    "awful",
    "noisy",
    "boring",
    "harsh",
    "flat",
    "tired",
    "messy",
    "weak",
    "bland",
    "grating",
]
NEUTRAL = [
    "the",
    "a",
    "song",
    "track",
    "album",
    "this",
    "that",
    "chorus",
    "verse",
    "beat",
    "voice",
    "guitar",
    "drums",
    "and",
    "with",
    "is",
    "was",
    "really",
    "quite",
    "very",
    "bit",
    "melody",
    "lyrics",
    "intro",
    "bridge",
    "sound",
    "mix",
    "tempo",
    "band",
    "singer",
]
PAD, UNK, CLS = 0, 1, 2
VOCAB = {w: i for i, w in enumerate([*PRAISE, *COMPLAINT, *NEUTRAL], start=3)}
VOCAB_SIZE = len(VOCAB) + 3


def generate(num_texts: int, seed: int) -> Iterator[dict]:
    rng = np.random.default_rng(seed)
    for i in range(num_texts):
        praise, complaint = rng.choice(4, size=2, replace=False)  # never as many of each
        words = [
            *rng.choice(PRAISE, praise),
            *rng.choice(COMPLAINT, complaint),
            *rng.choice(NEUTRAL, int(rng.integers(4, 14))),
        ]
        rng.shuffle(words)
        yield {"text_id": f"review-{i:07d}", "text": " ".join(words), "label": int(praise > complaint)}


def prepare(s) -> dict:
    """Shards and manifest of the recipe's data section at s.root (reused when prepared alike)."""
    check_fractions(s.val_fraction, s.test_fraction, positive=True)
    meta = {"num_texts": s.num_texts, "seed": s.seed, "val_fraction": s.val_fraction}
    meta |= {"test_fraction": s.test_fraction, "rows_per_shard": s.rows_per_shard}
    existing = prepared_with(s.root, TASK, meta)
    if existing is not None:
        return existing
    counts = {split: [0, 0] for split in SPLITS}
    with ShardWriter(s.root, TASK, SCHEMA, s.rows_per_shard, SPLITS) as writer:
        for r in generate(s.num_texts, s.seed):
            split = assign_split(r["text_id"], s.val_fraction, s.test_fraction, s.seed)
            writer.add(split, r)
            counts[split][r["label"]] += 1
        return writer.close({**meta, "class_counts": counts})


def encode(texts, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ([CLS] first, cut and padded to max_len) and the attention mask."""
    ids = np.full((len(texts), max_len), PAD, dtype=np.int64)
    for i, text in enumerate(texts):
        tokens = [CLS, *(VOCAB.get(w, UNK) for w in str(text).lower().split())][:max_len]
        ids[i, : len(tokens)] = tokens
    return ids, (ids != PAD).astype(np.int64)


def decode_batch(batch: dict[str, np.ndarray], max_len: int) -> dict[str, np.ndarray]:
    ids, mask = encode(batch["text"], max_len)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "label": np.asarray(batch["label"]).astype(np.int64),
        "text_id": np.asarray(batch["text_id"]).astype(str).astype(object),
    }


def read_split(root: str, split: str, max_len: int, manifest: dict | None = None):
    _, paths = open_split(root, split, manifest)
    return read_dataset(paths, COLUMNS, decode_batch, {"max_len": max_len}, batch_size=256)


def iter_split(root: str, split: str, batch_size: int, max_len: int, **_) -> Iterator[dict]:
    _, paths = open_split(str(root), split)
    for table in iter_tables(paths, COLUMNS, batch_size):
        yield decode_batch({c: table.column(c).to_numpy(zero_copy_only=False) for c in COLUMNS}, max_len)
