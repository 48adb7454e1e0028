"""The L0 machinery of diff pruning (methods/diff_pruning.py), on plain tensors: the hard-concrete gate that makes
the expected L0 norm differentiable (Louizos, Welling & Kingma 2018, "Learning Sparse Neural Networks through L0
Regularization", section 4, eqs. 9-13) and the projection onto the L0 ball by global magnitude (Guo, Rush & Kim
2021, "Parameter-Efficient Transfer Learning with Diff Pruning", section 3.2).

    u ~ U(0, 1),   s = σ((log u - log(1 - u) + log α) / β),   z = min(1, max(0, s (r - l) + l))   (training)
    z = min(1, max(0, σ(log α) (r - l) + l))                                                        (evaluation)
    P(z ≠ 0) = σ(log α - β log(-l / r))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

EPS = 1e-6  # keeps log u and log(1 - u) finite


def sample_gate(log_alpha: torch.Tensor, temperature: float, low: float, high: float) -> torch.Tensor:
    """A reparameterised training sample of z in [0, 1], exactly 0 or 1 with positive probability."""
    u = torch.rand_like(log_alpha).clamp(EPS, 1 - EPS)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / temperature)
    return (s * (high - low) + low).clamp(0, 1)


def eval_gate(log_alpha: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """The deterministic gate used at evaluation, for merging and saving."""
    return (torch.sigmoid(log_alpha) * (high - low) + low).clamp(0, 1)


def prob_nonzero(log_alpha: torch.Tensor, temperature: float, low: float, high: float) -> torch.Tensor:
    """P(z ≠ 0) = σ(log α - β log(-l / r)): each gate's share of the expected L0 norm."""
    return torch.sigmoid(log_alpha - temperature * math.log(-low / high))


def magnitude_supports(magnitudes: Sequence[Callable[[], torch.Tensor]], k: int) -> list[torch.Tensor]:
    """The projection onto the L0 ball: of all entries of the tensors whose flat |d| ``magnitudes[i]()`` returns,
    keep the k largest, exactly k (1 <= k <= their total), ties broken in order. Returns, per tensor, the kept flat
    indices, ascending. Each magnitude is computed twice rather than kept: memory O(k + one tensor)."""
    top = torch.empty(0)  # the k largest |d| seen so far, never a copy of all deltas
    for magnitude_of in magnitudes:
        magnitude = magnitude_of().cpu()
        top = torch.cat([top, magnitude.topk(min(k, magnitude.numel())).values]).topk(min(k, len(top) + k)).values
    threshold = top[k - 1]
    above, ties = [], []
    for magnitude_of in magnitudes:
        magnitude = magnitude_of()
        above.append((magnitude > threshold).nonzero().squeeze(1))
        ties.append((magnitude == threshold).nonzero().squeeze(1)[: max(k - sum(len(t) for t in ties), 0)])
    need = k - sum(a.numel() for a in above)
    for i, equal in enumerate(ties):
        ties[i], need = equal[:need], need - min(need, equal.numel())
    return [torch.cat([a, t]).sort().values for a, t in zip(above, ties, strict=True)]
