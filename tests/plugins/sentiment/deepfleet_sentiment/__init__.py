"""Text sentiment: is a short review of a song positive? The seed's text classifier as a deepfleet
task from outside deepfleet.

This module is what deepfleet loads to list its tasks, so it stays light: the recipe's typed
sections and the spec. The task's functions (`deepfleet_sentiment.task`) and its HTTP API
(`deepfleet_sentiment.serving`) import torch and transformers when first used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from jobs.config import DataSection, RecipeBase, Section
from jobs.tasks import TaskSpec

RECIPE = Path(__file__).with_name("sentiment.yaml")


class SentimentData(DataSection):
    root: str = "data/sentiment"
    """Folder of the Parquet shards and their manifest."""
    num_texts: int = Field(2000, ge=20)
    """Synthetic reviews to generate."""
    max_len: int = Field(32, ge=12, le=512)
    """Tokens per review after padding (the [CLS] token included); longer reviews are cut."""
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    """Share of reviews in the validation split."""
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    """Share of reviews in the test split."""
    rows_per_shard: int = Field(512, ge=1)
    """Rows per Parquet shard."""
    seed: int = 0
    """Seed of the generator and of the split hash."""

    def settings(self) -> SentimentData:
        return self  # the section is the loader's settings: nothing more to check


class SentimentModel(Section):
    name: Literal["sentiment"] = "sentiment"
    """Registry name of the architecture."""
    flavour: str = "tiny"
    """Registry flavour: `tiny` (a 2-layer BERT encoder, 64 wide)."""
    hidden: int = Field(64, ge=8)
    """Width of the encoder."""
    layers: int = Field(2, ge=1)
    """Transformer layers."""
    heads: int = Field(2, ge=1)
    """Attention heads per layer."""
    dropout: float = Field(0.1, ge=0, lt=1)
    """Dropout of the encoder and the head."""


class SentimentRecipe(RecipeBase):
    task: Literal["sentiment"] = "sentiment"
    data: SentimentData = SentimentData()
    model: SentimentModel = SentimentModel()


SPEC = TaskSpec(
    "sentiment", SentimentRecipe, "deepfleet_sentiment.task", "deepfleet_sentiment.serving:SERVING"
)
