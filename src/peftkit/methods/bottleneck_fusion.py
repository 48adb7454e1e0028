"""AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer Learning",
section 3.2): a learned, per-position attention over the outputs of trained bottleneck (or Compacter) adapters.

A fusion adapter is a ``BottleneckConfig(fusion_of=[...])``: it adds one :class:`FusionLayer` at every layer that
holds all the fused adapters; ``BottleneckLayer`` runs it (``Fusion`` blocks of core/compose.py, or the fusion
adapter's name as the active adapter).
"""

from __future__ import annotations

import torch
from torch import nn

from peftkit.core.merge import adapter_layers
from peftkit.errors import TargetNotFoundError, choices


class FusionLayer(nn.Module):
    """AdapterFusion at one layer (Pfeiffer et al. 2021, section 3.2): query from the layer's output h, keys and
    values from the adapters' contributions d_i = adapter_i(h) - h:

        a = softmax_i(Q(h) . K(h + d_i)),   out = h + sum_i a_i V(d_i)      V = I at init: out = h + mean_i d_i
    """

    def __init__(self, d: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        with torch.no_grad():
            for lin in (self.query, self.key):
                lin.weight.normal_(0.0, 0.02)
                lin.bias.zero_()
            self.value.weight.copy_(torch.eye(d))
            self.value.bias.zero_()

    def forward(self, h: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
        deltas = torch.stack([o - h for o in outputs], dim=-2)  # (..., n, d)
        keys = self.key(deltas + h.unsqueeze(-2))  # (..., n, d)
        scores = (keys @ self.query(h).unsqueeze(-1)).squeeze(-1)  # (..., n)
        weights = scores.softmax(dim=-1)
        return h + (weights.unsqueeze(-1) * self.value(deltas)).sum(dim=-2)  # (..., d)


def fusion_sites(model: nn.Module, fusion_of: list[str], layer_type: type[nn.Module]) -> list[str]:
    """Names of the ``layer_type`` layers holding every adapter of ``fusion_of`` (their ``settings``); raises,
    naming the adapters present, when there is none."""
    wanted = set(fusion_of)
    held = [(n, m) for n, m in adapter_layers(model) if isinstance(m, layer_type)]
    found = [n for n, m in held if wanted <= set(m.settings)]
    if not found:
        present = sorted({a for _, m in held for a in m.settings})
        raise TargetNotFoundError(
            f"fusion_of={fusion_of!r}: no layer holds all of these adapters (adapters present: "
            f"{choices(present) or 'none'}). Add (and train) them first, at the same placement."
        )
    return found
