"""LoRA and DoRA over a quantized base Linear: QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs", section 3, eq. 5).

The base weight stays in its stored format (bitsandbytes NF4 / FP4 / LLM.int8(), torchao int8) and its own kernel
computes W x; the adapter adds its low-rank term in the base layer's compute dtype:

    h = base(x) + s B A x          base(x) = dequant(W) x + b, computed by the quantized kernel

A and B are float32 parameters (the optimiser's master copies, as peft keeps them) cast to the compute dtype in the
forward; autograd reaches them and the input, never the frozen quantized weight. DoRA (section 4.1 of Liu et al.)
reads the dequantized weight for its row norms: h = base(x) + (f - 1) W x + f s B A x with f = m / ||W + s B A||_c.

Merging cannot be exact on a quantized weight: ``merge`` dequantizes, adds every merged adapter's delta to the
*original* weight (so rounding does not accumulate over repeated merges), requantizes into the same format and
reports the rounding error that introduced (a :class:`~peftkit.core.quantized.RoundingWarning` and
``layer.merge_rounding_error``). It refuses (MergeError, nothing changed) a result that is not finite: a NaN in the
packed weight could not be seen afterwards. ``unmerge`` puts the stored weight back bit for bit.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core import quantized as Q
from peftkit.errors import MergeError
from peftkit.methods.lora import dora
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.layers import LoraLinear


class QuantizedLoraLinear(LoraLinear):
    """LoRA / DoRA on a bitsandbytes Linear4bit / Linear8bitLt or a torchao-quantized nn.Linear."""

    supports_weight_inits = False  # PiSSA / OLoRA rewrite the base weight; LoftQ (methods/lora/loftq.py) quantizes it

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = False
        self._premerge: tuple | None = None  # the stored weight before the first merge (Q.snapshot)
        self.merge_rounding_error: tuple[float, float] | None = None  # (max abs, relative Frobenius) of the last merge

    # ---- creation -------------------------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        if not config.use_dora:
            super().update_layer(adapter_name, config, module_name)
            return
        dora.check_supported(self, module_name)
        super().update_layer(adapter_name, replace(config, use_dora=False), module_name)
        if dora.MAGNITUDE not in self.adapter_param_names:  # per instance, as dora.init_magnitude does
            self.adapter_param_names = (*self.adapter_param_names, dora.MAGNITUDE)
        with torch.no_grad():
            norm = self._row_norm(adapter_name, Q.dequantize(self.get_base_layer()))  # (out,) = ||W + s B A||_c
        getattr(self, dora.MAGNITUDE)[adapter_name] = nn.Parameter(norm)

    def reference_weight(self) -> torch.Tensor:
        """A float32 tensor on the base's device: the factors' dtype (the stored weight is packed integers)."""
        return torch.empty(0, device=self.get_base_layer().weight.device)

    def create(self, adapter_name: str, r: int, bias: bool) -> None:
        in_f, out_f = Q.features(self.get_base_layer())
        self.lora_A[adapter_name] = nn.Linear(in_f, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, out_f, bias=bias)

    # ---- forward --------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """base(x) + sum_a s_a B_a A_a x (DoRA adapters: + (f - 1) W x + f s B A x), the adapters in compute dtype."""
        if not Q.is_quantized(self.get_base_layer()):  # dequantized in place (integrations/kbit.dequantize_model)
            return super().forward(x, *args, **kwargs)
        routed = self.routing is not None and not self.disabled
        live = [] if routed else self.live_adapters()
        if not live and not (routed and self.has_routed_adapters()):
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)  # (..., out): the quantized kernel
        xc = x.to(Q.compute_dtype(self.get_base_layer(), x))  # (..., in)
        if self.lora_magnitude_vector and dora.uses_dora(self, self.routing.names if routed else live):
            return self._dora_forward(xc, result, live)
        delta = self._routed(xc, None) if routed else self._low_rank_sum(xc, live)
        return result + delta.reshape(result.shape).to(result.dtype)

    def _low_rank(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s B A x' + s c for one adapter (x' its dropout of x), in x's dtype: (..., out)."""
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        h = F.linear(self.lora_dropout[name](x), lora_a.weight.to(x.dtype))  # (..., r)
        y = F.linear(h, lora_b.weight.to(x.dtype)) * self.scaling[name]  # (..., out)
        c = self.bias_delta(name)
        return y if c is None else y + c.to(x.dtype)

    def _low_rank_sum(self, x: torch.Tensor, names: list[str]) -> torch.Tensor:
        total = self._low_rank(names[0], x)
        for name in names[1:]:
            total = total + self._low_rank(name, x)
        return total

    # ---- DoRA -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _row_norm(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """||W + s B A||_c (out,), float32, detached (DoRA section 4.3: the norm is a constant in backward)."""
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return torch.linalg.norm(weight + self.scaling[name] * (b @ a), dim=1)

    def _dora_factor(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """f = m / ||W + s B A||_c (out,), differentiable in m."""
        return getattr(self, dora.MAGNITUDE)[name].reshape(-1) / self._row_norm(name, weight)

    def _dora_forward(self, x: torch.Tensor, result: torch.Tensor, live: list[str]) -> torch.Tensor:
        """LoRA and DoRA adapters mixed: base(x) + sum_LoRA s B A x' + sum_DoRA ((f - 1) W x' + f s B A x'), with
        W x = base(x) - b when there is no dropout; per-row: ((W x + low-rank_row) * g_row) + b (g = f or 1)."""
        base = self.get_base_layer()
        weight = Q.dequantize(base)  # (out, in) float32: the norms, and W x' under dropout
        bias = base.bias
        wx = result if bias is None else result - bias.to(result.dtype)  # (..., out)
        if self.routing is not None:
            low = self._routed(x, None).reshape(wx.shape).to(wx.dtype)
            names = self.routing.names
            g = wx.new_ones(len(names), wx.shape[-1])  # (n, out)
            for k, name in enumerate(names):
                if dora.is_dora(self, name):
                    g[k] = self._dora_factor(name, weight).to(g.dtype)
            rows = self.routing.rows(x.shape[0])
            out = (wx + low) * g[rows].reshape(x.shape[0], *([1] * (wx.dim() - 2)), -1)
            return out if bias is None else out + bias.to(out.dtype)
        out = result
        for name in live:
            low = self._low_rank(name, x)
            if dora.is_dora(self, name):
                dropout = self.lora_dropout[name]
                plain = isinstance(dropout, nn.Identity) or not self.training
                w_x = wx if plain else F.linear(dropout(x), weight.to(x.dtype))
                f = self._dora_factor(name, weight).to(x.dtype)
                low = (f - 1) * w_x.to(x.dtype) + f * low
            out = out + low.to(out.dtype)
        return out

    # ---- merging: dequantize, add, requantize; unmerge restores the stored weight --------------------------------
    def _original_weight(self) -> torch.Tensor:
        """dequant(W0) (out, in) float32, W0 the stored weight before any merge."""
        base = self.get_base_layer()
        if self._premerge is None:
            return Q.dequantize(base)
        current = Q.snapshot(base)
        Q.restore(base, self._premerge)
        try:
            return Q.dequantize(base)
        finally:
            Q.restore(base, current)

    def _merge_delta(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        """ΔW (LoRA) or (f - 1) W0 + f ΔW (DoRA, f = m / ||W0 + ΔW||_c), float32 (out, in)."""
        delta = self.delta_weight(name).float()
        if not dora.is_dora(self, name):
            return delta
        f = getattr(self, dora.MAGNITUDE)[name].reshape(-1).float() / torch.linalg.norm(w0 + delta, dim=1)
        return (f - 1)[:, None] * w0 + f[:, None] * delta

    @torch.no_grad()
    def merge(self, adapter_names: list[str]) -> None:
        base = self.get_base_layer()
        if self._premerge is None and not Q.is_quantized(base):  # a dequantized base: LoRA's exact W + ΔW
            super().merge(adapter_names)
            return
        self.check_mergeable(adapter_names)
        w0 = self._original_weight()
        target = w0.clone()
        for name in [*self.merged_adapters, *adapter_names]:
            target += self._merge_delta(name, w0)
        if not torch.isfinite(target).all():
            raise MergeError(
                f"Merging {adapter_names} into a {Q.kind(base)} {type(base).__name__} gives non-finite values (NaN / "
                "inf); nothing was merged. Check the adapter's tensors (a diverged run?), or keep it unmerged."
            )
        if self._premerge is None:
            self._premerge = Q.snapshot(base)
        Q.requantize(base, target)
        self.merge_rounding_error = Q.rounding_error(base, target)
        max_err, rel = self.merge_rounding_error
        warnings.warn(
            f"merge into a {Q.kind(base)} {type(base).__name__} ({base.out_features}x{base.in_features}): "
            f"requantizing W + ΔW changed it by up to {max_err:.3g} (||error||/||W + ΔW|| = {rel:.3g}), so the merged "
            "layer's output differs from the unmerged one. unmerge restores the stored weight exactly; for a "
            "lossless merge export a dequantized model (peftkit merge --dtype bf16).",
            Q.RoundingWarning,
            stacklevel=2,
        )
        for name in adapter_names:
            c = self.bias_delta(name)
            if c is not None:
                base.bias += c.to(base.bias.dtype)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._premerge is None:  # nothing merged, or merged into a dequantized base as plain LoRA
            super().unmerge()
            return
        base = self.get_base_layer()
        for name in reversed(self.merged_adapters):
            c = self.bias_delta(name)
            if c is not None:
                base.bias -= c.to(base.bias.dtype)
        Q.restore(base, self._premerge)
        self._premerge = None
        self.merged_adapters.clear()
