"""AdaLoRA's budget schedule and rank allocation (Zhang et al. 2023, sections 3.2-3.3), run after optimizer steps.

Importance of a triplet i of a layer (eq. 7-10), from the gradients of the step just taken:

    I(w)  = |w · ∂L/∂w|                                   every entry of P, Λ, Q
    Ī(w) ← β1 Ī(w) + (1 - β1) I(w)                        sensitivity, smoothed
    Ū(w) ← β2 Ū(w) + (1 - β2) |I(w) - Ī(w)|               uncertainty
    S_i   = s(λ_i) + mean_j s(Q_ij) + mean_k s(P_ki)       with s(w) = Ī(w) Ū(w)

The budget b(t) (total kept triplets) stays at the initial one for ``tinit`` steps, falls cubically to
``target_r`` per layer by step T - ``tfinal`` (T = ``total_step``), and stays there:

    b(t) = b_T + (b_0 - b_T) (1 - (t - tinit) / (T - tfinal - tinit))³

Every ``deltaT`` steps the triplets with the lowest S (across all layers) get λ = 0 until b(t) remain; at step
T - tfinal the allocation is fixed (``rank_pattern``) and applied again after every later step.
"""

from __future__ import annotations

import torch

from peftkit.core.method import AdapterHost
from peftkit.errors import ConfigError
from peftkit.methods.adalora.config import AdaLoraConfig
from peftkit.methods.adalora.layers import TRIPLET, SVDLayer


def layers_of(host: AdapterHost, adapter_name: str) -> list[tuple[str, SVDLayer]]:
    """(path, layer) of every AdaLoRA layer holding ``adapter_name``, in model order."""
    return [(n, m) for n, m in host.model.named_modules() if isinstance(m, SVDLayer) and adapter_name in m.lora_E]


def training_adapters(host: AdapterHost) -> list[str]:
    """The active AdaLoRA adapters whose triplets train."""
    out = []
    for name in host.active_adapters:
        layers = layers_of(host, name) if isinstance(host.peft_config.get(name), AdaLoraConfig) else []
        if layers and layers[0][1].lora_E[name].requires_grad:
            out.append(name)
    return out


def budget_schedule(config: AdaLoraConfig, step: int, initial: int, target: int) -> tuple[int, bool]:
    """(b(step), whether to mask at this step), peft's schedule."""
    if step <= config.tinit:
        return initial, False
    if step > config.total_step - config.tfinal:
        return target, True
    remaining = 1 - (step - config.tinit) / (config.total_step - config.tfinal - config.tinit)
    return int((initial - target) * remaining**3 + target), step % config.deltaT == 0


@torch.no_grad()
def update_sensitivity(layers: list[tuple[str, SVDLayer]], name: str, config: AdaLoraConfig) -> None:
    """One EMA step of Ī and Ū for every entry of P, Λ, Q (eq. 8-9), from the gradients still on them."""
    for _, layer in layers:
        state = layer.sensitivity.setdefault(name, {})
        for attr in TRIPLET:
            p = getattr(layer, attr)[name]
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg, unc = state.get(attr, (torch.zeros_like(p), torch.zeros_like(p)))
            avg = config.beta1 * avg + (1 - config.beta1) * ipt
            unc = config.beta2 * unc + (1 - config.beta2) * (ipt - avg).abs()
            state[attr] = (avg, unc)


def triplet_scores(layer: SVDLayer, name: str) -> torch.Tensor | None:
    """S_i for each triplet of the layer (r,), or None before any sensitivity was recorded."""
    state = layer.sensitivity.get(name, {})
    if len(state) < len(TRIPLET):
        return None
    score = {attr: avg * unc for attr, (avg, unc) in state.items()}
    return score["lora_E"].view(-1) + (score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0))


@torch.no_grad()
def mask_to_budget(layers: list[tuple[str, SVDLayer]], name: str, budget: int) -> dict[str, list[bool]] | None:
    """Zero λ of the lowest-scoring triplets until ``budget`` remain; the kept ones per layer (peft's pattern)."""
    scores = [triplet_scores(layer, name) for _, layer in layers]
    if any(s is None for s in scores):
        return None
    everything = torch.cat(scores)
    prune = everything.numel() - budget
    threshold = torch.kthvalue(everything, prune).values.item() if prune > 0 else -float("inf")
    pattern = {}
    for (path, layer), score in zip(layers, scores, strict=True):
        keep = score > threshold
        layer.lora_E[name].masked_fill_(~keep.view(-1, 1), 0.0)
        layer.kept[name] = keep
        pattern[f"{path}.lora_E"] = keep.tolist()
    return pattern


@torch.no_grad()
def apply_pattern(layers: list[tuple[str, SVDLayer]], name: str) -> None:
    """Zero λ of the triplets the fixed allocation pruned (after every step of the final phase)."""
    for _, layer in layers:
        keep = layer.kept.get(name)
        if keep is not None and keep.numel() == layer.lora_E[name].shape[0]:
            layer.lora_E[name].masked_fill_(~keep.view(-1, 1), 0.0)


def allocate(host: AdapterHost, name: str, step: int) -> None:
    """One step of the schedule for adapter ``name``: update the importance, mask to the budget when due."""
    config = host.peft_config[name]
    if config.total_step is None:
        raise ConfigError(
            f"AdaLoRA adapter {name!r} has total_step=None; set total_step to the run's number of optimizer steps "
            "(peftkit train fills it in) before calling update_and_allocate."
        )
    layers = layers_of(host, name)
    initial = sum(layer.lora_E[name].shape[0] for _, layer in layers)
    target = config.target_r * len(layers)
    final = config.total_step - config.tfinal
    if step < final:
        update_sensitivity(layers, name, config)
        budget, due = budget_schedule(config, step, initial, target)
        pattern = mask_to_budget(layers, name, budget) if due else None
    elif step == final:
        pattern = mask_to_budget(layers, name, target)
        for _, layer in layers:
            layer.sensitivity.pop(name, None)
    else:
        apply_pattern(layers, name)
        pattern = None
    if pattern is not None:
        config.rank_pattern = pattern


def update_and_allocate(host: AdapterHost, global_step: int) -> None:
    """peft's ``update_and_allocate(global_step)``: call it after ``optimizer.step()`` and before ``zero_grad()``
    (the importance reads the gradients); ``peftkit train`` does, with the optimizer steps taken so far (1, 2, ...)."""
    for name in training_adapters(host):
        allocate(host, name, global_step)


def after_step(host: AdapterHost, step: int, total_steps: int) -> None:
    """The training loop's hook: fill in ``total_step`` from the run when unset, then ``update_and_allocate``."""
    for name in training_adapters(host):
        config = host.peft_config[name]
        if config.total_step is None:
            problems = config.schedule_problems(total_steps)
            if problems:
                raise ConfigError(f"AdaLoRA adapter {name!r}: " + " ".join(problems))
            config.total_step = total_steps
    update_and_allocate(host, step)


def rank_report(host: AdapterHost) -> str:
    """The rank each AdaLoRA layer keeps, per adapter: ``<layer>: kept / initial``, and the total."""
    lines = []
    for name, config in host.peft_config.items():
        if not isinstance(config, AdaLoraConfig):
            continue
        layers = layers_of(host, name)
        kept = [(path, _kept(layer, name), config.init_r) for path, layer in layers]
        total = sum(k for _, k, _ in kept)
        lines.append(f"AdaLoRA {name!r} final ranks ({total} of {config.init_r * len(layers)} triplets kept):")
        lines.extend(f"  {path}: {k} / {r}" for path, k, r in kept)
    return "\n".join(lines)


def _kept(layer: SVDLayer, name: str) -> int:
    keep = layer.kept.get(name)
    return int(keep.sum()) if keep is not None else layer.lora_E[name].shape[0]
