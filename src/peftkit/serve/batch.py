"""The running batch of continuous batching: rows join and leave between decoding steps.

Every row holds one sequence: its own adapter (per-row routing, ``PeftModel(..., adapter_names=[...])``), its own
positions and its own slice of the key/value cache. The cache of the whole batch is one transformers
``DynamicCache`` whose tensors are (B, kv_heads, T, head_dim), left-padded: row i's real entries are its last
``lengths[i]`` columns and ``mask`` (B, T) marks them with 1. Padding columns are masked out of attention, and each
row's rotary positions come from its own length, so a row computes what it would compute alone (Yu et al. 2022,
"Orca", section 3: iteration-level scheduling; here without selective batching, by padding).

- join: new sequences run their prompts as one left-padded prefill, then their caches are padded to a common width
  and stacked under the running rows;
- step: one token per row, one forward pass for all rows and all adapters;
- leave: finished rows are dropped with ``index_select`` and columns that became padding in every row are trimmed.

Between joins and leaves the cache grows in place: its tensors are the first columns of buffers with spare columns
(``Columns``), and a step writes its one new column into them. transformers' ``DynamicLayer`` concatenates instead,
and building a ``DynamicCache`` from tensors concatenates once more: two copies of the whole cache per token.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


@dataclass
class Buffers:
    """Preallocated (B, H, capacity, D) keys and values, of which the first ``filled`` columns hold entries."""

    keys: torch.Tensor
    values: torch.Tensor
    filled: int


class Columns(DynamicLayer):
    """A cache layer whose keys / values (B, H, T, D) are the first T columns of ``buffers`` (or plain tensors,
    ``buffers`` None): an update writes its columns into the spare ones, in place. Buffers are (re)allocated, with
    room for 64 more columns or half as many again, when there is no room or when another cache already wrote past
    these T columns (two caches grown from one: each keeps its own entries)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, buffers: Buffers | None) -> None:
        super().__init__()
        self.keys, self.values, self.buffers = keys, values, buffers
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        width, extra = self.keys.shape[-2], key_states.shape[-2]
        room = self.buffers
        if room is None or room.filled != width or room.keys.shape[-2] < width + extra:
            capacity = width + extra + max(64, (width + extra) // 2)
            room = self.buffers = Buffers(_grown(self.keys, capacity), _grown(self.values, capacity), width)
        room.keys[:, :, width : width + extra].copy_(key_states)
        room.values[:, :, width : width + extra].copy_(value_states)
        room.filled = width + extra
        self.keys, self.values = room.keys[:, :, : width + extra], room.values[:, :, : width + extra]
        return self.keys, self.values


def _grown(t: torch.Tensor, capacity: int) -> torch.Tensor:
    """A (B, H, capacity, D) buffer whose first columns are ``t`` (B, H, T, D)."""
    out = t.new_empty(*t.shape[:2], capacity, t.shape[3])
    out[:, :, : t.shape[2]].copy_(t)
    return out


@dataclass
class KVBatch:
    """Left-padded key/value cache of the running rows, with its attention mask and each row's length."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer (B, H, T, D) k, v
    mask: torch.Tensor | None = None  # (B, T) long, 1 on real entries
    lengths: torch.Tensor | None = None  # (B,) long, real entries per row (= the next token's position)
    buffers: list[Buffers | None] | None = None  # per layer: what ``layers`` are the first columns of, if anything

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    @staticmethod
    def from_cache(cache: DynamicCache, mask: torch.Tensor) -> KVBatch:
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        return KVBatch(layers, mask, mask.sum(-1), [getattr(layer, "buffers", None) for layer in cache.layers])

    def to_cache(self) -> DynamicCache:
        """A DynamicCache over these tensors, without a copy; the next forward writes one column into each layer."""
        cache = DynamicCache()
        buffers = self.buffers or [None] * len(self.layers)
        cache.layers = [Columns(k, v, b) for (k, v), b in zip(self.layers, buffers)]
        return cache

    def widen(self, width: int) -> KVBatch:
        """The same rows, left-padded with masked columns to ``width``."""
        extra = width - self.width
        if extra <= 0:
            return self
        layers = [(F.pad(k, (0, 0, extra, 0)), F.pad(v, (0, 0, extra, 0))) for k, v in self.layers]
        return KVBatch(layers, F.pad(self.mask, (extra, 0)), self.lengths)

    def stack(self, other: KVBatch) -> KVBatch:
        """These rows, then ``other``'s, at the wider of the two widths."""
        if self.size == 0:
            return other
        width = max(self.width, other.width)
        a, b = self.widen(width), other.widen(width)
        layers = [(torch.cat([ka, kb]), torch.cat([va, vb])) for (ka, va), (kb, vb) in zip(a.layers, b.layers)]
        return KVBatch(layers, torch.cat([a.mask, b.mask]), torch.cat([a.lengths, b.lengths]))

    def keep(self, rows: Seq[int]) -> KVBatch:
        """Only ``rows`` (in that order), without the leading columns that are padding in every one of them."""
        if not rows:
            return KVBatch()
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(self.width - mask.sum(-1).max())  # columns before this are padding in every kept row
        layers = [
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in self.layers
        ]
        return KVBatch(layers, mask[:, start:], self.lengths.index_select(0, index))


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T), prompts aligned to the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt) :] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Each real token's position in its own row (0, 1, ...); padding gets 0. mask: (B, T) -> (B, T)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def prefill(
    model: Any, prompts: list[list[int]], adapters: list[str] | None, pad_id: int
) -> tuple[torch.Tensor, KVBatch]:
    """Run the prompts of new rows in one pass. Returns the last position's logits (B, V) and their cache."""
    device = model_device(model)
    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    cache = DynamicCache()
    logits = _forward(model, ids, mask, positions(mask), cache, adapters)
    return logits, KVBatch.from_cache(cache, mask)


@torch.no_grad()
def decode_step(
    model: Any, batch: KVBatch, tokens: list[int], adapters: list[str] | None
) -> tuple[torch.Tensor, KVBatch]:
    """One token for every running row: (B, V) logits of the next token and the cache one column wider."""
    device = batch.mask.device
    ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]  # (B, 1)
    mask = F.pad(batch.mask, (0, 1), value=1)  # (B, T + 1)
    cache = batch.to_cache()
    logits = _forward(model, ids, mask, batch.lengths[:, None], cache, adapters)
    return logits, KVBatch.from_cache(cache, mask)


def _forward(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
    cache: DynamicCache,
    adapters: list[str] | None,
) -> torch.Tensor:
    """The last position's logits (B, V); ``cache`` grows in place by ids' width. ``adapters``: one name per row
    (peftkit's per-row routing), or None for a plain model without adapters."""
    params = inspect.signature(model.forward).parameters
    options = {"cache" if "cache" in params else "past_key_values": cache}  # transformers >= 5.2x: ``cache``
    if "logits_to_keep" in params:
        options["logits_to_keep"] = 1  # the last position only: no (B, T, V) logits in the prefill
    if adapters is not None:
        options["adapter_names"] = list(adapters)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **options)
    return out.logits[:, -1, :]


def model_device(model: Any) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))
