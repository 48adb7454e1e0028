"""Packing: several encoded examples share one row of up to ``max_length`` tokens, without seeing each other.

The semantics of transformers' ``DataCollatorWithFlattening``: the position ids restart at 0 for every example,
and the first label of every example is IGNORE, so the last token of one example is never trained to predict
the first token of the next. Attention never crosses an example: the collated batch carries a 4-D additive mask
(B, 1, T, T), 0 where query q may read key k (same example, k <= q) and the float32 minimum elsewhere, which
eager and sdpa attention both add to their scores as given (a padding-free mask read from the position ids
alone is only honoured when no KV cache is built, so it would silently attend across examples under a model's
default ``use_cache=True``). Each example's logits, and so its per-token loss, are those of the example alone.

Rows are filled best-fit decreasing (longest example first, into the row with the least room that still fits
it), as TRL's ``bfd`` strategy; examples are never split.
"""

from __future__ import annotations

import bisect

import torch

IGNORE = -100


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Packed rows: ``input_ids``, ``labels``, ``position_ids`` and ``seq_lens`` (the examples' lengths)."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []  # example indices per row
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for i in order:
        n = len(examples[i]["input_ids"])
        at = bisect.bisect_left(room, (n, -1))
        if at < len(room):
            free, row = room.pop(at)
        else:
            free, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(room, (free - n, row))
    return [_join([examples[i] for i in members]) for members in rows]


def _join(examples: list[dict]) -> dict:
    ids, labels, positions = [], [], []
    for e in examples:
        ids += e["input_ids"]
        labels += [IGNORE, *e["labels"][1:]]
        positions += range(len(e["input_ids"]))
    lens = [len(e["input_ids"]) for e in examples]
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "seq_lens": lens}


def block_causal_mask(seq_lens: list[list[int]], width: int) -> torch.Tensor:
    """(B, 1, width, width) additive mask: 0 where a query may attend a key (same example, key not after the query),
    float32 min elsewhere. A row's padding tail is one more block, so no query row is fully masked."""
    segments = torch.stack([_segment_ids(lens, width) for lens in seq_lens])  # (B, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = torch.zeros(same.shape, dtype=torch.float32)
    mask.masked_fill_(~(same & causal), torch.finfo(torch.float32).min)
    return mask[:, None]


def _segment_ids(lens: list[int], width: int) -> torch.Tensor:
    tail = width - sum(lens)
    sizes = torch.tensor([*lens, tail] if tail else lens)
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes)


def collate_packed(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed rows as a batch: padded on the right (labels IGNORE, positions counting on from 0), with the mask."""
    width = max(len(r["input_ids"]) for r in rows)

    def padded(key: str, fill: int) -> torch.Tensor:
        return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows], dtype=torch.long)

    positions = torch.tensor(
        [r["position_ids"] + list(range(width - len(r["position_ids"]))) for r in rows], dtype=torch.long
    )
    return {
        "input_ids": padded("input_ids", pad_id),
        "labels": padded("labels", IGNORE),
        "position_ids": positions,
        "attention_mask": block_causal_mask([r["seq_lens"] for r in rows], width),
    }
