"""The sentiment model: a BERT encoder built from its config (random weights, nothing to
download), masked mean pooling and a linear head. Registered as `sentiment` in deepfleet's
model registry, so the engine builds it by name like its own models."""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import BertConfig, BertModel

from models.registry import register


class SentimentEncoder(nn.Module):
    def __init__(self, vocab_size: int, max_len: int, hidden: int, layers: int, heads: int, dropout: float):
        super().__init__()
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=max_len,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled)


@register("sentiment", "tiny")
def tiny(
    vocab_size: int, max_len: int, hidden: int = 64, layers: int = 2, heads: int = 2, dropout: float = 0.1
):
    return SentimentEncoder(vocab_size, max_len, hidden, layers, heads, dropout)
