"""The router: a small MLP over the hidden state of the last prompt token after decoder layer k."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

# Floors of the standardising std (see Gate.set_feature_stats).
STD_REL_FLOOR = 0.1
STD_MAGNITUDE_FLOOR = 1.0 / 64
STD_ABS_FLOOR = 1e-4


class Gate(nn.Module):
    """standardise -> [Linear -> GELU -> Dropout]* -> 1 logit (or ``n_classes`` logits: K-way routing,
    class 0 = no adapter, class j = adapter j).

    The input is standardised per dimension with the training set's mean and standard deviation
    (buffers set by :meth:`set_feature_stats` before training, exported with the weights). Why: after
    an early decoder layer the last prompt token is always the same template token (e.g. the newline
    after ``assistant``), so its hidden state differs between queries by a few percent of its size
    (measured on SmolLM2: std across queries 0.04 vs mean magnitude 0.48). Centring removes the
    shared part and lets the MLP see what differs between queries; a per-vector LayerNorm would not.
    The backbone is untouched.
    """

    def __init__(
        self,
        hidden_size: int,
        hidden_sizes: Sequence[int] = (128, 64),
        dropout: float = 0.1,
        n_classes: int = 1,
    ):
        super().__init__()
        if n_classes == 2 or n_classes < 1:
            raise ValueError(f"n_classes is 1 (on/off) or >= 3 (none + K >= 2 adapters), got {n_classes}.")
        self.n_classes = int(n_classes)
        self.hidden_size = int(hidden_size)
        self.hidden_sizes = [int(h) for h in hidden_sizes]
        self.register_buffer("feature_mean", torch.zeros(self.hidden_size))
        self.register_buffer("feature_std", torch.ones(self.hidden_size))
        layers: list[nn.Module] = []
        width = self.hidden_size
        for size in self.hidden_sizes:
            layers += [nn.Linear(width, size), nn.GELU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, self.n_classes))
        self.net = nn.Sequential(*layers)

    @torch.no_grad()
    def set_feature_stats(
        self,
        mean: torch.Tensor,
        std: torch.Tensor,
        *,
        rel_floor: float = STD_REL_FLOOR,
        magnitude_floor: float = STD_MAGNITUDE_FLOOR,
        abs_floor: float = STD_ABS_FLOOR,
    ) -> None:
        """Store the training features' per-dimension mean and std, the std clamped from below.

        Why a floor: a dimension that is (nearly) constant over the training queries has a std of
        ~0, and dividing by it turns a one-ulp bf16 difference between the training path
        (right-padded prompt+response) and the inference path (left-padded prefill) into tens of
        standard units, enough to flip the gate. Each dimension's std is raised to at least
        ``max(rel_floor * median std, magnitude_floor * |mean|, abs_floor)``:

        * ``rel_floor`` (0.1) of the median std over dimensions (the median, so a few huge
          "massive activation" dimensions do not raise it): no dimension is scaled up more than 10x
          a typical one, so rounding noise, of about the same absolute size in every dimension of
          similar magnitude, is amplified at most 10x more than it already is in a typical dimension.
        * ``magnitude_floor`` (1/64) of the dimension's own |mean|: bf16 keeps 8 significant bits, so
          two paths differ by about |mean| / 256 per rounding; with this floor such a difference is
          at most ~0.25 standard units, even in a large near-constant dimension.
        * ``abs_floor`` (1e-4) when every std is ~0 (e.g. a single training row).

        Typical dimensions are untouched (on SmolLM2 their std is ~1/12 of their magnitude). The
        floor is applied here, not in :meth:`forward`, so exported ``feature_std`` buffers load as
        they were trained.
        """
        mean = mean.detach().to(self.feature_mean)
        std = std.detach().to(self.feature_std).nan_to_num(0.0).clamp_min(0.0)
        floor = torch.maximum((rel_floor * std.median()).clamp_min(abs_floor), magnitude_floor * mean.abs())
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.maximum(std, floor))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, h) features -> (B,) logits ((B, n_classes) for K-way), in the gate's own dtype (fp32 by
        default)."""
        x = (features.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
        out = self.net(x.to(self.net[0].weight.dtype))
        return out.squeeze(-1) if self.n_classes == 1 else out

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        """Routing probabilities: sigmoid (B,) for one logit, softmax (B, n_classes) for K-way."""
        logits = self(features).float()
        return torch.sigmoid(logits) if self.n_classes == 1 else torch.softmax(logits, dim=-1)
