"""Per-row LoRA as a grouped matmul: rows laid out by adapter, each adapter's factors read once.

A layer stacks the factors of all its adapters, in the order they were added, as A (n, in, r) and B (n, r, out) with
the scaling folded in (``FactorStack``, built by ``LoraLayer.stacked_factors`` and cached until a factor changes):
the stack does not depend on which adapters a call routes, or in which order, so it survives between decoding steps
while rows join and leave. Rows i = 1..B use stack slots k_i (or none: the base model). Gathering each row's own
factors, A[k_i], moves B (in + out) r numbers per layer: at decoding shapes (T = 1 token per row) more than the
layer's own weight. Here the rows are sorted by adapter into m segments (the m adapters present) of
``width = max_k count_k`` slots (short segments padded with row 0, whose outputs are dropped):

    X_seg (m, width T, in) -> H = X_seg @ A_used (m, width T, r) -> Y_seg = H @ B_used (m, width T, out) -> each row

two batched matmuls over the used adapters' factors, whatever the number of rows: the segmented GEMM that Punica
(SGMV, Chen et al. 2023) and S-LoRA (Sheng et al. 2023) write as GPU kernels, here with ``torch.bmm``. The layout
(``Plan``) is built once per forward call and shared by every layer with the same adapters. Rows without an adapter
read a zero row. Rows that already sit in that layout (sorted by adapter, equal counts: one adapter for all rows,
or one row per adapter in order) are not moved at all. Otherwise moving them in and out costs m width T (in + out)
numbers against B r (in + out) for gathering each row's factors: when ``m width T > B r`` (several tokens per row,
as in a prefill, or padding from very uneven use) ``grouped_delta`` returns None and the caller gathers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from peftkit.core.layer import Routing


@dataclass
class FactorStack:
    """One layer's adapters stacked: ``slots`` name -> index along the first dimension of A (n, in, r),
    B (n, r, out) (scaling folded in) and the B biases s c (n, out) (None when no adapter has one)."""

    slots: dict[str, int]
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor | None
    _subset: tuple[tuple[int, ...], tuple] | None = field(default=None, repr=False)
    _slots_of: tuple[tuple[str, ...], tuple[int, ...]] = field(default=((), ()), repr=False)

    def slots_of(self, names: tuple[str, ...]) -> tuple[int, ...]:
        """Each routing name's slot (-1: not an adapter of this layer); the last answer is kept, since every call of
        a forward pass and consecutive decoding steps often route the same names."""
        seen, slots = self._slots_of
        if names is not seen and names != seen:
            slots = tuple(self.slots.get(name, -1) for name in names)
            self._slots_of = (names, slots)
        return slots

    def select(self, used: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A, B, c of the slots ``used`` (ascending): views when they are consecutive (every slot, or a running batch
        over adapters loaded one after another), else a copy, of which the last is kept (consecutive decoding steps
        route the same adapters)."""
        if used[-1] - used[0] + 1 == len(used):
            part = slice(used[0], used[-1] + 1)
            return self.a[part], self.b[part], None if self.c is None else self.c[part]
        if self._subset is None or self._subset[0] != used:
            index = torch.tensor(used, dtype=torch.long, device=self.a.device)
            c = None if self.c is None else self.c.index_select(0, index)
            self._subset = (used, (self.a.index_select(0, index), self.b.index_select(0, index), c))
        return self._subset[1]


@dataclass(frozen=True)
class Segments:
    """Where each row sits in the padded by-adapter layout."""

    width: int  # slots per adapter (the largest row count)
    gather: torch.Tensor  # (m * width,) the row in each slot; padding slots hold row 0
    back: torch.Tensor  # (B,) each row's slot; a row without an adapter points past the end (m * width)
    in_place: bool = False  # the rows already sit in this layout (sorted by adapter, equal counts): no copies


def segments(rows: torch.Tensor, n: int) -> Segments:
    """The layout for adapter indices ``rows`` (B,) in 0..n-1, or -1 for a row without an adapter."""
    return _segments(rows.tolist(), n, rows.device)


def _segments(kinds: list[int], n: int, device: torch.device) -> Segments:
    counts = [0] * n
    for k in kinds:
        if k >= 0:
            counts[k] += 1
    width = max(counts, default=0)
    gather, back, filled = [0] * (n * width), [n * width] * len(kinds), [0] * n
    for row, k in enumerate(kinds):
        if k >= 0:
            back[row] = k * width + filled[k]
            gather[back[row]] = row
            filled[k] += 1
    long = {"dtype": torch.long, "device": device}  # also when empty (no row uses these adapters)
    in_place = n * width == len(kinds) and back == list(range(len(kinds)))  # every slot filled, rows in order
    return Segments(width, torch.tensor(gather, **long), torch.tensor(back, **long), in_place)


@dataclass(frozen=True)
class Plan:
    """A forward call's layout for layers whose adapters sit at ``slots`` (one per routing name, -1: none)."""

    used: tuple[int, ...]  # stack slots present, ascending
    rows: torch.Tensor  # (B,) each row's index into ``used``, -1 for none
    segments: Segments
    adapted: bool  # every row has an adapter


def plan(routing: Routing, batch: int, slots: tuple[int, ...]) -> Plan:
    """Stack slots -> the used ones and the padded layout (``segments``) for this call's rows."""
    index = routing.rows(batch)  # (B,)
    per_name = [slots[k] for k in index.tolist()]  # each row's stack slot
    used = sorted({s for s in per_name if s >= 0})
    position = {s: j for j, s in enumerate(used)}
    kinds = [position.get(s, -1) for s in per_name]  # each row's index into ``used``
    rows = torch.tensor(kinds, dtype=torch.long, device=index.device)
    return Plan(tuple(used), rows, _segments(kinds, len(used), index.device), min(kinds, default=0) >= 0)


_LAST: list[tuple[Routing | None, int, tuple[int, ...], Plan | None]] = [(None, 0, (), None)]  # this call's plan


def _plan(routing: Routing, batch: int, slots: tuple[int, ...]) -> Plan:
    seen, batch_seen, slots_seen, cached = _LAST[0]
    if seen is routing and batch_seen == batch and slots_seen == slots and cached is not None:
        return cached
    cached = plan(routing, batch, slots)
    _LAST[0] = (routing, batch, slots, cached)  # one tuple swap: a concurrent call at worst recomputes its own
    return cached


def moving_rows_pays(slots: int, tokens: int, batch: int, r: int) -> bool:
    """Whether moving the rows into ``slots`` by-adapter slots and back ((in + out) T numbers a slot) moves fewer
    numbers than gathering each row's own factors ((in + out) r a row)."""
    return slots * tokens <= batch * r


def grouped_delta(
    routing: Routing, x: torch.Tensor, stack: FactorStack, bias: torch.Tensor | None
) -> tuple[torch.Tensor | None, Plan]:
    """(bias + s_k (B_k A_k x_i + c_k) for every row i of x (B, ..., in), as (B, T, out), the call's plan); the
    delta is None when the padded layout would cost more than gathering each row's factors (the caller gathers)."""
    slots = stack.slots_of(routing.names)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
    batch, tokens = flat.shape[:2]
    layout = _plan(routing, batch, slots)
    m, width, r = len(layout.used), layout.segments.width, stack.a.shape[2]
    if m == 0:  # no row routed to this layer's adapters
        y = flat.new_zeros(batch, tokens, stack.b.shape[2])
        return (y if bias is None else y + bias), layout
    in_place = layout.segments.in_place
    if not in_place and not moving_rows_pays(m * width, tokens, batch, r):
        return None, layout
    a, b, c = stack.select(layout.used)
    xs = flat if in_place else flat.index_select(0, layout.segments.gather)
    if m == 1:  # one adapter: plain matmuls (cheaper than a batch of one at decoding shapes)
        ys = torch.mm(torch.mm(xs.reshape(width * tokens, -1), a[0]), b[0])
    else:
        ys = torch.bmm(torch.bmm(xs.reshape(m, width * tokens, -1), a), b)
    ys = ys.reshape(m * width, tokens, -1)
    if c is not None:
        ys = ys + c.repeat_interleave(width, 0)[:, None, :]
    if in_place:
        y = ys  # (B, T, out)
    else:
        if not layout.adapted:
            ys = torch.cat([ys, ys.new_zeros(1, *ys.shape[1:])])  # the zero row of rows without an adapter
        y = ys.index_select(0, layout.segments.back)  # (B, T, out)
    return (y if bias is None else y.add_(bias)), layout


def gathered_delta(x: torch.Tensor, stack: FactorStack, layout: Plan, bias: torch.Tensor | None) -> torch.Tensor:
    """The same values with each row's own factors gathered (for very uneven use): (B, T, out)."""
    a, b, c = stack.select(layout.used)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
    rows = layout.rows.clamp(min=0)
    h = torch.bmm(flat, a[rows])  # (B, T, r)
    if not layout.adapted:
        h = h * (layout.rows >= 0).to(h.dtype)[:, None, None]  # rows without an adapter: 0
    if c is not None:
        c_rows = (c[rows] * (layout.rows >= 0).to(c.dtype)[:, None])[:, None, :]  # (B, 1, out)
        bias = c_rows if bias is None else bias + c_rows
    b_rows = b[rows]  # (B, r, out)
    return torch.bmm(h, b_rows) if bias is None else torch.baddbmm(bias, h, b_rows)
