"""The causal-LM loss over the LM head in chunks of tokens, never holding the full logits.

loss = sum_t [lse(z_t) - z_t[y_t]] / n  over tokens t with y_t != ignore_index, z_t = W h_t (+ b), lse = logsumexp,
n the number of such tokens (or ``num_items_in_batch``, as transformers divides under gradient accumulation).
The usual way keeps log-softmax's (tokens, vocab) fp32 output for backward (and the logits too where they are
upcast from bf16): 400 MB each for SmolLM2's 49,152-token vocabulary at 4 x 512 tokens. Here z is computed a chunk
of rows at a time, never whole, with dL/dz_t = (softmax(z_t) - onehot(y_t)) / n: either in forward, keeping dL/dh
(the size of h) for backward to scale (the default: the fused linear cross-entropy of Liger, Hsu et al. 2024,
section 3.1), or keeping h and lse (tokens,) and recomputing each chunk's logits in backward (``recompute=True``).
Labels are shifted inside (position t predicts t + 1), as transformers' causal-LM loss does, so -100 from packing
or an assistant-only mask simply leaves tokens out.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import ConfigError

CHUNK_SIZE = 1024  # tokens per chunk: 1024 x 49,152 fp32 logits = 192 MB live at a time, never kept
# transformers model types whose logits are exactly lm_head(final hidden state): no softcapping, scaling or aux loss
PLAIN_HEAD_MODELS = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "olmo", "olmo2", "starcoder2", "smollm3", "gemma", "opt"}
)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(h, weight, bias).float()  # (rows, V), fp32 as transformers' loss upcasts


class ChunkedCausalLMLoss(torch.autograd.Function):
    """Sum over the rows of (lse(z) - z[y]) / n for z = h W^T + b computed ``chunk`` rows at a time.

    By default the gradients are computed in forward, chunk by chunk, while each chunk's logits are live, and kept
    (dL/dh is (N, H), the size of h; dL/dW only when W trains); backward scales them by the incoming gradient: no
    logits GEMM is done twice (Liger's way). ``recompute``: keep h and lse instead and recompute each chunk's logits
    in backward (one more GEMM over the vocabulary; nothing computed for a forward that never sees a backward)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int, ignore_index: int, divisor: float, recompute: bool) -> torch.Tensor:  # fmt: skip
        # hidden (N, H), weight (V, H), targets (N,) long
        need = ctx.needs_input_grad[:3]
        ctx.eager = not recompute and any(need)
        grads = _zeros(hidden, weight, bias, need) if ctx.eager else [None] * 3
        lse = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)  # (N,)
        total = hidden.new_zeros((), dtype=torch.float32)
        for rows, y, valid in _chunks(targets, chunk, ignore_index):
            z = _chunk_logits(hidden[rows], weight, bias)  # (c, V)
            lse[rows] = torch.logsumexp(z, dim=-1)
            picked = z.gather(1, y.clamp(min=0)[:, None])[:, 0]  # (c,)
            total += torch.where(valid, lse[rows] - picked, 0.0).sum()
            if ctx.eager:
                _accumulate(grads, hidden, weight, rows, z, lse[rows], y, valid, 1.0 / divisor)
        if ctx.eager:
            ctx.save_for_backward(_cast(grads[0], hidden), _cast(grads[1], weight), _cast(grads[2], bias))
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.ignore_index, ctx.divisor = chunk, ignore_index, divisor
        ctx.autocast = (hidden.device.type, torch.is_autocast_enabled(hidden.device.type))
        return total / divisor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.eager:
            grads = [None if g is None else g * grad.to(g.dtype) for g in ctx.saved_tensors]
        else:
            grads = _recomputed(ctx, grad / ctx.divisor)
        return *grads, None, None, None, None, None


def _chunks(targets: torch.Tensor, chunk: int, ignore_index: int) -> Any:
    """(rows slice, targets, kept mask) per chunk of ``chunk`` rows, chunks whose every target is ignored left out."""
    for start in range(0, targets.shape[0], chunk):
        rows = slice(start, start + chunk)
        y = targets[rows]
        valid = y != ignore_index
        if bool(valid.any()):
            yield rows, y, valid


def _zeros(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, need: tuple) -> list:
    """Gradient accumulators for (hidden, weight (fp32), bias (fp32)), None where no gradient is needed."""
    return [
        torch.zeros_like(hidden) if need[0] else None,
        torch.zeros_like(weight, dtype=torch.float32) if need[1] else None,
        torch.zeros_like(bias, dtype=torch.float32) if need[2] and bias is not None else None,
    ]


def _accumulate(
    grads: list,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    rows: slice,
    z: torch.Tensor,
    lse: torch.Tensor,
    y: torch.Tensor,
    valid: torch.Tensor,
    scale: float | torch.Tensor,
) -> None:
    """Add one chunk's share: dL/dz = (softmax(z) - onehot(y)) * scale on kept rows, 0 on ignored ones."""
    dz = torch.exp(z - lse[:, None])  # softmax (c, V)
    dz.scatter_add_(1, y.clamp(min=0)[:, None], -torch.ones_like(dz[:, :1]))
    dz.mul_((valid * scale)[:, None])
    grad_h, grad_w, grad_b = grads
    if grad_h is not None:
        grad_h[rows] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)  # (c, H)
    if grad_w is not None:
        grad_w += dz.T @ hidden[rows].float()  # (V, H)
    if grad_b is not None:
        grad_b += dz.sum(0)


def _recomputed(ctx: Any, scale: torch.Tensor) -> list:
    """The gradients from kept h and lse, each chunk's logits computed again (``recompute=True``)."""
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    grads = _zeros(hidden, weight, bias, ctx.needs_input_grad[:3])
    device, autocast = ctx.autocast
    for rows, y, valid in _chunks(targets, ctx.chunk, ctx.ignore_index):
        with torch.autocast(device, enabled=autocast) if autocast else contextlib.nullcontext():
            z = _chunk_logits(hidden[rows], weight, bias)  # (c, V)
        _accumulate(grads, hidden, weight, rows, z, lse[rows], y, valid, scale)
    return [_cast(grads[0], hidden), _cast(grads[1], weight), _cast(grads[2], bias)]


def _cast(grad: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None or like is None else grad.to(like.dtype)


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = CHUNK_SIZE,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift: bool = True,
    num_items_in_batch: int | torch.Tensor | None = None,
    recompute: bool = False,
) -> torch.Tensor:
    """transformers' causal-LM loss (mean cross-entropy of ``lm_head(hidden)`` against the next token) without the
    full logits; equal to it to float rounding, gradients to ``hidden``, ``lm_head_weight`` and ``bias`` included.

    hidden (B, T, H): the final hidden states (after the last norm); labels (B, T) with ``ignore_index`` where no
    loss is wanted; ``shift``: position t predicts labels[t + 1] (False: labels are already the targets).
    ``num_items_in_batch``: divide the summed loss by it instead of the count of kept tokens. ``recompute``: keep the
    hidden states and recompute each chunk's logits in backward instead of computing the gradients in forward (same
    memory, one more GEMM over the vocabulary; see :class:`ChunkedCausalLMLoss`)."""
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size!r} must be a positive number of tokens, e.g. {CHUNK_SIZE}.")
    if hidden.shape[:-1] != labels.shape:
        raise ConfigError(
            f"labels of shape {tuple(labels.shape)} do not match hidden states {tuple(hidden.shape)}: give one label "
            "per position (batch, tokens), -100 where no loss is wanted."
        )
    targets = labels.to(hidden.device)
    if shift:
        targets = F.pad(targets[..., 1:], (0, 1), value=ignore_index)  # position t predicts t + 1
    targets = targets.reshape(-1)
    if num_items_in_batch is None:
        divisor = float((targets != ignore_index).sum().clamp(min=1))
    else:
        divisor = float(num_items_in_batch)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (N, H): a view, the model's own storage
    return ChunkedCausalLMLoss.apply(flat, lm_head_weight, bias, targets, chunk_size, ignore_index, divisor, recompute)


# ---- a transformers causal LM and a batch ------------------------------------------------------------------------
class _Stop(Exception):
    """Raised by the LM head's pre-hook once the hidden states are in hand: the head itself never runs."""


def _plain_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(the transformers model, its nn.Linear LM head) when its logits are exactly lm_head(hidden), else None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    wrapped = any(k.__name__ in ("DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule")
                  for k in (*type(model).__mro__, *type(inner).__mro__))  # fmt: skip
    if wrapped or not hasattr(inner, "get_output_embeddings"):  # their forward must run whole
        return None
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    head = inner.get_output_embeddings()
    if model_type not in PLAIN_HEAD_MODELS or type(head) is not nn.Linear:  # a LoRA-adapted head: the usual loss
        return None
    return inner, head


def causal_lm_loss(model: nn.Module, batch: dict[str, Any], chunk_size: int = CHUNK_SIZE) -> torch.Tensor:
    """``model(**batch).loss`` of a transformers causal LM (or a PeftModel around one), computed with
    :func:`chunked_causal_lm_loss`: the model runs up to its LM head, whose input is taken instead of its logits.
    Falls back to ``model(**batch).loss`` where that would not be exact (a model type whose logits are scaled or
    softcapped, an adapted LM head, DDP / FSDP, a batch without ``labels``)."""
    found = _plain_head(model) if "labels" in batch else None
    if found is None:
        return model(**batch).loss
    _, head = found
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _Stop

    handle = head.register_forward_pre_hook(grab)
    try:
        model(**{k: v for k, v in batch.items() if k != "labels"})
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        return model(**batch).loss
    hidden, labels = captured[0], batch["labels"]
    if hidden.shape[1] > labels.shape[1]:  # prompt tuning's virtual tokens come first, with no loss
        pad = labels.new_full((labels.shape[0], hidden.shape[1] - labels.shape[1]), -100)
        labels = torch.cat([pad, labels], dim=1)
    return chunked_causal_lm_loss(hidden, head.weight, labels, chunk_size, bias=head.bias)
