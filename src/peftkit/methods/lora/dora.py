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

Embeddings (peft's layout): the outputs are the embedding dimensions, so m and the norm (over the vocabulary) have
one entry per dimension: h = f * (E[x] + s (A^T[x]) B^T). Convolutions: one per output channel, the kernel flattened
(m stored (1, out, 1, ...), peft's shape); grouped convolutions are refused (their LoRA update has no weight shape).

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
    from peftkit.methods.lora.layers import LoraEmbedding, LoraLayer, LoraLinear

MAGNITUDE = "lora_magnitude_vector"  # peft's attribute and file key (``<module>.lora_magnitude_vector``)


def check_supported(layer: LoraLayer, module_name: str) -> None:
    """ConfigError, before anything is created, for layer types DoRA is not implemented on."""
    groups = getattr(layer.get_base_layer(), "groups", 1)
    if layer.dora_layout is None or groups > 1:
        raise ConfigError(
            f"use_dora=True is not supported on {module_name!r} ({type(layer).__name__} around "
            f"{type(layer.get_base_layer()).__name__}{f', groups={groups}' if groups > 1 else ''}); peftkit's DoRA "
            "covers nn.Linear, GPT-2 Conv1D, nn.Embedding and ungrouped nn.Conv1d/2d/3d. Exclude the module "
            "(exclude_modules=[...]) or set use_dora=False."
        )


def is_dora(layer: nn.Module, name: str) -> bool:
    return name in getattr(layer, MAGNITUDE, {})


def _oriented(layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as (out, in): GPT-2's Conv1D stores (in, out), an embedding (num, dim) has one output
    per embedding dimension (as peft: the norm runs over the vocabulary), a convolution (out, in, *k) flattens."""
    if layer.dora_layout == "conv":
        return weight.flatten(1)
    if layer.dora_layout == "embedding" or layer.fan_in_fan_out:
        return weight.T
    return weight


def _stored(layer: LoraLayer, oriented: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_oriented``: an (out, in) tensor in the base weight's own layout."""
    if layer.dora_layout == "conv":
        return oriented.view(layer.get_base_layer().weight.shape)
    return oriented.T if layer.dora_layout == "embedding" or layer.fan_in_fan_out else oriented


def _flat_factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in) and B (out, r) as matrices, so that ΔW (out, in) = s B A for every layout."""
    a, b = (getattr(layer, attr)[name] for attr in layer.adapter_param_names[:2])
    a, b = (a if isinstance(a, nn.Parameter) else a.weight), (b if isinstance(b, nn.Parameter) else b.weight)
    return a.flatten(1), b.flatten(1)


def init_magnitude(layer: LoraLayer, name: str) -> None:
    """m = ||W + s B A||_c (B = 0 under the default init: ||W||_c), so DoRA starts at the base model's output.
    Stored (out,), or (1, out, 1, ...) on convolutions, peft's shapes."""
    if MAGNITUDE not in layer.adapter_param_names:  # per instance: plain-LoRA layers keep their two containers
        layer.adapter_param_names = (*layer.adapter_param_names, MAGNITUDE)
    a, _ = _flat_factors(layer, name)
    weight = layer.get_base_layer().weight
    with torch.no_grad():
        w0 = _oriented(layer, weight).to(a.dtype)
        norm = torch.linalg.norm(w0 + _oriented(layer, layer.delta_weight(name)).to(a.dtype), dim=1)  # (out,)
    if layer.dora_layout == "conv":
        norm = norm.view(1, -1, *([1] * (weight.dim() - 2)))
    getattr(layer, MAGNITUDE)[name] = nn.Parameter(norm)


@torch.no_grad()
def weight_norm(layer: LoraLayer, name: str) -> torch.Tensor:
    """||W + s B A||_c (out,), detached, via the Gram identity; cached until a tensor it reads changes."""
    a, b = _flat_factors(layer, name)  # (r, in), (out, r)
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


def _row_sq(layer: LoraLayer, w: torch.Tensor, key: tuple) -> torch.Tensor:
    """||W_i||^2 (out,), cached until the base weight changes (merging, loading): one pass over W saved per step."""
    cached = layer._dora_cache.get("||W||^2")
    if cached is None or cached[0] != key:
        cached = (key, w.square().sum(1))
        layer._dora_cache["||W||^2"] = cached
    return cached[1]


def factor(layer: LoraLayer, name: str) -> torch.Tensor:
    """f = m / ||W + s B A||_c (out,): differentiable in m, the norm a constant (section 4.3). Without autograd
    (inference) f itself is cached, next to the norm it divides by."""
    m, norm = getattr(layer, MAGNITUDE)[name], weight_norm(layer, name)
    if torch.is_grad_enabled() and m.requires_grad:
        return m.reshape(-1) / norm
    cached = layer._dora_cache.get((name, "f"))  # (norm, m, m's version, f): the tensors held, so ids stay unique
    if cached is None or cached[0] is not norm or cached[1] is not m or cached[2] != m._version:
        cached = (norm, m, m._version, (m.reshape(-1) / norm).detach())
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
    scale = layer.scaling[name]
    if torch.is_grad_enabled() and isinstance(scale, float) and lora_b.bias is None:  # training: DoRA's own backward
        f = factor(layer, name).to(x2.dtype)  # (out,)
        args = (x2, weight_t, layer.base_layer.bias, scale, lora_a.weight, lora_b.weight, f)
        return DoraLinearFunction.apply(*args).reshape(*x.shape[:-1], -1)
    h = lora_a(x2) * scale  # (N, r)
    y = torch.mm(h, lora_b.weight.T).addmm_(x2, weight_t)  # (N, out): W x + s B A x
    f = factor(layer, name).to(y.dtype)  # (out,)
    bias = layer.base_layer.bias
    if torch.is_grad_enabled() and (y.requires_grad or f.requires_grad):  # y kept for m's gradient: out of place
        out = ScaleRows.apply(y, f, bias)
    else:  # inference: scale the fresh GEMM output in place (no second (N, out) buffer)
        out = y.mul_(f) if bias is None else y.mul_(f).add_(bias)
    return out.reshape(*x.shape[:-1], -1)


class ScaleRows(torch.autograd.Function):
    """out (N, out) = y * f + b, f and b (out,): dL/dy = g * f, dL/df = sum_rows g * y, dL/db = sum_rows g, each
    only when asked. Autograd's own addcmul backward also multiplies both products by its scalar ``value`` (two more
    passes over (N, out), which made it most of DoRA's training overhead over LoRA)."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, f: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(y, f)
        return y * f if bias is None else torch.addcmul(bias, y, f)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, f = ctx.saved_tensors
        need_y, need_f, need_b = ctx.needs_input_grad
        return (g * f if need_y else None), ((g * y).sum(0) if need_f else None), (g.sum(0) if need_b else None)


class DoraLinearFunction(torch.autograd.Function):
    """out (N, out) = f * (x W^T + s (x A^T) B^T) + b for one DoRA adapter without dropout, W and b frozen. With
    g = dL/dout the gradients never form dL/dy = g * f (an (N, out) pass): f is folded into the small factors,

        dL/df = sum_rows g * y      dL/dB = f * (g^T h)      dL/dh = g (f * B)      dL/dA = s (dL/dh)^T x
        dL/dx = g (f * W) + s (dL/dh) A                     (h = s x A^T (N, r), y = x W^T + h B^T, kept)
    """

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, scale: float,
                a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:  # fmt: skip
        h = (x2 @ a.T) * scale  # (N, r)
        y = torch.mm(h, b.T).addmm_(x2, weight_t)  # (N, out)
        ctx.scale = scale
        ctx.save_for_backward(x2, weight_t, a, b, f, h, y)
        return y * f if bias is None else torch.addcmul(bias, y, f)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight_t, a, b, f, h, y = ctx.saved_tensors
        need_x, _, need_bias, _, need_a, need_b, need_f = ctx.needs_input_grad
        gh = g @ (b * f[:, None]) if need_a or need_x else None  # (N, r)
        grad_a = (gh.T @ x2) * ctx.scale if need_a else None  # (r, in)
        grad_b = (g.T @ h) * f[:, None] if need_b else None  # (out, r)
        grad_x = (g @ (weight_t * f).T).addmm_(gh, a, alpha=ctx.scale) if need_x else None  # (N, in)
        grad_f = (g * y).sum(0) if need_f else None
        grad_bias = g.sum(0) if need_bias else None
        return grad_x, None, grad_bias, None, grad_a, grad_b, grad_f


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
    low = layer._routed(x, None).reshape(wx.shape).to(wx.dtype)  # (B, ..., out)
    out = (wx + low) * _row_scales(layer, x.shape[0], wx)  # (B, 1.., out) scales
    return out if bias is None else out + bias


def forward_embedding(layer: LoraEmbedding, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """LoRA / DoRA on an embedding: E[x] + sum_LoRA s (A^T[x]) B^T + sum_DoRA ((f - 1) E[x] + f s (A^T[x]) B^T),
    f over the embedding dimensions (for one DoRA adapter: peft's f * (E[x] + s (A^T[x]) B^T))."""
    result = layer.base_layer(x, *args, **kwargs)  # (..., dim)
    if layer.routing is not None:
        if not layer.has_routed_adapters():
            return result
        scale = _row_scales(layer, x.shape[0], result)  # (B, 1.., dim)
        return (result + layer._routed(x).to(result.dtype)) * scale
    out = result
    for name in layer.live_adapters():
        a, b = layer.factors(name)  # (r, num), (dim, r)
        low = ((layer._lookup(x, a.T) @ b.T) * layer.scaling[name]).to(result.dtype)  # (..., dim)
        if is_dora(layer, name):
            f = factor(layer, name).to(result.dtype)
            low = (f - 1) * result + f * low
        out = out + low
    return out


def _row_scales(layer: LoraLayer, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Per-row g (B, 1.., out) for outputs whose last dimension is the output: f for DoRA rows, 1 otherwise."""
    names = layer.routing.names
    g = like.new_ones(len(names), like.shape[-1])  # (n, out)
    for k, name in enumerate(names):
        if is_dora(layer, name):
            g[k] = factor(layer, name).to(g.dtype)
    rows = layer.routing.rows(batch)  # (B,)
    return g[rows].reshape(batch, *([1] * (like.dim() - 2)), -1)


def forward_conv(layer: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """LoRA / DoRA on a convolution, the Linear formulas per output channel (W x: the base conv without its bias)."""
    result = layer.base_layer(x, *args, **kwargs)  # (B, out, ...)
    base = layer.get_base_layer()
    view = (1, -1, *([1] * (result.dim() - 2)))
    wx = result if base.bias is None else result - base.bias.view(view)
    if layer.routing is not None:
        groups = layer.routed_groups(x.shape[0])  # a loop over the adapters present, not over rows
        if groups:
            delta = torch.zeros_like(result)
            for name, idx in groups:
                delta[idx] = _conv_term(layer, name, x[idx], wx[idx], view).to(result.dtype)
            result = result + delta
        return result
    for name in layer.live_adapters():
        result = result + _conv_term(layer, name, x, wx, view).to(result.dtype)
    return result


def _conv_term(layer: LoraLayer, name: str, x: torch.Tensor, wx: torch.Tensor, view: tuple) -> torch.Tensor:
    """s B A x' (LoRA) or (f - 1) W x' + f s B A x' (DoRA), x' the dropped input (W x' = W x without dropout)."""
    dropout, lora_a = layer.lora_dropout[name], layer.lora_A[name]
    xd = dropout(x.to(lora_a.weight.dtype))
    low = layer.lora_B[name](lora_a(xd)) * layer.scaling[name]  # (B, out, ...)
    if not is_dora(layer, name):
        return low
    base = layer.get_base_layer()
    if not (isinstance(dropout, nn.Identity) or not layer.training):
        wx = base._conv_forward(xd, base.weight.to(xd.dtype), None)
    f = factor(layer, name).view(view)
    return (f - 1) * wx + f * low


# ---- merge -----------------------------------------------------------------------------------------------------
@torch.no_grad()
def _unmerged_weight(layer: LoraLayer) -> torch.Tensor:
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
def merge_delta(layer: LoraLayer, name: str) -> torch.Tensor:
    """D = (f - 1) W0 + f ΔW (storage orientation), with f = m / ||W0 + ΔW||_c kept for the exact unmerge."""
    w0 = _unmerged_weight(layer)
    delta = _oriented(layer, layer.delta_weight(name)).float()
    f = getattr(layer, MAGNITUDE)[name].reshape(-1).float() / torch.linalg.norm(w0 + delta, dim=1)
    layer._dora_merged[name] = f
    return _stored(layer, (f - 1)[:, None] * w0 + f[:, None] * delta)


@torch.no_grad()
def unmerge_delta(layer: LoraLayer, name: str) -> torch.Tensor:
    """The D that ``merge_delta`` added for ``name`` (which must still be listed as merged), rebuilt from W0."""
    w0 = _unmerged_weight(layer)
    f = layer._dora_merged.pop(name)
    delta = _oriented(layer, layer.delta_weight(name)).float()
    return _stored(layer, (f - 1)[:, None] * w0 + f[:, None] * delta)
