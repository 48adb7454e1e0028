"""LyCORIS LoHa / LoKr / full-delta modules of a kohya-style file, read as weight deltas.

KohakuBlueleaf et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation", sections 3.2-3.3, with s = alpha / r:

    LoHa:  ΔW = s * (w1_a @ w1_b) ⊙ (w2_a @ w2_b)       r = hada_w1_b.shape[0]
           with tucker cores hada_t1/t2 (convs): w_i = einsum("ijkl,jr,ip->prkl", t_i, w_i_b, w_i_a)
    LoKr:  ΔW = s * kron(w1, w2),  w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b,  w2 likewise (or via lokr_t2);
           r = rank of the factorised part (lokr_w2_b, else lokr_w1_b); both factors full: s = 1
    full:  ΔW = diff

Each ΔW is flattened to (out, n) (n = in * kh * kw) and returned as a :class:`DeltaLora`: its shape is worked out
from the factor shapes first (every dimension checked, so a corrupt file raises CheckpointError, not a torch
error), and the product is only computed once the caller has checked that shape against the model's layer.
It is then an exact LoRA of rank min(out, n) (B = ΔW, A = I when n <= out, else B = I, A = ΔW; scale 1): merging
adds exactly ΔW, scales and unfusing work as for any LoRA; the cost is one weight-sized tensor per module (LoHa /
LoKr files are small, the loaded adapter is not).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from peftkit.core.factorised import tucker
from peftkit.errors import CheckpointError, choices
from peftkit.integrations.factors import DeltaLora

LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
Factor = Callable[[], torch.Tensor]


def _need(name: str, parts: dict[str, torch.Tensor], *keys: str) -> list[torch.Tensor]:
    missing = [k for k in keys if k not in parts]
    if missing:
        raise CheckpointError(
            f"Module {name!r} lacks {choices(missing)} (has {choices(parts)}); the file is incomplete."
        )
    return [parts[k] for k in keys]


def _corrupt(name: str, what: str) -> CheckpointError:
    return CheckpointError(f"Module {name!r}: {what}; the file is corrupt (re-export it from kohya / LyCORIS).")


def matrix_shape(name: str, key: str, t: torch.Tensor, dims: tuple[int, ...] = (2, 4)) -> tuple[int, int]:
    """A weight-like factor (2-D, or 4-D for a conv) flattened to (rows, columns); no empty dimension."""
    if t.dim() not in dims or 0 in t.shape:
        want = " or ".join(f"{d}-D" for d in dims)
        raise _corrupt(name, f"{key} has shape {tuple(t.shape)}, but it must be {want} with no empty dimension")
    return t.shape[0], math.prod(t.shape[1:])


def product_shape(
    name: str, keys: tuple[str, str, str], a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None
) -> tuple[int, int]:
    """Shape of a @ b.flatten(1) (a: (out, r)), or with a tucker core t (r1, r2, kh, kw) of
    einsum("ijkl,ip,jr->prkl", t, a, b) flattened (a: (r1, out), b: (r2, in)) -> (out, in * kh * kw)."""
    a_rows, a_cols = matrix_shape(name, keys[0], a, dims=(2,))
    b_rows, b_cols = matrix_shape(name, keys[1], b)
    if t is None:
        if a_cols != b_rows:
            raise _corrupt(name, f"{keys[0]} {tuple(a.shape)} @ {keys[1]} {tuple(b.shape)}: the ranks differ")
        return a_rows, b_cols
    if t.dim() != 4 or 0 in t.shape or (t.shape[0], t.shape[1]) != (a_rows, b_rows):
        raise _corrupt(
            name, f"tucker core {keys[2]} {tuple(t.shape)} must be ({a_rows}, {b_rows}, kh, kw) to join "
            f"{keys[0]} {tuple(a.shape)} and {keys[1]} {tuple(b.shape)}"
        )  # fmt: skip
    return a_cols, b_cols * t.shape[2] * t.shape[3]


def product(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """The (out, n) matrix whose shape :func:`product_shape` gives."""
    if t is None:
        return a.float() @ b.float().flatten(1)
    return tucker(t.float(), a.float(), b.float().flatten(1)).flatten(1)


def loha(name: str, parts: dict[str, torch.Tensor], alpha: float | None) -> DeltaLora:
    """LoHa: ΔW = (alpha / r) (w1_a w1_b) ⊙ (w2_a w2_b), flattened to (out, n)."""
    w1a, w1b, w2a, w2b = _need(name, parts, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    t1, t2 = parts.get("hada_t1"), parts.get("hada_t2")
    shape1 = product_shape(name, ("hada_w1_a", "hada_w1_b", "hada_t1"), w1a, w1b, t1)
    shape2 = product_shape(name, ("hada_w2_a", "hada_w2_b", "hada_t2"), w2a, w2b, t2)
    if shape1 != shape2:
        raise _corrupt(name, f"LoHa factors give {shape1} and {shape2}, which cannot be multiplied elementwise")
    rank = w1b.shape[0]
    scale = (alpha if alpha is not None else rank) / rank
    return DeltaLora(name, shape1, lambda: product(w1a, w1b, t1) * product(w2a, w2b, t2) * scale)


def _lokr_factor(name: str, parts: dict[str, torch.Tensor], i: int) -> tuple[tuple[int, int], int | None, Factor]:
    """(shape, rank or None when stored full, a function computing the factor) of LoKr's w1 or w2."""
    if f"lokr_w{i}" in parts:
        w = parts[f"lokr_w{i}"]
        return matrix_shape(name, f"lokr_w{i}", w), None, lambda: w.float().flatten(1)
    keys = (f"lokr_w{i}_a", f"lokr_w{i}_b", f"lokr_t{i}")
    a, b = _need(name, parts, *keys[:2])
    t = parts.get(keys[2])
    return product_shape(name, keys, a, b, t), b.shape[0], lambda: product(a, b, t)


def lokr(name: str, parts: dict[str, torch.Tensor], alpha: float | None) -> DeltaLora:
    """LoKr: ΔW = s kron(w1, w2) flattened to (out, n); s = alpha / r when a factor is decomposed, else 1.

    kron((a, b), (c, d)) has shape (a c, b d): known before anything is multiplied."""
    (a, b), r1, w1 = _lokr_factor(name, parts, 1)
    (c, d), r2, w2 = _lokr_factor(name, parts, 2)
    rank = r2 if r2 is not None else r1
    scale = 1.0 if rank is None or alpha is None else alpha / rank
    # kron((a, b), (c, d, kh, kw)) flattened = kron((a, b), (c, d * kh * kw)): the column order agrees.
    return DeltaLora(name, (a * c, b * d), lambda: torch.kron(w1(), w2()) * scale)


def full(name: str, diff: torch.Tensor) -> DeltaLora:
    """A stored full delta (``diff``), flattened to (out, n)."""
    shape = matrix_shape(name, "diff", diff)
    return DeltaLora(name, shape, lambda: diff.float().flatten(1))
