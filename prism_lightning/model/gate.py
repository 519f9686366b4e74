"""The router: a small MLP over the hidden state of the last prompt token after decoder layer k."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Gate(nn.Module):
    """standardise -> [Linear -> GELU -> Dropout]* -> 1 logit.

    The input is standardised per dimension with the training set's mean and standard deviation
    (buffers set by :meth:`set_feature_stats` before training, exported with the weights). Why: after
    an early decoder layer the last prompt token is always the same template token (e.g. the newline
    after ``assistant``), so its hidden state differs between queries by a few percent of its size
    (measured on SmolLM2: std across queries 0.04 vs mean magnitude 0.48). Centring removes the
    shared part and lets the MLP see what differs between queries; a per-vector LayerNorm would not.
    The backbone is untouched.
    """

    def __init__(self, hidden_size: int, hidden_sizes: Sequence[int] = (128, 64), dropout: float = 0.1):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        self.register_buffer("feature_mean", torch.zeros(self.hidden_size))
        self.register_buffer("feature_std", torch.ones(self.hidden_size))
        layers: list[nn.Module] = []
        width = self.hidden_size
        for size in self.hidden_sizes:
            layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-5) -> None:
        self.feature_mean.copy_(mean.to(self.feature_mean))
        self.feature_std.copy_(std.to(self.feature_std) + eps)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, h) features -> (B,) logits, computed in the gate's own dtype (fp32 by default)."""
        x = (features.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
        return self.net(x.to(self.net[0].weight.dtype)).squeeze(-1)


def gate_loss(logits: torch.Tensor, targets: torch.Tensor, pos_weight: float | torch.Tensor) -> torch.Tensor:
    """Class-balanced binary cross-entropy: positives (distill) are weighted by n_retain / n_distill,
    so both classes contribute equally to the loss whatever the split."""
    pos_weight = torch.as_tensor(pos_weight, dtype=torch.float32, device=logits.device)
    return F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), pos_weight=pos_weight.reshape(())
    )


def balanced_pos_weight(n_distill: float, n_retain: float) -> float:
    """retain / distill, with guards for an empty class (then no re-weighting is possible)."""
    if n_distill <= 0 or n_retain <= 0:
        return 1.0
    return float(n_retain) / float(n_distill)
