"""The router: a small MLP over the hidden state of the last prompt token after decoder layer k."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Gate(nn.Module):
    """h -> LayerNorm -> [Linear -> GELU -> Dropout]* -> 1 logit.

    The input LayerNorm is there because hidden states after an early decoder layer have a few
    outlier dimensions whose scale differs by orders of magnitude between models (and between
    fp32 and bf16 runs); normalising per feature vector makes one learning rate (1e-3) work for
    every backbone and keeps the first GELU layer out of saturation. It is part of the gate, so it
    is trained and exported with it; the backbone is untouched.
    """

    def __init__(self, hidden_size: int, hidden_sizes: Sequence[int] = (128, 64), dropout: float = 0.1):
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        layers: list[nn.Module] = [nn.LayerNorm(self.hidden_size)]
        width = self.hidden_size
        for size in self.hidden_sizes:
            layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, h) features -> (B,) logits, computed in the gate's own dtype (fp32 by default)."""
        dtype = self.net[0].weight.dtype
        return self.net(features.to(dtype)).squeeze(-1)

    @torch.no_grad()
    def probs(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(features).float())


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
