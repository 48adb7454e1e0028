"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

The adapted weight is split into a magnitude and a direction (section 4.1, eq. 5):

    W' = m * (W + s B A) / ||W + s B A||_c        m: (out,), one trainable magnitude per output row

``||.||_c`` is the L2 norm of each output row of the (out, in) weight (the axis peft 0.21 uses: ``dim=1``, GPT-2's
Conv1D transposed first). m starts at ||W + s B A||_c, so DoRA equals the base model at initialisation (B = 0). As
section 4.3 suggests, the norm is a constant in backward (detached): gradients reach m, A and B only through the
numerator. The layer output is therefore, with f = m / ||W + s B A||_c (out,) and b the base bias,

    h = f * (W x + s B A x) + b                   (= W x + b + (f - 1) W x + f s B A x)

and, under dropout in training, peft's form with the dropped input x' on the adapter terms only:

    h = W x + b + (f - 1) W x' + f s B A x'

The norm is computed once per forward with the Gram identity ||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s (W A^T)_i . B_i
+ s^2 B_i (A A^T) B_i^T (no (out, in) temporary), and cached until W, A, B or the scale change (tensor version
counters), so unmerged inference pays one elementwise scale per layer over LoRA.

Merging folds ``D = (f - 1) W0 + f ΔW`` into the weight (W0: the weight with no adapter merged, ΔW = s B A), which is
``f (W0 + ΔW)`` for one adapter and keeps merged output equal to unmerged output when several LoRA / DoRA adapters
are merged together. The f of each merged adapter is kept, so W0 is recovered exactly at any time:
W = W0 (1 + sum_D (f_j - 1)) + sum_L ΔW_j + sum_D f_j ΔW_j, and unmerging subtracts the same D.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import ConfigError

if TYPE_CHECKING:
    from peftkit.methods.lora.layers import LoraLinear

MAGNITUDE = "lora_magnitude_vector"  # peft's attribute and file key (``<module>.lora_magnitude_vector``)


def check_supported(layer: nn.Module, module_name: str) -> None:
    """ConfigError, before anything is created, for layer types DoRA is not implemented on."""
    if not getattr(layer, "supports_dora", False):
        raise ConfigError(
            f"use_dora=True is not supported on {module_name!r} ({type(layer).__name__} around "
            f"{type(layer.get_base_layer()).__name__}); peftkit's DoRA covers nn.Linear and GPT-2 Conv1D. Exclude the "
            "module (exclude_modules=[...]) or set use_dora=False."
        )


def is_dora(layer: nn.Module, name: str) -> bool:
    return name in getattr(layer, MAGNITUDE, {})


def _oriented(layer: LoraLinear, weight: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as (out, in) (GPT-2's Conv1D stores (in, out))."""
    return weight.T if layer.fan_in_fan_out else weight


def init_magnitude(layer: LoraLinear, name: str) -> None:
    """m = ||W + s B A||_c (B = 0 under the default init: ||W||_c), so DoRA starts at the base model's output."""
    if MAGNITUDE not in layer.adapter_param_names:  # per instance: plain-LoRA layers keep their two containers
        layer.adapter_param_names = (*layer.adapter_param_names, MAGNITUDE)
    a, _ = layer.factors(name)
    with torch.no_grad():
        w0 = _oriented(layer, layer.get_base_layer().weight).to(a.dtype)
        norm = torch.linalg.norm(w0 + _oriented(layer, layer.delta_weight(name)).to(a.dtype), dim=1)  # (out,)
    getattr(layer, MAGNITUDE)[name] = nn.Parameter(norm)


@torch.no_grad()
def weight_norm(layer: LoraLinear, name: str) -> torch.Tensor:
    """||W + s B A||_c (out,), detached, via the Gram identity; cached until a tensor it reads changes."""
    a, b = layer.factors(name)  # (r, in), (out, r)
    weight = layer.get_base_layer().weight
    scale = float(layer.scaling[name])
    key = (
        tuple((id(t), t._version) for t in (weight, a, b)),
        scale,
        torch.is_inference_mode_enabled(),
    )
    cached = layer._dora_cache.get(name)
    if cached is not None and cached[0] == key:
        return cached[1]
    w = _oriented(layer, weight).to(a.dtype)  # (out, in)
    w_sq = _row_sq(layer, w, (id(weight), weight._version, w.dtype, key[-1]))  # (out,) ||W_i||^2, W frozen
    cross = ((w @ a.T) * b).sum(1)  # (out,)  (W A^T)_i . B_i
    quad = ((b @ (a @ a.T)) * b).sum(1)  # (out,)  B_i (A A^T) B_i^T
    norm = (w_sq + 2 * scale * cross + scale * scale * quad).clamp_min(0).sqrt()
    layer._dora_cache[name] = (key, norm)
    return norm


def _row_sq(layer: LoraLinear, w: torch.Tensor, key: tuple) -> torch.Tensor:
    """||W_i||^2 (out,), cached until the base weight changes (merging, loading): one pass over W saved per step."""
    cached = layer._dora_cache.get("||W||^2")
    if cached is None or cached[0] != key:
        cached = (key, w.square().sum(1))
        layer._dora_cache["||W||^2"] = cached
    return cached[1]


def factor(layer: LoraLinear, name: str) -> torch.Tensor:
    """f = m / ||W + s B A||_c (out,): differentiable in m, the norm a constant (section 4.3). Without autograd
    (inference) f itself is cached, next to the norm it divides by."""
    m, norm = getattr(layer, MAGNITUDE)[name], weight_norm(layer, name)
    if torch.is_grad_enabled() and m.requires_grad:
        return m / norm
    cached = layer._dora_cache.get((name, "f"))  # (norm, m, m's version, f): the tensors held, so ids stay unique
    if cached is None or cached[0] is not norm or cached[1] is not m or cached[2] != m._version:
        cached = (norm, m, m._version, (m / norm).detach())
        layer._dora_cache[(name, "f")] = cached
    return cached[3]


# ---- forward ---------------------------------------------------------------------------------------------------
def uses_dora(layer: LoraLinear, names: list[str] | tuple[str, ...]) -> bool:
    return any(is_dora(layer, n) for n in names)


def forward(layer: LoraLinear, x: torch.Tensor, live: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
    """The layer's output with at least one DoRA adapter among ``live`` (or in the per-row routing)."""
    if layer.routing is not None and not layer.disabled:
        return _routed(layer, x, *args, **kwargs)
    weight_t = layer._plain_weight(x, *args, **kwargs)  # (in, out) or None
    dropout = layer.lora_dropout[live[0]]
    if len(live) == 1 and weight_t is not None and (isinstance(dropout, nn.Identity) or not layer.training):
        return _fused(layer, x, live[0], weight_t)
    return _general(layer, x, live, *args, **kwargs)


def _fused(layer: LoraLinear, x: torch.Tensor, name: str, weight_t: torch.Tensor) -> torch.Tensor:
    """One DoRA adapter, no dropout: f * (W x + s B A x) + b with the base GEMM accumulating into the low-rank term."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    h = lora_a(x2) * layer.scaling[name]  # (N, r)
    y = torch.mm(h, lora_b.weight.T).addmm_(x2, weight_t)  # (N, out): W x + s B A x
    f = factor(layer, name).to(y.dtype)  # (out,)
    bias = layer.base_layer.bias
    if y.requires_grad:  # autograd keeps y for m's gradient: out of place
        out = y * f if bias is None else torch.addcmul(bias, y, f)
    else:  # inference: scale the fresh GEMM output in place (no second (N, out) buffer)
        out = y.mul_(f) if bias is None else y.mul_(f).add_(bias)
    return out.reshape(*x.shape[:-1], -1)


def _general(layer: LoraLinear, x: torch.Tensor, live: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
    """Several adapters (LoRA and DoRA mixed), dropout or a base layer that must run itself:
    W x + b + sum_LoRA s B A x' + sum_DoRA ((f - 1) W x' + f s B A x')."""
    result = layer.base_layer(x, *args, **kwargs)  # (..., out)
    bias = layer.get_base_layer().bias
    wx = result if bias is None else result - bias  # W x
    weight = _oriented(layer, layer.get_base_layer().weight)  # (out, in)
    for name in live:
        dropout, lora_a, lora_b = layer.lora_dropout[name], layer.lora_A[name], layer.lora_B[name]
        xd = dropout(x.to(lora_a.weight.dtype))
        low = lora_b(lora_a(xd)) * layer.scaling[name]  # (..., out)
        if not is_dora(layer, name):
            result = result + low.to(result.dtype)
            continue
        base = wx if isinstance(dropout, nn.Identity) or not layer.training else F.linear(xd, weight.to(xd.dtype))
        f = factor(layer, name)
        result = result + ((f - 1) * base + f * low).to(result.dtype)
    return result


def _routed(layer: LoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Per-row adapters, DoRA and plain LoRA mixed: g_row * (W x + low-rank_row) + b with g = f for DoRA rows and 1
    otherwise; the norms are computed once per adapter, not per row group."""
    result = layer.base_layer(x, *args, **kwargs)  # (B, ..., out)
    bias = layer.get_base_layer().bias
    wx = result if bias is None else result - bias
    names = layer.routing.names
    g = wx.new_ones(len(names), wx.shape[-1])  # (n, out)
    for k, name in enumerate(names):
        if is_dora(layer, name):
            g[k] = factor(layer, name).to(g.dtype)
    rows = layer.routing.rows(x.shape[0])  # (B,)
    low = layer._routed(x, None).reshape(wx.shape).to(wx.dtype)  # (B, ..., out)
    scale = g[rows].reshape(x.shape[0], *([1] * (wx.dim() - 2)), -1)  # (B, 1.., out)
    out = (wx + low) * scale
    return out if bias is None else out + bias


# ---- merge -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def _unmerged_weight(layer: LoraLinear) -> torch.Tensor:
    """W0 (out, in): the base weight with every merged adapter taken out (see the module docstring)."""
    w = _oriented(layer, layer.get_base_layer().weight).float()
    den = torch.ones_like(w[:, 0])  # (out,)
    for name in layer.merged_adapters:
        delta = _oriented(layer, layer.delta_weight(name)).float()
        f = layer._dora_merged.get(name) if is_dora(layer, name) else None
        if f is None:
            w = w - delta
        else:
            w = w - f[:, None] * delta
            den = den + (f - 1)
    return w / den[:, None]


@torch.no_grad()
def merge_delta(layer: LoraLinear, name: str) -> torch.Tensor:
    """D = (f - 1) W0 + f ΔW (storage orientation), with f = m / ||W0 + ΔW||_c kept for the exact unmerge."""
    w0 = _unmerged_weight(layer)
    delta = _oriented(layer, layer.delta_weight(name)).float()
    f = getattr(layer, MAGNITUDE)[name].float() / torch.linalg.norm(w0 + delta, dim=1)
    layer._dora_merged[name] = f
    return _oriented(layer, (f - 1)[:, None] * w0 + f[:, None] * delta)


@torch.no_grad()
def unmerge_delta(layer: LoraLinear, name: str) -> torch.Tensor:
    """The D that ``merge_delta`` added for ``name`` (which must still be listed as merged), rebuilt from W0."""
    w0 = _unmerged_weight(layer)
    f = layer._dora_merged.pop(name)
    delta = _oriented(layer, layer.delta_weight(name)).float()
    return _oriented(layer, (f - 1)[:, None] * w0 + f[:, None] * delta)
