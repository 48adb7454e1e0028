"""LoftQ initialisation (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
section 3, Algorithm 1): quantize the base weight and start the adapter from what quantization lost.

Alternating, for t = 1..T (``loftq_iter``), with q_N the n-bit quantizer (``loftq_bits``: 4 = NF4, 8 = int8 rows)
and SVD_r the best rank-r approximation:

    Q_t = q_N(W - s B_{t-1} A_{t-1})             B_0 A_0 = 0: the first step is plain quantization
    s B_t A_t = SVD_r(W - Q_t)                    B = U_r sqrt(S_r) / sqrt(s), A = sqrt(S_r) V_r^T / sqrt(s)

so that Q_T + s B A approximates W better than Q alone: ||W - (Q + s B A)||_F < ||W - Q||_F, and the gap usually
shrinks as T grows. The base weight becomes dequant(Q_T), which the n-bit format stores exactly: save the model and
load it quantized (bitsandbytes NF4 without double quantization, or int8), as with peft. peft 0.21 stores
B = U sqrt(S), A = sqrt(S) V^T, which assumes s = alpha / r = 1; peftkit divides by sqrt(s) so that any alpha works
(the files are the same when alpha = r). Linear layers only; the weights must be float (quantize afterwards).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from peftkit.core import quantized as Q
from peftkit.core.method import AdapterHost
from peftkit.errors import ConfigError

BITS = {4: "nf4", 8: "int8"}


@dataclass(kw_only=True)
class LoftQConfig:
    """LoftQ's settings, with peft's names and defaults (``LoraConfig(init_lora_weights="loftq",
    loftq_config=LoftQConfig(...))``)."""

    loftq_bits: int = field(default=4, metadata={"help": "Quantization bits: 4 (NF4) or 8 (int8)."})
    loftq_iter: int = field(default=1, metadata={"help": "Alternating quantization / SVD steps (T)."})

    def __post_init__(self) -> None:
        problems = []
        if self.loftq_bits not in BITS:
            problems.append(f"loftq_bits={self.loftq_bits!r} is not one of 4 (NF4), 8 (int8), as in peft.")
        if not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            problems.append(f"loftq_iter={self.loftq_iter!r} must be an integer >= 1 (typical: 1 to 5).")
        if problems:
            raise ConfigError("Invalid LoftQConfig:\n" + "\n".join(f"  - {p}" for p in problems))


@torch.no_grad()
def loftq_factors(
    weight: torch.Tensor, bits: int, r: int, iters: int, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dequant(Q) (out, in), A (r, in), B (out, r)) of Algorithm 1 for ``weight`` (out, in), in float32, with
    s B A the rank-r SVD of W - Q."""
    w = weight.detach().float()
    low = torch.zeros_like(w)
    for _ in range(iters):
        q = Q.roundtrip(w - low, BITS[bits])  # (out, in)
        a, b = svd_factors(w - q, r, 1.0)
        low = b @ a
    norm = math.sqrt(scaling)
    return q, a / norm, b / norm


def svd_factors(residual: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in), B (out, r) with s B A the best rank-r approximation of ``residual`` (out, in):
    B = U_r sqrt(S_r) / sqrt(s), A = sqrt(S_r) V_r^T / sqrt(s)."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = s[:r].sqrt() / math.sqrt(scaling)  # (r,)
    return root[:, None] * vh[:r], u[:, :r] * root


def settings(config: object) -> LoftQConfig:
    """The LoftQConfig a LoraConfig carries in ``loftq_config`` (a LoftQConfig or peft's dict)."""
    raw = getattr(config, "loftq_config", None)
    if isinstance(raw, LoftQConfig):
        return raw
    if isinstance(raw, dict) and raw:
        return LoftQConfig(**raw)
    raise ConfigError(
        "init_lora_weights='loftq' needs loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1) (as in peft)."
    )


def check(model: nn.Module, config: object, targets: list[str]) -> None:
    """ConfigError before anything changes: LoftQ rewrites float nn.Linear weights, one DoRA-free LoRA per layer."""
    settings(config)
    if getattr(config, "use_dora", False):
        raise ConfigError("init_lora_weights='loftq' with use_dora=True is not supported; drop one of them.")
    for name in targets:
        module = model.get_submodule(name)
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if Q.is_quantized(base):  # already holds Q: initialise() leaves it to the checkpoint (see there)
            continue
        if type(base) is not nn.Linear or not base.weight.is_floating_point():
            raise ConfigError(
                f"init_lora_weights='loftq' cannot initialise {name!r} ({type(base).__name__}): LoftQ quantizes a "
                "float nn.Linear weight itself. Apply it to the unquantized model, save it, then load it quantized "
                "(or peftkit.integrations.kbit.quantize_model); exclude other modules with exclude_modules."
            )


@torch.no_grad()
def initialise(model: nn.Module, config: object, adapter_name: str, targets: list[str]) -> None:
    """Algorithm 1 on every wrapped target: base weight <- dequant(Q), A and B <- the SVD factors.

    A target that is already quantized is left alone, with a warning: that is peft's recipe for loading a LoftQ
    adapter (its A, B come from the checkpoint, its base from the saved dequant(Q) model loaded in 4 bits); a new
    adapter there starts as plain LoRA (B = 0)."""
    if torch.empty(()).device.type == "meta":  # a size probe built under torch.device("meta")
        return
    loftq = settings(config)
    skipped = []
    for name in targets:
        layer = model.get_submodule(name)
        base = layer.get_base_layer()
        if Q.is_quantized(base):
            skipped.append(name)
            continue
        q, a, b = loftq_factors(
            base.weight, loftq.loftq_bits, layer.r[adapter_name], loftq.loftq_iter, layer.scaling[adapter_name]
        )
        base.weight.copy_(q.to(base.weight.dtype))
        layer.lora_A[adapter_name].weight.copy_(a)
        layer.lora_B[adapter_name].weight.copy_(b)
    if skipped:
        warnings.warn(
            f"init_lora_weights='loftq': {len(skipped)} target(s) are already quantized ({skipped[0]!r}...) and keep "
            "their weights; a checkpoint loaded over them brings LoftQ's A and B, a new adapter starts at B = 0. "
            "Run LoftQ on the float model to initialise it.",
            stacklevel=3,
        )


def _weight_files(peft_model: AdapterHost, model_path: str | None) -> dict[str, Path]:
    """Tensor name -> the .safetensors file holding it, for the original (unquantized) weights."""
    from safetensors import safe_open

    source = model_path or getattr(getattr(peft_model.model, "config", None), "_name_or_path", None)
    folder = Path(source) if source else None
    files = [] if folder is None else sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
    files = [f for f in files if f.suffix == ".safetensors" and f.is_file()]
    if not files:
        raise ConfigError(
            f"replace_lora_weights_loftq: no .safetensors file at model_path={source!r}; pass the folder (or file) "
            "holding the model's original float weights in safetensors (pickle checkpoints cannot be read lazily)."
        )
    index = {}
    for file in files:
        with safe_open(file, "pt") as handle:
            index.update(dict.fromkeys(handle.keys(), file))
    return index


@torch.no_grad()
def replace_lora_weights_loftq(
    peft_model: AdapterHost,
    model_path: str | None = None,
    adapter_name: str = "default",
    callback: Callable[[AdapterHost, str], bool] | None = None,
) -> None:
    """peft's ``replace_lora_weights_loftq``: one LoftQ step for a model already loaded in 4 bits. For each LoRA layer
    over a bitsandbytes Linear4bit, read its original weight W from ``model_path``'s safetensors (default: the model's
    ``config._name_or_path``) and set s B A = SVD_r(W - dequant(Q)). ``callback(peft_model, module_name)`` is asked
    after each layer; False puts that layer's previous A and B back (a greedy check, e.g. on logits)."""
    from safetensors import safe_open

    from peftkit.methods.lora.quantized import QuantizedLoraLinear

    index = _weight_files(peft_model, model_path)
    for name, layer in peft_model.model.named_modules():
        if not isinstance(layer, QuantizedLoraLinear) or adapter_name not in layer.r:
            continue
        if Q.kind(layer.get_base_layer()) not in ("nf4", "fp4"):
            continue
        key = name + ".weight"
        if key not in index:
            raise ConfigError(f"replace_lora_weights_loftq: {key!r} is not in the safetensors at {model_path!r}.")
        with safe_open(index[key], "pt") as handle:
            weight = handle.get_tensor(key).float()
        a, b = svd_factors(
            weight - Q.dequantize(layer.get_base_layer()), layer.r[adapter_name], layer.scaling[adapter_name]
        )
        lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        before = (lora_a.clone(), lora_b.clone())
        lora_a.copy_(a)
        lora_b.copy_(b)
        if callback is not None and not callback(peft_model, name):
            lora_a.copy_(before[0])
            lora_b.copy_(before[1])
