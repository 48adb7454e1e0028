"""(IA)3 over a quantized base Linear (bitsandbytes 4 / 8-bit, torchao int8).

The forward needs nothing from the weight: the vector scales the quantized kernel's output (k/v: l ⊙ base(x)) or
its input (feed-forward: base(l ⊙ x)), as in ``methods/ia3.py``. Merging folds W * s into the weight, which on a
quantized weight means dequantize, scale the *original* weight by every merged vector, requantize, and report the
rounding error (``RoundingWarning``, ``layer.merge_rounding_error``); a non-finite result is refused. Unmerge puts
the stored weight and the bias back bit for bit.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from peftkit.core import quantized as Q
from peftkit.errors import MergeError
from peftkit.methods.ia3 import IA3Linear


class QuantizedIA3Linear(IA3Linear):
    """(IA)3 on a bitsandbytes Linear4bit / Linear8bitLt or a torchao-quantized nn.Linear."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = False
        self._premerge: tuple | None = None  # (Q.snapshot of the weight, a copy of the bias) before the first merge
        self.merge_rounding_error: tuple[float, float] | None = None

    def features(self) -> tuple[int, int]:
        return Q.features(self.get_base_layer())  # the packed weight's shape is not (out, in)

    def _original_weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        if self._premerge is None:
            return Q.dequantize(base)
        current = Q.snapshot(base)
        Q.restore(base, self._premerge[0])
        try:
            return Q.dequantize(base)
        finally:
            Q.restore(base, current)

    @torch.no_grad()
    def merge(self, adapter_names: list[str]) -> None:
        """W' = W0 * s_1 * ... * s_n (rows for k/v, columns for feed-forward), requantized; k/v scale b too."""
        base = self.get_base_layer()
        target = self._original_weight()
        for name in [*self.merged_adapters, *adapter_names]:
            target = target * self.weight_scale(self.vector(name).float())
        if not torch.isfinite(target).all():
            raise MergeError(
                f"Merging {adapter_names} into a {Q.kind(base)} {type(base).__name__} gives non-finite values; "
                "nothing was merged. Check the adapter's vectors, or keep it unmerged."
            )
        if self._premerge is None:
            self._premerge = (Q.snapshot(base), None if base.bias is None else base.bias.detach().clone())
        Q.requantize(base, target)
        self.merge_rounding_error = Q.rounding_error(base, target)
        warnings.warn(
            f"(IA)3 merge into a {Q.kind(base)} {type(base).__name__}: requantizing W * l changed it by up to "
            f"{self.merge_rounding_error[0]:.3g} (relative {self.merge_rounding_error[1]:.3g}); unmerge restores the "
            "stored weight exactly.",
            Q.RoundingWarning,
            stacklevel=2,
        )
        for name in adapter_names:
            if not self.is_feedforward and base.bias is not None:
                base.bias.mul_(self.vector(name).to(base.bias.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._premerge is None:
            return
        base = self.get_base_layer()
        snapshot, bias = self._premerge
        Q.restore(base, snapshot)
        if bias is not None:
            base.bias.copy_(bias)
        self._premerge = None
        self.merged_adapters.clear()
