"""PiSSA / OLoRA -> plain LoRA (peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)``).

PiSSA and OLoRA move part of W into the initial factors, leaving W_res = W - s B0 A0 in the base layer. After
training, W_res + s B A = W + s (B A - B0 A0), and the difference is itself a low-rank product of twice the rank
(Meng et al. 2024, section 3; peft's conversion):

    s' B' A' = s (B A - B0 A0)   with   A' = [A ; A0] (2r rows),   B' = [B | -B0] (2r columns),   s' = s

so the converted adapter applies to the *original* base weights. s' = s keeps lora_alpha / r: r and lora_alpha
double (rsLoRA: alpha / sqrt(r) stays when alpha grows by sqrt(2)); rank_pattern and alpha_pattern double.
"""

from __future__ import annotations

import math

import torch

from peftkit.errors import ConfigError
from peftkit.methods.lora.config import LoraConfig

# file names of the factors: A's rank is its first dimension, B's its second (Linear, Embedding, Conv)
_A_KEYS = ("lora_A", "lora_embedding_A")
_B_KEYS = ("lora_B", "lora_embedding_B")


def _factor(key: str) -> str | None:
    parts = key.split(".")
    if any(p in _A_KEYS for p in parts):
        return "A"
    if any(p in _B_KEYS for p in parts) and not key.endswith(".bias"):
        return "B"
    return None


def to_plain_lora(
    config: LoraConfig, trained: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The trained adapter's tensors and config as a plain LoRA for the original base weights (see module doc).
    ``initial`` holds the adapter's tensors as saved right after initialisation, before any training."""
    if config.use_dora:
        raise ConfigError("path_initial_model_for_weight_conversion: a DoRA adapter's magnitude cannot be converted.")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ConfigError(
            "path_initial_model_for_weight_conversion is not supported with use_rslora=True together with "
            "rank_pattern / alpha_pattern (as in peft): the per-layer scales cannot be kept."
        )
    missing = sorted(k for k in trained if _factor(k) and k not in initial)
    if missing:
        raise ConfigError(
            f"The initial adapter lacks {len(missing)} factors of the trained one (e.g. {missing[0]!r}); pass the "
            "folder saved right after get_peft_model, before training."
        )
    out = {}
    for key, tensor in trained.items():
        kind = _factor(key)
        if kind == "A":
            out[key] = torch.cat([tensor, initial[key].to(tensor)], dim=0)
        elif kind == "B":
            out[key] = torch.cat([tensor, -initial[key].to(tensor)], dim=1)
        else:
            out[key] = tensor
    alpha = config.lora_alpha * (math.sqrt(2) if config.use_rslora else 2)
    converted = config.replace(
        init_lora_weights=True,
        r=2 * config.r,
        lora_alpha=alpha,
        rank_pattern={k: 2 * v for k, v in (config.rank_pattern or {}).items()},
        alpha_pattern={k: 2 * v for k, v in (config.alpha_pattern or {}).items()},
    )
    return out, converted
