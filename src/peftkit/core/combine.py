"""Combining adapters (PeftModel.add_weighted_adapter): pure functions over tensors, and the generic checks.

Task arithmetic (Ilharco et al. 2023), TIES-merging (Yadav et al. 2023, section 3: trim, elect sign, disjoint
merge) and DARE (Yu et al. 2024, section 3: drop each entry with probability 1 - density, rescale by 1 / density).
A method's ``combine`` (see :class:`peftkit.core.method.Method`) decides what its "task tensors" are (LoRA: its
factors, or its full ΔW before an SVD); nothing here knows a method.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from peftkit.core.io import check_adapter_name
from peftkit.core.layer import ModulesToSave
from peftkit.core.merge import adapter_layers
from peftkit.core.method import AdapterHost
from peftkit.core.registry import method_of
from peftkit.errors import AdapterNameError, ConfigError, choices

COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` entries of largest magnitude, zero the rest (TIES "trim")."""
    k = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    if k > 0:
        mask[tensor.abs().flatten().topk(k).indices] = 1
    return tensor * mask.view_as(tensor)


def random_prune(
    tensor: torch.Tensor, density: float, rescale: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (Bernoulli mask), then divide by ``density``."""
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


def majority_sign(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES "elect": per entry, the sign of the summed values ("total") or of the summed signs ("frequency");
    ties go to +. Returns the mask of entries (n, ...) whose own sign agrees with it."""
    signs = stacked.sign()
    votes = stacked.sum(0) if method == "total" else signs.sum(0)
    return signs == torch.where(votes >= 0, 1.0, -1.0).to(signs.dtype)


def disjoint_mean(stacked: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES "disjoint merge": the sum of the agreeing entries divided by how many agree (at least 1)."""
    kept = (stacked * agree).sum(0)
    return kept / agree.sum(0).clamp(min=1).to(kept.dtype)


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.to(stacked).view(-1, *([1] * (stacked.dim() - 1)))


def combine_tensors(
    tensors: list[torch.Tensor],
    weights: list[float] | torch.Tensor,
    combination_type: str,
    density: float | None = None,
    majority_sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Combine same-shaped task tensors t_i with weights w_i:

    linear           sum_i w_i t_i
    magnitude_prune  sum_i w_i trim(t_i)
    dare_linear      sum_i w_i drop(t_i)
    ties             disjoint_mean(w_i trim(t_i)), signs elected on the trimmed t_i
    dare_ties        disjoint_mean(w_i drop(t_i)), signs elected on the dropped t_i
    """
    weights = torch.as_tensor(weights, dtype=tensors[0].dtype)
    if combination_type in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune(t, density) for t in tensors]
    elif combination_type in ("dare_linear", "dare_ties"):
        tensors = [random_prune(t, density, generator=generator) for t in tensors]
    stacked = torch.stack(tensors)  # (n, ...)
    if combination_type.endswith("ties"):
        agree = majority_sign(stacked, majority_sign_method)
        return disjoint_mean(_weighted(stacked, weights), agree)
    return _weighted(stacked, weights).sum(0)


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factorisation of a matrix (Eckart-Young): delta ≈ B A, B = U_r S_r, A = V_r^T."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    b, a = u[:, :rank] * s[:rank], vh[:rank]  # (out, k), (k, in), k = min(rank, out, in)
    if b.shape[1] < rank:  # a rank above the matrix's size: pad with zeros so the shapes are (out, rank), (rank, in)
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1)
        a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], 0)
    return b.to(delta.dtype), a.to(delta.dtype)


NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def add_weighted_adapter(
    peft_model: AdapterHost,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    **options,
) -> None:
    """Check the request, then let the adapters' method build ``adapter_name`` (see PeftModel.add_weighted_adapter).
    Every check runs before anything is added: a refused call leaves the model as it was."""
    adapters, weights = list(adapters), list(weights)
    bad = [f"weights[{i}]={w!r}" for i, w in enumerate(weights) if not _finite(w)]
    if bad:
        raise ConfigError(
            f"add_weighted_adapter needs finite numbers as weights; got {', '.join(bad)}. "
            "Pass floats such as [0.7, 0.3] (no strings, NaN or infinity)."
        )
    weights = [float(w) for w in weights]
    if not adapters or len(adapters) != len(weights):
        raise ConfigError(
            f"add_weighted_adapter got {len(adapters)} adapters and {len(weights)} weights; give one weight per "
            "adapter, e.g. add_weighted_adapter(['a', 'b'], [0.7, 0.3], 'mix')."
        )
    for name in adapters:
        peft_model.check_exists(name)
    check_adapter_name(adapter_name)
    if adapter_name in peft_model.peft_config:
        raise AdapterNameError(f"An adapter named {adapter_name!r} already exists; choose another name.")
    methods = {method_of(peft_model.peft_config[n]).name for n in adapters}
    if len(methods) > 1:
        raise ConfigError(f"Adapters {adapters!r} mix methods {choices(methods)}; combine adapters of one method.")
    method = method_of(peft_model.peft_config[adapters[0]])
    if method.combine is None:
        raise ConfigError(f"{method.name} adapters cannot be combined with add_weighted_adapter.")
    problems = _option_problems(combination_type, svd_rank, density, majority_sign_method)
    if problems:
        raise ConfigError("Invalid add_weighted_adapter call:\n" + "\n".join(f"  - {p}" for p in problems))
    method.combine(
        peft_model,
        adapters,
        weights,
        adapter_name,
        combination_type,
        svd_rank=svd_rank,
        density=density,
        majority_sign_method=majority_sign_method,
        **options,
    )
    peft_model.set_adapter(peft_model.active_adapters or adapter_name)  # refresh layers; the new one stays inactive


def _finite(value: Any) -> bool:
    """A real number (not a bool or a string) that is neither NaN nor infinite."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _option_problems(combination_type: str, svd_rank: Any, density: Any, majority_sign_method: str) -> list[str]:
    """Every problem with add_weighted_adapter's options, as messages."""
    problems = []
    if density is not None and not (_finite(density) and 0 < density <= 1):
        problems.append(f"density={density!r} must be a number in (0, 1] (the share of entries kept), or None.")
    elif combination_type in NEEDS_DENSITY and density is None:
        problems.append(f"combination_type={combination_type!r} needs density in (0, 1], e.g. density=0.5.")
    if majority_sign_method not in SIGN_METHODS:
        problems.append(f"majority_sign_method={majority_sign_method!r} is not one of {choices(SIGN_METHODS)}.")
    if svd_rank is not None and (not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0):
        problems.append(f"svd_rank={svd_rank!r} must be a positive integer or None.")
    return problems


def mean_head_copies(peft_model: AdapterHost, adapters: list[str], weights: list[float], new_name: str) -> None:
    """modules_to_save copies of ``new_name``: the weights-weighted mean of the adapters' copies."""
    for _, layer in adapter_layers(peft_model.model):
        copies = layer.modules_to_save if isinstance(layer, ModulesToSave) else {}
        pairs = [(copies[n].state_dict(), w) for n, w in zip(adapters, weights, strict=True) if n in copies]
        total = sum(w for _, w in pairs)
        if new_name not in copies or not pairs or not total:
            continue
        with torch.no_grad():
            for key, dst in copies[new_name].state_dict().items():
                if dst.is_floating_point():
                    dst.copy_(sum(state[key] * w for state, w in pairs) / total)


def free_name(path: str) -> str:
    """The name the targeting rules see for a layer that another adapter's wrapper may enclose."""
    while path.endswith(".base_layer"):
        path = path.removesuffix(".base_layer")
    return path
