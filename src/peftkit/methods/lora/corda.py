"""CorDA: context-oriented LoRA initialisation (``init_lora_weights="corda"``; Yang et al. 2024, "CorDA:
Context-Oriented Decomposition Adaptation of Large Language Models for Task-Aware Parameter-Efficient Fine-tuning",
section 3).

``preprocess_corda(model, config, run_model)`` runs the user's batches and collects, for every target Linear, the
covariance of its inputs, each call's input (tokens, in) scaled by its largest value:

    C = mean over calls of X^T X                        (in, in)

then decomposes the weight oriented by that context, with C damped until it inverts well (C + d mean(diag C) I,
d = 0.01, doubled until ||C C^-1 - I|| < 0.05):

    W C = U S V^T        W = U S (C^-1 V)^T    (exactly)

The adapter takes r of those directions: the largest (``corda_method="ipm"``, instruction-previewed: the task's main
directions train) or the smallest (``"kpm"``, knowledge-preserved: the directions the data uses least train, the
rest of W stays), A = sqrt(S_r / s) (C^-1 V_r)^T, B = U_r sqrt(S_r / s), and the residual W - s B A stays in the
base weight, so the model still equals the base model at the start (as PiSSA; methods/lora/inits.py applies it).

peft's names and semantics (``CordaConfig``, ``preprocess_corda``); ``cache_file`` / ``covariance_file`` are written
as safetensors here (peft pickles them with torch.save), so the two libraries do not share those caches.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.core.targeting import find_targets, is_linear_like
from peftkit.errors import ConfigError
from peftkit.methods.lora.config import CordaConfig, LoraConfig


@dataclass
class CordaEigens:
    """The cropped context-oriented decomposition of one weight: S (r,), U (out, r), V = C^-1 V_r (in, r)."""

    S_WC: torch.Tensor  # peft's attribute names
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def _targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    names = find_targets(model, config, is_linear_like, supported_label="Linear, GPT-2 Conv1D")
    out = []
    for name in names:
        module = model.get_submodule(name)
        out.append((name, module.get_base_layer() if isinstance(module, AdapterLayer) else module))
    return out


def _weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in) in float32 (GPT-2's Conv1D stores it transposed)."""
    w = module.weight.float()
    return w.T if type(module).__name__ == "Conv1D" else w


@torch.no_grad()
def _covariances(model: nn.Module, targets: list, run_model: Callable[[], None], fp16: bool) -> dict:
    """{name: mean over forward calls of X^T X}, X each call's input (tokens, in) divided by its largest value."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys((n for n, _ in targets), 0)

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            x = x if fp16 else x.float()
            x = x / x.max().abs()
            if not torch.isfinite(x).all():
                raise ConfigError(f"preprocess_corda: layer {name!r} got non-finite inputs; check the batches.")
            sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x
            counts[name] += 1

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in targets]
    try:
        run_model()
    finally:
        for handle in handles:
            handle.remove()
    unseen = [n for n, c in counts.items() if c == 0]
    if unseen:
        raise ConfigError(f"preprocess_corda: run_model never called {unseen[:3]}; run batches through every target.")
    return {name: sums[name] / counts[name] for name in sums}


def eigens_for(weight: torch.Tensor, covariance: torch.Tensor, r: int, method: str) -> CordaEigens:
    """W C = U S V^T with C damped until invertible; the first (ipm) or last (kpm) r triplets, V mapped by C^-1."""
    c = covariance.float()
    eye = torch.eye(c.shape[0], device=c.device)
    damp = 0.01
    while True:
        fixed = c + eye * c.diagonal().mean() * damp
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(weight @ fixed, full_matrices=False)
    v = (vh @ inverse).T  # (in, min)
    keep = slice(None, r) if method == "ipm" else slice(-r, None)
    return CordaEigens(S_WC=s[keep].clone(), U_WC=u[:, keep].clone(), V_WC=v[:, keep].clone())


@torch.no_grad()
def preprocess_corda(
    model: nn.Module,
    lora_config: LoraConfig,
    run_model: Callable[[], None] | None = None,
    hooked_model: nn.Module | None = None,
) -> None:
    """Attach ``eigens`` (the cropped decomposition) to every target Linear of ``model``; then
    ``get_peft_model(model, lora_config)`` with ``init_lora_weights="corda"`` builds the adapters from them.
    ``run_model()`` runs the calibration batches through ``hooked_model`` (default: ``model``)."""
    corda = lora_config.corda_config or CordaConfig()
    targets = _targets(model, lora_config)
    if corda.cache_file and os.path.isfile(corda.cache_file) and os.path.getsize(corda.cache_file) > 0:
        cache = load_file(corda.cache_file)
        for name, module in targets:
            module.eigens = CordaEigens(*(cache[f"{name}.eigens.{k}"].to(module.weight.device) for k in _KEYS))
        return
    covariances = _load_or_measure(model, lora_config, corda, targets, run_model, hooked_model)
    for name, module in targets:
        r = lora_config.rank_for(name)
        eigens = eigens_for(_weight(module), covariances[name].to(module.weight.device), r, corda.corda_method)
        module.eigens = eigens
    if corda.cache_file:
        tensors = {f"{n}.eigens.{k}": getattr(m.eigens, k).contiguous() for n, m in targets for k in _KEYS}
        _save(tensors, corda.cache_file)


_KEYS = ("S_WC", "U_WC", "V_WC")


def _load_or_measure(model, config, corda, targets, run_model, hooked_model) -> dict[str, torch.Tensor]:
    if corda.covariance_file and os.path.isfile(corda.covariance_file) and os.path.getsize(corda.covariance_file):
        return load_file(corda.covariance_file)
    if run_model is None:
        raise ConfigError(
            "preprocess_corda needs run_model (a function that runs your calibration batches through the model) "
            "unless corda_config.cache_file or covariance_file already holds the results."
        )
    hooked = targets if hooked_model is None else _targets(hooked_model, config)
    was_training = (hooked_model or model).training
    (hooked_model or model).eval()
    try:
        covariances = _covariances(hooked_model or model, hooked, run_model, corda.use_float16_for_covariance)
    finally:
        (hooked_model or model).train(was_training)
    if corda.covariance_file:
        _save({k: v.contiguous() for k, v in covariances.items()}, corda.covariance_file)
    return covariances


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.cpu() for k, v in tensors.items()}, path)


def check_prepared(model: nn.Module, config: LoraConfig) -> None:
    """Before any weight changes: every target has eigens of its rank (else the init would stop half-way)."""
    for name, module in _targets(model, config):
        eigens, r = getattr(module, "eigens", None), config.rank_for(name)
        if eigens is None or eigens.S_WC.shape[0] != r:
            have = None if eigens is None else eigens.S_WC.shape[0]
            raise ConfigError(
                f"init_lora_weights='corda': {name!r} has {'no eigens' if have is None else f'eigens of rank {have}'}"
                f" but r={r}. Run preprocess_corda(model, config, run_model) with this config first (loading a CorDA "
                "adapter needs it too, or convert it with save_pretrained(path_initial_model_for_weight_conversion=))."
            )


def factors(module: nn.Module, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A = sqrt(S / s) V^T (r, in), B = U sqrt(S / s) (out, r) from the module's eigens, which are then dropped."""
    eigens = module.eigens
    if not all(torch.isfinite(t).all() for t in (eigens.S_WC, eigens.U_WC, eigens.V_WC)):
        raise ConfigError("init_lora_weights='corda': the eigens hold NaN / inf; rerun preprocess_corda.")
    root = (eigens.S_WC / s).sqrt()
    a, b = eigens.V_WC.T * root[:, None], eigens.U_WC * root
    del module.eigens
    return a, b
