"""The causal-LM loss over the LM head in chunks of tokens, never holding the full logits.

loss = sum_t [lse(z_t) - z_t[y_t]] / n  over tokens t with y_t != ignore_index, z_t = W h_t (+ b), lse = logsumexp,
n the number of such tokens (or ``num_items_in_batch``, as transformers divides under gradient accumulation).
The usual way keeps the (tokens, vocab) fp32 logits and log-softmax's output of the same size for backward: 400 MB
each for SmolLM2's 49,152-token vocabulary at 4 x 512 tokens. Here forward computes z a chunk of rows at a time and
keeps only h (a view of the hidden states the model gives), lse (tokens,) and the targets; backward recomputes each
chunk's logits and uses dL/dz_t = (softmax(z_t) - onehot(y_t)) / n (the fused linear cross-entropy of Liger, Hsu et
al. 2024, section 3.1). Labels are shifted inside (position t predicts t + 1), as transformers' causal-LM loss does,
so -100 from packing or an assistant-only mask simply leaves tokens out.
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
    """Sum over the rows of (lse(z) - z[y]) / n for z = h W^T + b computed ``chunk`` rows at a time."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, ignore_index: int, divisor: float) -> torch.Tensor:  # fmt: skip
        # hidden (N, H), weight (V, H), targets (N,) long
        lse = hidden.new_zeros(hidden.shape[0], dtype=torch.float32)  # (N,)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            y = targets[rows]
            valid = y != ignore_index
            if not bool(valid.any()):
                continue
            z = _chunk_logits(hidden[rows], weight, bias)  # (c, V)
            lse[rows] = torch.logsumexp(z, dim=-1)
            picked = z.gather(1, y.clamp(min=0)[:, None])[:, 0]  # (c,)
            total += torch.where(valid, lse[rows] - picked, 0.0).sum()
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.ignore_index, ctx.divisor = chunk, ignore_index, divisor
        ctx.autocast = (hidden.device.type, torch.is_autocast_enabled(hidden.device.type))
        return total / divisor

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        scale = grad / ctx.divisor
        device, autocast = ctx.autocast
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            y = targets[rows]
            valid = y != ctx.ignore_index
            if not bool(valid.any()):
                continue
            h = hidden[rows]
            with torch.autocast(device, enabled=autocast) if autocast else contextlib.nullcontext():
                z = _chunk_logits(h, weight, bias)  # (c, V)
            dz = torch.exp(z - lse[rows, None])  # softmax (c, V)
            dz.scatter_add_(1, y.clamp(min=0)[:, None], -torch.ones_like(dz[:, :1]))
            dz.mul_((valid * scale)[:, None])  # ignored rows: 0
            if grad_h is not None:
                grad_h[rows] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w += dz.T @ h.float()
            if grad_b is not None:
                grad_b += dz.sum(0)
        return grad_h, _cast(grad_w, weight), _cast(grad_b, bias), None, None, None, None


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
) -> torch.Tensor:
    """transformers' causal-LM loss (mean cross-entropy of ``lm_head(hidden)`` against the next token) without the
    full logits; equal to it to float rounding, gradients to ``hidden``, ``lm_head_weight`` and ``bias`` included.

    hidden (B, T, H): the final hidden states (after the last norm); labels (B, T) with ``ignore_index`` where no
    loss is wanted; ``shift``: position t predicts labels[t + 1] (False: labels are already the targets).
    ``num_items_in_batch``: divide the summed loss by it instead of the count of kept tokens."""
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
    return ChunkedCausalLMLoss.apply(flat, lm_head_weight, bias, targets, chunk_size, ignore_index, divisor)


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
