"""Combining LoRA adapters (PeftModel.add_weighted_adapter): the factor arithmetic per layer."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import torch

from peftkit.core.combine import COMBINATIONS, combine_tensors, mean_head_copies, svd_factors
from peftkit.core.merge import adapter_layers
from peftkit.core.method import AdapterHost
from peftkit.errors import ConfigError, choices
from peftkit.methods.lora.layers import LoraLayer, factors_of

COMBINATION_CHOICES = ("svd", "linear", "cat", *(c for c in COMBINATIONS if c != "linear"))


def _svd_rank(layer: LoraLayer, present: list[str], svd_rank: int | None) -> int:
    """``svd_rank`` (default: the largest rank present) clamped to min(out, in) of the layer's ΔW: a rank above it
    only adds zero rows and columns (and ``svd_rank=10**6`` would allocate them)."""
    a, b = factors_of(layer, present[0])  # A (r, in, ...), B (out, r, ...)
    return min(svd_rank or max(layer.r[n] for n in present), b.shape[0], a[0].numel())


def _layer_plan(layer: LoraLayer, present: list[str], combination_type: str, svd_rank: int | None) -> int:
    ranks = [layer.r[n] for n in present]
    groups = getattr(layer.get_base_layer(), "groups", 1)
    if len(layer.adapter_param_names) > 2:
        raise ConfigError(
            f"add_weighted_adapter cannot combine LoRA on {type(layer.get_base_layer()).__name__} (two factor pairs "
            "per adapter); leave such modules out of the adapters you combine."
        )
    if groups > 1 and combination_type in ("cat", "svd"):
        raise ConfigError(
            f"combination_type={combination_type!r} cannot combine LoRA on a grouped convolution (groups={groups}): "
            "its B is grouped by rank, so neither stacked ranks nor an SVD of ΔW keep its layout. Use 'linear' (equal "
            "ranks) or leave grouped convolutions out of the adapters."
        )
    if combination_type == "cat":
        return sum(ranks)
    if combination_type == "svd":
        return _svd_rank(layer, present, svd_rank)
    if len(set(ranks)) > 1:
        raise ConfigError(
            f"combination_type={combination_type!r} combines the factors entry by entry, so every adapter needs "
            f"the same rank; {dict(zip(present, ranks, strict=True))} differ. Use 'cat' or 'svd' instead."
        )
    return ranks[0]


def _combined_factors(layer: LoraLayer, present: list[str], weights: list[float], kind: str, rank: int, **kw: Any):
    """(A, B) of the combination on one layer, scale 1 (alpha = r):

    cat:     A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...]       so B A = sum_i w_i s_i B_i A_i exactly
    svd:     B A = best rank-``rank`` approximation of sum_i w_i s_i B_i A_i
    others:  A = combine_i(sqrt(w_i s_i) A_i), B = combine_i(sqrt(w_i s_i) B_i)  (see peftkit.core.combine)
    """
    pairs = [factors_of(layer, n) for n in present]
    scales = [w * layer.scaling[n] for n, w in zip(present, weights, strict=True)]
    if kind == "cat":
        return torch.cat([a * s for (a, _), s in zip(pairs, scales, strict=True)]), torch.cat([b for _, b in pairs], 1)
    if kind == "svd":
        delta = sum(s * (b.flatten(1) @ a.flatten(1)) for (a, b), s in zip(pairs, scales, strict=True))  # (out, in..)
        b_new, a_new = svd_factors(delta, rank)
        a_shape, b_shape = pairs[0][0].shape[1:], pairs[0][1].shape[2:]
        return a_new.reshape(rank, *a_shape), b_new.reshape(b_new.shape[0], rank, *b_shape)
    roots = [math.sqrt(s) for s in scales]
    return tuple(combine_tensors([p[i] for p in pairs], roots, kind, **kw) for i in (0, 1))


def combine(
    peft_model: AdapterHost,
    adapters: list[str],
    weights: list[float],
    new_name: str,
    combination_type: str,
    *,
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> None:
    """Add LoRA adapter ``new_name`` combining ``adapters`` layer by layer (formulas: ``_combined_factors``).

    Its scale is 1 (lora_alpha = r per layer); modules_to_save copies become the weights-weighted mean of the
    adapters' copies. As in peft, "linear", "ties", "dare_*" and "magnitude_prune" act on the factors (cross terms
    included), so they need equal ranks and non-negative weights; "cat" and "svd" act on the update B A.
    """
    if combination_type not in COMBINATION_CHOICES:
        raise ConfigError(f"combination_type={combination_type!r} is not one of {choices(COMBINATION_CHOICES)}.")
    if combination_type not in ("cat", "svd") and any(w < 0 for w in weights):
        raise ConfigError(
            f"combination_type={combination_type!r} scales factors by sqrt(weight); weights {weights} "
            "must be >= 0. Use 'cat' or 'svd' for negative weights."
        )
    with_dora = [n for n in adapters if getattr(peft_model.peft_config[n], "use_dora", False)]
    if with_dora:
        raise ConfigError(
            f"add_weighted_adapter cannot combine DoRA adapters {with_dora}: each one rescales the rows of W + s B A "
            "by its own magnitude / norm, so no weighted sum of factors reproduces them (peft refuses too). Combine "
            "plain LoRA adapters only, or merge_and_unload() the DoRA one first."
        )
    plan = _plan(peft_model, adapters, combination_type, svd_rank)
    ranks = [r for *_, r in plan.values()]
    r0 = max(set(ranks), key=ranks.count)
    odd = {re.escape(p): r for p, (*_, r) in plan.items() if r != r0}
    first = peft_model.peft_config[adapters[0]]
    config = first.replace(
        target_modules=sorted(plan),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        r=r0,
        lora_alpha=r0,
        rank_pattern=odd,
        alpha_pattern=dict(odd),
        use_rslora=False,
        init_lora_weights=False,
        lora_bias=any(peft_model.peft_config[n].lora_bias for n in adapters),
    )
    peft_model.add_adapter(new_name, config)
    kw = {"density": density, "majority_sign_method": majority_sign_method, "generator": generator}
    try:
        with torch.no_grad():
            for layer, present, rank in plan.values():
                w = [weights[adapters.index(n)] for n in present]
                for dst, src in zip(
                    factors_of(layer, new_name), _combined_factors(layer, present, w, combination_type, rank, **kw)
                ):
                    dst.copy_(src)
                _combine_bias(layer, present, w, new_name)
            mean_head_copies(peft_model, adapters, weights, new_name)
    except Exception:
        peft_model.delete_adapter(new_name)
        raise


def _plan(
    peft_model: AdapterHost, adapters: list[str], combination_type: str, svd_rank: int | None
) -> dict[str, tuple[LoraLayer, list[str], int]]:
    """path -> (layer, adapters present on it, the combination's rank there); warns once when ``svd_rank`` was
    clamped to a layer's min(out, in)."""
    plan = {}
    for path, layer in adapter_layers(peft_model.model):
        present = [n for n in adapters if isinstance(layer, LoraLayer) and n in layer.r]
        if present:
            plan[path] = (layer, present, _layer_plan(layer, present, combination_type, svd_rank))
    clamped = {p: r for p, (*_, r) in plan.items() if combination_type == "svd" and svd_rank and r < svd_rank}
    if clamped:
        warnings.warn(
            f"svd_rank={svd_rank} exceeds min(out_features, in_features) of {len(clamped)} layer(s); their combined "
            f"adapter uses that full rank instead (e.g. {dict(list(clamped.items())[:3])}), which is exact there.",
            UserWarning,
            stacklevel=4,
        )
    return plan


def _combine_bias(layer: LoraLayer, present: list[str], weights: list[float], new_name: str) -> None:
    """lora_bias: the combination's B bias (its scale is 1) is sum_i w_i s_i c_i, the weighted sum of what each
    adapter adds to the outputs (adapters without a bias add 0)."""
    b_new = getattr(layer, layer.adapter_param_names[1])[new_name]
    if getattr(b_new, "bias", None) is None:
        return
    b_new.bias.zero_()
    for name, w in zip(present, weights, strict=True):
        c = layer.bias_delta(name)
        if c is not None:
            b_new.bias += w * c
