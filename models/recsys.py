"""Spotify-style hybrid recommender and its matrix-factorisation baseline.

Both score (listening history, candidate track, context) -> play-probability logit and take the
same inputs, so one engine trains either:

    history_tracks [B, K] int (0 = padding)     history_features [B, K, E]     history_mask [B, K] bool
    candidate [B] int     candidate_features [B, F]     candidate_audio [B, mels, frames] or [B, A]
    context [B, X]

Hybrid: history (track embeddings + per-event features) -> GRU (or a transformer encoder);
candidate audio -> 1-D CNN over time (or an MLP over the published acoustic vector when a
dataset has no spectrograms); candidate features -> MLP; context -> MLP; the candidate attends
over the history; an MLP over all of it gives the logit. Track embeddings start at zero and the
candidate's is dropped at random in training, so a track never seen in training (cold start)
is scored from its audio and features alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.registry import ModelError, register


def _mlp(dim_in: int, hidden: int, dim_out: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim_out)
    )


class AudioCNN(nn.Module):
    """Spectrogram [B, mels, frames] -> [B, dim]: 1-D convolutions over time, mels as channels."""

    def __init__(self, mels: int, dim: int, channels: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(mels, channels, 5, padding=2),
            nn.BatchNorm1d(channels),
            nn.GELU(),
            nn.Conv1d(channels, channels, 5, padding=2, stride=2),
            nn.BatchNorm1d(channels),
            nn.GELU(),
            nn.Conv1d(channels, channels, 3, padding=1),
            nn.GELU(),
        )
        self.out = nn.Linear(2 * channels, dim)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        h = self.net(spec)
        return self.out(torch.cat([h.mean(-1), h.amax(-1)], dim=-1))  # average and max over time


class HybridRecommender(nn.Module):
    def __init__(
        self,
        num_tracks: int,
        event_features: int,
        track_features: int,
        context_features: int,
        audio_shape: tuple[int, ...] = (16, 32),
        embedding_dim: int = 32,
        hidden: int = 64,
        encoder: str = "gru",
        encoder_layers: int = 1,
        heads: int = 4,
        dropout: float = 0.1,
        id_dropout: float = 0.3,
    ):
        super().__init__()
        if encoder not in ("gru", "transformer"):
            raise ModelError(f"unknown history encoder '{encoder}' (valid: gru, transformer)")
        self.encoder_kind, self.id_dropout = encoder, id_dropout
        self.tracks = nn.Embedding(num_tracks, embedding_dim, padding_idx=0)
        nn.init.zeros_(self.tracks.weight)  # an unseen (cold) track keeps a zero embedding
        self.event = nn.Linear(event_features, embedding_dim)
        self.history_in = nn.Linear(2 * embedding_dim, hidden)
        self.encoder: nn.GRU | nn.TransformerEncoder
        if encoder == "gru":
            self.encoder = nn.GRU(hidden, hidden, num_layers=encoder_layers, batch_first=True)
        else:
            layer = nn.TransformerEncoderLayer(
                hidden, heads, 2 * hidden, dropout, batch_first=True, norm_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, encoder_layers, enable_nested_tensor=False)
            self.position = nn.Parameter(torch.zeros(1, 512, hidden))
        audio_shape = tuple(audio_shape)
        # a spectrogram goes through the CNN; a flat acoustic vector (MSSD) through an MLP
        self.audio = (
            AudioCNN(audio_shape[0], hidden)
            if len(audio_shape) == 2
            else _mlp(audio_shape[0], hidden, hidden)
        )
        self.track_mlp = _mlp(track_features, hidden, hidden, dropout)
        self.candidate_in = nn.Linear(embedding_dim + 2 * hidden, hidden)
        self.context_mlp = _mlp(context_features, hidden, hidden, dropout)
        self.attention = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)
        self.head = nn.Sequential(
            nn.Linear(5 * hidden, 2 * hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * hidden, 1)
        )

    def forward(
        self,
        history_tracks: torch.Tensor,
        history_features: torch.Tensor,
        history_mask: torch.Tensor,
        candidate: torch.Tensor,
        candidate_features: torch.Tensor,
        candidate_audio: torch.Tensor,
        context: torch.Tensor,
    ) -> torch.Tensor:
        mask = history_mask.bool()
        events = torch.cat([self.tracks(history_tracks), self.event(history_features)], dim=-1)
        h = self.history_in(events)
        if self.encoder_kind == "gru":
            states, _ = self.encoder(h)  # history is left-padded: the last state has seen every event
            summary = states[:, -1]
        else:
            states = self.encoder(h + self.position[:, : h.shape[1]], src_key_padding_mask=~mask)
            summary = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        track_id = self.tracks(candidate)
        if self.training and self.id_dropout:  # learn to score a track by its content alone
            keep = torch.rand(track_id.shape[0], 1, device=track_id.device) >= self.id_dropout
            track_id = track_id * keep
        cand = self.candidate_in(
            torch.cat([track_id, self.audio(candidate_audio), self.track_mlp(candidate_features)], dim=-1)
        )
        # the candidate attends over the events it follows (an empty history attends to nothing)
        empty = ~mask.any(1, keepdim=True)
        attended, _ = self.attention(cand[:, None], states, states, key_padding_mask=~(mask | empty))
        attended = attended[:, 0] * (~empty)
        ctx = self.context_mlp(context)
        return self.head(torch.cat([cand, attended, summary, ctx, cand * attended], dim=-1)).squeeze(-1)


class MatrixFactorisation(nn.Module):
    """Factorised item-item MF for sessions (MSSD has no user ids): the session's factor is the
    mean of its history tracks' factors; score = global + candidate bias + <session, candidate>.
    A track never seen in training keeps zero factors: it scores its bias, which is zero."""

    def __init__(self, num_tracks: int, embedding_dim: int = 32, **_):
        super().__init__()
        self.history = nn.Embedding(num_tracks, embedding_dim, padding_idx=0)
        self.items = nn.Embedding(num_tracks, embedding_dim, padding_idx=0)
        self.bias = nn.Embedding(num_tracks, 1, padding_idx=0)
        nn.init.normal_(self.history.weight, std=0.05)
        nn.init.zeros_(self.items.weight)
        nn.init.zeros_(self.bias.weight)
        self.global_bias = nn.Parameter(torch.zeros(1))

    def forward(self, history_tracks, history_features, history_mask, candidate, *_) -> torch.Tensor:
        mask = history_mask.float()[..., None]
        session = (self.history(history_tracks) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.global_bias + self.bias(candidate).squeeze(-1) + (session * self.items(candidate)).sum(-1)


@register("recsys", "tiny")
def tiny(**kw) -> HybridRecommender:
    """GRU over 10 events, 32-d embeddings: minutes on 2 CPU cores."""
    return HybridRecommender(**{"embedding_dim": 32, "hidden": 64, **kw})


@register("recsys", "full")
def full(**kw) -> HybridRecommender:
    """Millions of tracks (the 4M-row embedding table is why ZeRO-3 shards parameters), 2-layer GRU."""
    defaults = dict(num_tracks=4_000_001, embedding_dim=128, hidden=256, encoder_layers=2, heads=8)
    return HybridRecommender(**{**defaults, **kw})


@register("mf", "tiny")
def mf_tiny(**kw) -> MatrixFactorisation:
    return MatrixFactorisation(**{"embedding_dim": 32, **kw})


@register("mf", "full")
def mf_full(**kw) -> MatrixFactorisation:
    return MatrixFactorisation(**{"num_tracks": 4_000_001, "embedding_dim": 128, **kw})
