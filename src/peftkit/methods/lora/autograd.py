"""LoRA's own backward on nn.Linear / GPT-2 Conv1D: keep for backward only what the gradients need.

For h = W x + b + sum_a s_a (B_a A_a d_a(x) + c_a), with d_a adapter a's dropout (x * m_a / (1 - p), m_a ~ Bernoulli),
the gradients are (g = dL/dh, rows of N tokens)

    dL/dB_a = s_a g^T (A_a d_a(x))        needs A_a d_a(x): (N, r)
    dL/dA_a = s_a (g B_a)^T d_a(x)         needs x and m_a
    dL/dx   = g W + sum_a s_a ((g B_a) A_a) * m_a / (1 - p)
    dL/dc_a = s_a sum_rows g,  dL/db = sum_rows g

Autograd, left to itself, keeps per adapter a full-size dropped copy d_a(x) and the scaled mask m_a / (1 - p) (two
more tensors the size of x, each adapter, each layer: q, k and v each keep their own copy of one input). Here the
layer keeps x itself (one storage, shared by every adapter and by sibling layers reading the same tensor), the (N, r)
products, and each mask as bits (1/32 of an fp32 x); d_a(x) is rebuilt in backward. The dropout draw is
``empty_like(x).bernoulli_(1 - p)``, the draw ``F.dropout`` makes on CPU, so a seeded run equals the plain path.

Option ``recompute_inputs`` (off by default): when x is an elementwise product of tensors autograd keeps anyway
(Llama's down_proj input act(gate) * up; RMSNorm's output w * (h * rsqrt(var))), keep those factors and recompute x
in backward instead of keeping x (see ``input_recipe``). Not under torch.compile or activation checkpointing.

Switches: :func:`set_lora_backward` / :func:`lora_backward` (a context manager). ``fused=False`` restores plain
autograd (the exact same numbers, more memory).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_SETTINGS = {"fused": True, "recompute_inputs": False}


def set_lora_backward(*, fused: bool | None = None, recompute_inputs: bool | None = None) -> None:
    """Process-wide: ``fused`` (default True) uses this module's backward for LoRA on Linear / Conv1D;
    ``recompute_inputs`` (default False) also recomputes cheap layer inputs in backward instead of keeping them."""
    if fused is not None:
        _SETTINGS["fused"] = bool(fused)
    if recompute_inputs is not None:
        _SETTINGS["recompute_inputs"] = bool(recompute_inputs)


@contextmanager
def lora_backward(*, fused: bool | None = None, recompute_inputs: bool | None = None) -> Iterator[None]:
    """:func:`set_lora_backward` for the calls inside the ``with`` block, then the previous settings again."""
    before = dict(_SETTINGS)
    set_lora_backward(fused=fused, recompute_inputs=recompute_inputs)
    try:
        yield
    finally:
        _SETTINGS.update(before)


def lora_backward_settings() -> dict[str, bool]:
    """The current switches (a copy)."""
    return dict(_SETTINGS)


# ---- dropout masks as bits ------------------------------------------------------------------------------------
_GATHER = 0x0102040810204080  # times 8 bytes of 0/1 (an int64): their bits land in the top byte, element i in bit i
_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 tensor -> uint8 bits, 8 elements a byte, element i of each 8 in bit i (padded at the end)."""
    flat = mask.reshape(-1)
    flat = flat if flat.dtype == torch.bool else flat != 0
    if flat.numel() % 8:
        flat = F.pad(flat, (0, -flat.numel() % 8))
    return ((flat.view(-1, 8).view(torch.int64)[:, 0] * _GATHER) >> 56).to(torch.uint8)


def _draw(like: torch.Tensor, p: float) -> torch.Tensor:
    """A dropout mask for ``like`` drawn straight into bytes and packed into bits (``_pack``'s layout).

    ``bernoulli_(1 - p)`` on a bool buffer draws the same stream as on ``empty_like(like)`` (F.dropout's CPU draw),
    writes a quarter of the bytes, and its bytes pack with one multiply per 8 elements."""
    n = like.numel()
    keep = torch.zeros(n + (-n % 8), dtype=torch.bool, device=like.device)
    keep[:n].bernoulli_(1 - p)
    return _pack(keep)  # already bool and a multiple of 8 long: no copy


def _mask(bits: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The 0/1 mask in ``like``'s shape and dtype from ``_pack``'s bits: one lookup of 8 values per byte."""
    key = (like.dtype, like.device)
    if key not in _TABLES:  # row v: the 8 bits of v as 0/1
        _TABLES[key] = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(like.dtype).to(like.device)
    return F.embedding(bits.long(), _TABLES[key]).reshape(-1)[: like.numel()].view(like.shape)


def _dropout_p(module: nn.Module) -> float | None:
    """The dropout probability this call applies (0 in eval mode or for Identity); None for any other module."""
    if isinstance(module, nn.Identity):
        return 0.0
    if type(module) is nn.Dropout:
        return module.p if module.training else 0.0
    return None


# ---- recomputable inputs ----------------------------------------------------------------------------------------
def _saved(node: Any, attr: str) -> torch.Tensor | None:
    try:
        value = getattr(node, attr)
    except RuntimeError:  # freed, or saved under hooks that cannot give it back now
        return None
    return value if isinstance(value, torch.Tensor) else None


def _mul_recipe(node: Any, depth: int) -> tuple | None:
    """x = a * b from a MulBackward0 node: each operand kept by the node, or itself such a product (depth-limited)."""
    if node is None or type(node).__name__ != "MulBackward0" or depth > 2:
        return None
    parts = []
    for k, attr in enumerate(("_saved_self", "_saved_other")):
        operand = _saved(node, attr)
        if operand is None:
            inner = node.next_functions[k][0]
            operand = _mul_recipe(inner, depth + 1)
            if operand is None:
                return None
        parts.append(operand)
    return tuple(parts)


def _checkpointing() -> bool:
    """Whether saved-tensor hooks of torch.utils.checkpoint (or torch's own offloading) are active."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return hooks is not None and getattr(hooks[0], "__module__", "").startswith("torch.")


def input_recipe(x: torch.Tensor) -> tuple | None:
    """How to rebuild ``x`` from tensors autograd keeps anyway: a nested (a, b) tuple of products, or None.

    Only elementwise products of the same dtype qualify (a cast or any other op in between stops the search), so the
    rebuilt x equals the forward's bit for bit."""
    if not _SETTINGS["recompute_inputs"] or torch.compiler.is_compiling() or _checkpointing():
        return None
    return _mul_recipe(x.grad_fn, 0)


def _leaves(recipe: tuple | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(recipe, torch.Tensor):
        return [recipe]
    return _leaves(recipe[0]) + _leaves(recipe[1])


def _skeleton(recipe: tuple | torch.Tensor) -> tuple | None:
    """The recipe's structure with its tensors left out (the tensors go through ``save_for_backward``)."""
    return None if isinstance(recipe, torch.Tensor) else (_skeleton(recipe[0]), _skeleton(recipe[1]))


def _rebuild(skeleton: tuple | None, leaves: Iterator[torch.Tensor]) -> torch.Tensor:
    if skeleton is None:
        return next(leaves)
    return _rebuild(skeleton[0], leaves) * _rebuild(skeleton[1], leaves)


# ---- the function ---------------------------------------------------------------------------------------------
class LoraLinearFunction(torch.autograd.Function):
    """h (N, out) = x2 W^T + b + sum_a s_a (B_a A_a d_a(x2) + c_a); see the module docstring for what it keeps.

    Inputs: x2 (N, in), weight_t (in, out) (frozen) and bias (out,) or None for both (then the caller runs the base
    layer and this function gives the low-rank terms alone), plan: per adapter (s_a, p_a), then the flat list
    A_1 (r, in), B_1 (out, r), c_1 (out,) or None, A_2, ...; ``recipe``: ``input_recipe(x)`` or None. The low-rank
    terms are computed in the factors' dtype (fp32 factors on a bf16 base: x cast, as the plain path does)."""

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, plan: tuple,
                recipe: tuple | None, *factors: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        acc, keep = bias, []
        xl = x2.to(factors[0].dtype)  # x2 itself unless the factors' dtype differs (then a temporary, not kept)
        for k, (s, p) in enumerate(plan):
            a, b, c = factors[3 * k : 3 * k + 3]
            bits = None
            if p > 0:  # A (x m / (1 - p)) s = (A (x m)) s / (1 - p): the scale goes on the (N, r) side
                bits = _draw(xl, p)
                h = F.linear(xl * _mask(bits, xl), a) * (s / (1 - p))  # (N, r)
            else:
                h = F.linear(xl, a) * s  # (N, r)
            acc = torch.mm(h, b.T) if acc is None else torch.addmm(acc, h, b.T)  # (N, out)
            if c is not None:
                acc = acc + c * s
            keep += [h, bits]
        out = acc if weight_t is None else acc.addmm_(x2, weight_t)  # acc is fresh: the base GEMM accumulates in it
        ctx.plan, ctx.x_shape = plan, x2.shape
        ctx.recipe = None if recipe is None else _skeleton(recipe)
        source = _leaves(recipe) if recipe is not None else [x2]
        ctx.n_source = len(source)
        ctx.save_for_backward(*source, weight_t, *factors, *keep)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        source, weight_t = saved[: ctx.n_source], saved[ctx.n_source]
        n = len(ctx.plan)
        factors, keep = saved[ctx.n_source + 1 : ctx.n_source + 1 + 3 * n], saved[ctx.n_source + 1 + 3 * n :]
        x2 = _input(ctx, source)
        xl = x2.to(factors[0].dtype)
        need = ctx.needs_input_grad
        grad_x = g @ weight_t.T if need[0] and weight_t is not None else None  # (N, in)
        grads: list[torch.Tensor | None] = []
        for k, (s, p) in enumerate(ctx.plan):
            a, b, c = factors[3 * k : 3 * k + 3]
            h, bits = keep[2 * k], keep[2 * k + 1]
            need_a, need_b, need_c = need[5 + 3 * k : 8 + 3 * k]
            noise = _mask(bits, xl) if p > 0 and (need_a or need[0]) else None  # m_a, 0/1
            gh = (g @ b) * (s / (1 - p)) if need_a or need[0] else None  # (N, r): dL/d(A_a (x m_a))
            grad_a = gh.T @ (xl * noise if noise is not None else xl) if need_a else None  # (r, in)
            grad_b = g.T @ h if need_b else None  # (out, r)
            grad_c = g.sum(0) * s if need_c and c is not None else None
            if need[0]:
                back = gh @ a  # (N, in)
                back = back * noise if noise is not None else back
                grad_x = back if grad_x is None else grad_x.add_(back)
            grads += [grad_a, grad_b, grad_c]
        grad_bias = g.sum(0) if need[2] else None
        return None if grad_x is None else grad_x.to(x2.dtype), None, grad_bias, None, None, *grads


def _input(ctx: Any, source: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """x2 as the forward saw it: kept, or rebuilt from the recipe's kept factors."""
    if ctx.recipe is None:
        return source[0]
    return _rebuild(ctx.recipe, iter(source)).reshape(ctx.x_shape)


def plan_for(layer: nn.Module, names: list[str]) -> tuple | None:
    """Per adapter (s_a, p_a) when every adapter's dropout is a plain nn.Dropout / Identity and its scale a number
    (compiled hot-swapping keeps it as a tensor: the plain path), else None."""
    plan = []
    for name in names:
        p, s = _dropout_p(layer.lora_dropout[name]), layer.scaling[name]
        if p is None or isinstance(s, torch.Tensor):
            return None
        plan.append((s, p))
    return tuple(plan)


def applies(x: torch.Tensor, weight_t: torch.Tensor | None) -> bool:
    """Whether the fused path is exact and worth it here: on, gradients recorded, no autocast (its casts would not
    reach backward), a frozen base weight."""
    if not _SETTINGS["fused"] or not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        return False
    return weight_t is None or not weight_t.requires_grad


def lora_linear(
    layer: nn.Module, x: torch.Tensor, weight_t: torch.Tensor | None, names: list[str]
) -> torch.Tensor | None:
    """``layer``'s output for ``x`` (..., in) through :class:`LoraLinearFunction` (``weight_t`` None: its low-rank
    terms alone, in the factors' dtype, for a base layer the caller runs), or None where it does not apply (then the
    caller takes plain autograd's path)."""
    plan = plan_for(layer, names) if applies(x, weight_t) else None
    if plan is None:
        return None
    factors: list[torch.Tensor | None] = []
    for name in names:
        lora_b = layer.lora_B[name]
        factors += [layer.lora_A[name].weight, lora_b.weight, lora_b.bias]
    if len({f.dtype for f in factors if f is not None}) > 1:  # adapters in different dtypes: the plain path
        return None
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    recipe = input_recipe(x) if any(f.requires_grad for f in factors[::3]) else None
    bias = None if weight_t is None else layer.base_layer.bias
    out = LoraLinearFunction.apply(x2, weight_t, bias, plan, recipe, *factors)  # (N, out)
    return out.reshape(*x.shape[:-1], -1)
