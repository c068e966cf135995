"""The sentiment task's HTTP API: a review in, its label and probability out."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from deepfleet_sentiment import data
from jobs.tasks import Serving
from serve.codecs import BadInput, Codec
from serve.schemas import Answer, Strict


class SentimentRequest(Strict):
    text: str = Field(description="A review of a song, in words.", min_length=1, max_length=10_000)


class SentimentResponse(Answer):
    label: Literal["negative", "positive"]
    probability: float = Field(description="Probability that the review is positive.")


class SentimentCodec(Codec):
    def decode(self, request: dict) -> dict[str, np.ndarray]:
        if not request["text"].split():
            raise BadInput("text: holds no words")
        ids, mask = data.encode([request["text"]], self.spec["max_len"])
        return {"input_ids": ids, "attention_mask": mask}

    def encode(self, output, rows: dict[str, np.ndarray], request: dict) -> dict:
        positive = float(output.softmax(-1)[0, 1])
        return {"label": data.LABELS[int(positive >= 0.5)], "probability": positive}

    def example(self) -> dict:
        return {"text": "a catchy chorus and a warm voice"}


SERVING = Serving(SentimentRequest, SentimentResponse, SentimentCodec)
