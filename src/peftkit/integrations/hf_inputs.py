"""What prompt tuning and prefix tuning need to know about a Hugging Face model's inputs.

Both methods add virtual tokens in front of every row. With per-row ``adapter_names`` rows may use different
adapters, so different numbers of virtual tokens: rows are then left-padded to the longest, and the padding
is masked out, which makes each row's result equal to running it alone.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.errors import ConfigError


def model_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        raise ConfigError(
            f"{type(model).__name__} has no .config: prompt and prefix tuning need a Hugging Face transformers "
            "model (they read its embedding size, layers and heads). Use a wrap method such as LoRA instead."
        )
    return getattr(config, "text_config", None) or config


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def accepts(model: nn.Module, argument: str) -> bool:
    """Whether ``model.forward`` takes ``argument`` by name."""
    return argument in inspect.signature(model.forward).parameters


def input_embedding_name(model: nn.Module) -> str:
    """Dotted path of the word-embedding module (``model.get_input_embeddings()``)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        if module is embedding and name:
            return name
    raise ConfigError(
        f"{type(model).__name__} exposes no word-embedding module (get_input_embeddings()); prompt and prefix "
        "tuning attach their tables next to it. Use a transformers model with token embeddings."
    )


def first_input(call_args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Move a positional first argument (input_ids) into ``kwargs`` so it can be rewritten by name."""
    if call_args and isinstance(call_args[0], torch.Tensor) and "input_ids" not in kwargs:
        kwargs["input_ids"] = call_args[0]
        call_args = call_args[1:]
    return call_args, kwargs


def cache_length(kwargs: dict) -> int:
    """Tokens already in the KV cache passed to this call (0 for none or an empty one)."""
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


def row_groups(layer: AdapterLayer, batch: int) -> tuple[list[list[str]], torch.Tensor | None]:
    """Which of ``layer``'s adapters apply to which rows.

    Returns the groups (each a list of adapter names whose virtual tokens are concatenated, in order) and the
    group index of each row, or None when one group (the active adapters) serves every row.
    """
    if layer.disabled:
        return [], None
    if layer.routing is None:
        live = layer.live_adapters()
        return ([live] if live else []), None
    own = set(layer.adapter_names)
    return [[name] if name in own else [] for name in layer.routing.names], layer.routing.rows(batch)


def left_pad(pieces: list[torch.Tensor], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack tensors whose size along ``dim`` differs, left-padded with zeros to the longest.

    Returns the stack (n, ...) and the lengths (n,).
    """
    longest = max(p.shape[dim] for p in pieces)
    padded = []
    for piece in pieces:
        shape = list(piece.shape)
        shape[dim] = longest - piece.shape[dim]
        padded.append(torch.cat([piece.new_zeros(shape), piece], dim=dim))
    lengths = torch.tensor([p.shape[dim] for p in pieces], device=pieces[0].device)
    return torch.stack(padded), lengths


def valid_columns(lengths: torch.Tensor, longest: int) -> torch.Tensor:
    """(n, longest) bool: True on the last ``lengths[i]`` columns (the row's own virtual tokens)."""
    return torch.arange(longest, device=lengths.device) >= (longest - lengths)[:, None]


def for_rows(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """A per-group-row tensor (n, ...) for a batch of ``batch`` rows: broadcast one row, or repeat each row
    ``batch / n`` times (beam search and sampling repeat every input row)."""
    n = tensor.shape[0]
    if n == batch:
        return tensor
    if n == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    return tensor.repeat_interleave(batch // n, dim=0)
