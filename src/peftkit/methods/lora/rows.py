"""Per-row LoRA as a grouped matmul: rows laid out by adapter, each adapter's factors read once.

Rows i = 1..B use adapters k_i among n; the factors are stacked as A (n, in, r) and B (n, r, out) with the scaling
folded in (``LoraLayer.stacked_factors``). Gathering each row's own factors, A[k_i], moves B (in + out) r numbers
per layer: at decoding shapes (T = 1 token per row) more than the layer's own weight, which made a routed decoding
step two to three times slower than the base model's. Here the rows are sorted by adapter into n segments of
``width = max_k count_k`` slots (short segments padded with row 0, whose outputs are dropped):

    X_seg (n, width T, in) -> H = X_seg @ A (n, width T, r) -> Y_seg = H @ B (n, width T, out) -> each row's slot

two batched matmuls over the stacked factors, whatever the number of rows: the segmented GEMM that Punica (SGMV,
Chen et al. 2023) and S-LoRA (Sheng et al. 2023) write as GPU kernels, here with ``torch.bmm``. When adapters are so
unevenly used that padding would move more numbers than gathering the factors (``n width T > B (r + T)``), the
caller keeps its gather path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftkit.core.layer import Routing


@dataclass(frozen=True)
class Segments:
    """Where each row sits in the padded by-adapter layout."""

    width: int  # slots per adapter (the largest row count)
    gather: torch.Tensor  # (n * width,) the row in each slot; padding slots hold row 0
    back: torch.Tensor  # (B,) each row's slot


def segments(rows: torch.Tensor, n: int) -> Segments:
    """The layout for adapter indices ``rows`` (B,) over ``n`` adapters."""
    counts = torch.bincount(rows, minlength=n)  # (n,)
    width = int(counts.max())
    order = torch.argsort(rows, stable=True)  # rows grouped by adapter, in their order
    grouped = rows[order]
    starts = counts.cumsum(0) - counts
    slot = grouped * width + torch.arange(rows.numel(), device=rows.device) - starts[grouped]  # (B,)
    gather = torch.zeros(n * width, dtype=torch.long, device=rows.device)
    gather[slot] = order
    back = torch.empty_like(rows)
    back[order] = slot
    return Segments(width, gather, back)


_LAST: list[tuple[Routing | None, int, Segments | None]] = [(None, 0, None)]  # one forward call's plan, all layers


def _plan(routing: Routing, batch: int, n: int) -> tuple[torch.Tensor, Segments]:
    routing_seen, batch_seen, plan = _LAST[0]
    rows = routing.rows(batch)
    if routing_seen is not routing or batch_seen != batch or plan is None:
        plan = segments(rows, n)
        _LAST[0] = (routing, batch, plan)  # one tuple swap: a concurrent call at worst recomputes its own
    return rows, plan


def grouped_delta(
    routing: Routing,
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    c_stack: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor | None:
    """bias + s_k (B_k A_k x_i + c_k) for every row i of x (B, ..., in), as (B, T, out); None when the padded layout
    would cost more than gathering each row's factors (the caller then gathers)."""
    n, r = a_stack.shape[0], a_stack.shape[2]
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
    batch, tokens = flat.shape[:2]
    rows, plan = _plan(routing, batch, n)
    if n * plan.width * tokens > batch * (r + tokens):
        return None
    xs = flat.index_select(0, plan.gather).reshape(n, plan.width * tokens, -1)  # (n, width T, in)
    ys = torch.bmm(torch.bmm(xs, a_stack), b_stack)  # (n, width T, out)
    y = ys.reshape(n * plan.width, tokens, -1).index_select(0, plan.back)  # (B, T, out)
    if c_stack is not None:
        y = y + c_stack[rows][:, None, :]
    return y if bias is None else y + bias
