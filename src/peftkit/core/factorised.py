"""Layers whose update is a weight-shaped ΔW built from small factors, and the shared maths of those factors.

A method on this base gives, per adapter, an unscaled ΔW from its factors (``factor_delta``); the layer then does the
rest the same way for every such method, as Hugging Face peft's LyCORIS-style layers do:

    h = base(x) + base_op(x, s · ΔW)        s = alpha / r; base_op: x ΔWᵀ (Linear) or the base convolution with ΔW
    merge: W <- W + s · ΔW                  unmerge: W <- W - s · ΔW (its exact inverse)

Training-time regularisers (KohakuBlueleaf et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS
Fine-Tuning to Model Evaluation", section 3): ``module_dropout`` skips an adapter for a whole step with that
probability; ``rank_dropout`` zeroes whole output rows of ΔW (rescaled by the kept share when the method says so).
Per-row routing (``adapter_names=``) adds each row group's own update.

The pure functions below (Tucker rebuild, Kronecker product, peft's factorisation of a dimension) are
shared with the readers of LyCORIS files (integrations/lycoris.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from peftkit.core.layer import AdditiveLayer
from peftkit.core.targeting import TargetingConfig

_QV = ["q_proj", "v_proj"]
# Hugging Face peft's default targets of its low-rank methods (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
# copied for each of them), for the common models.
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bloom", "gpt_neox", "RefinedWebModel", "RefinedWeb", "falcon", "chatglm"], ["query_key_value"]),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm", "deberta"], ["query", "value"]),
    **dict.fromkeys(["bart", "opt", "gptj", "gpt_neo", "llama", "mistral", "mixtral", "stablelm", "gemma"], _QV),
    **dict.fromkeys(["gemma2", "gemma3_text", "qwen2", "qwen3", "phi3", "whisper", "clip"], _QV),
    "deberta-v2": ["query_proj", "value_proj"],
    "mpt": ["Wqkv"],
    "codegen": ["qkv_proj"],
}


# ---- the factors' maths ----------------------------------------------------------------------------------------
def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The Tucker form of a convolution kernel (FedPara, Hyeon-Woo et al. 2022, Proposition 3):
    W[p, r, k, l] = sum_ij core[i, j, k, l] a[i, p] b[j, r]; core (r1, r2, kh, kw), a (r1, out), b (r2, in)."""
    return torch.einsum("ijkl,ip,jr->prkl", core, a, b)  # (out, in, kh, kw)


def kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(w1, w2) for w1 (a, b) and w2 (c, d) or a kernel (c, d, *k): (a c, b d) or (a c, b d, *k); w1 gets
    trailing unit dimensions (torch.kron would put them in front and mix the kernel into the channels)."""
    w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))
    return torch.kron(w1, w2.clone(memory_format=torch.contiguous_format))  # dense strides, size-1 dims included


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m n = dimension, as Hugging Face peft's LoKr splits a dimension.

    ``factor`` > 0 dividing ``dimension``: (factor, dimension / factor), in that order (12 with 4 -> (4, 3)).
    Otherwise m <= n, m growing through the divisors of ``dimension`` while m + n shrinks and m <= factor (-1: no
    bound), so the pair ends near the square root: 256 -> (16, 16), 128 -> (8, 16), 127 -> (1, 127)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        step = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if step + dimension // step > m + n or step > bound:
            break
        m, n = step, dimension // step
    return min(m, n), max(m, n)


def kaiming_(tensor: torch.Tensor) -> torch.Tensor:
    """nn.Linear's default initialisation (Kaiming-uniform with a = sqrt(5)), the one peft uses for these factors."""
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


# ---- the shared config fields ----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class FactorisedConfig(TargetingConfig):
    """The fields Hugging Face peft's LyCORIS-style configs share (``LycorisConfig`` and the common ones)."""

    default_target_modules: ClassVar[dict[str, list[str]]] = DEFAULT_TARGETS

    r: int = field(default=8, metadata={"help": "Rank of the factors."})
    alpha: float = field(default=8, metadata={"help": "Scale numerator: the update is multiplied by alpha / r."})
    rank_dropout: float = field(
        default=0.0, metadata={"help": "Training: probability of zeroing each output row of the update."}
    )
    module_dropout: float = field(
        default=0.0, metadata={"help": "Training: probability of skipping the whole adapter for a step."}
    )
    use_effective_conv2d: bool = field(
        default=False, metadata={"help": "Tucker form of convolution kernels larger than 1 (FedPara Proposition 3)."}
    )
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Per-module rank: {regex: r}."})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": "Per-module alpha: {regex: a}."})

    def problems(self) -> list[str]:
        problems = super().problems()
        if not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"r={self.r!r} must be a positive integer (typical: 4, 8, 16).")
        for name in ("rank_dropout", "module_dropout"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r} must be in [0, 1).")
        bad = {k: v for k, v in self.rank_pattern.items() if v <= 0}
        if bad:
            problems.append(f"rank_pattern has non-positive ranks {bad}; every rank must be a positive integer.")
        if self.layers_pattern and self.layers_to_transform is None:
            problems.append("layers_pattern is set but layers_to_transform is not; give both or neither.")
        return problems

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.alpha)


def _pattern_value(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    """peft's rule: the first key (a regex) that matches the end of the module's name, at a dot."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


# ---- the layer -------------------------------------------------------------------------------------------------
class FactorisedLayer(AdditiveLayer):
    """A Linear / Conv1d / Conv2d with, per adapter, an update s · ΔW built from factors (see the module docstring).

    Subclasses list their factor containers in ``adapter_param_names``, create them in ``update_layer`` (after
    :meth:`set_scale`) and give the unscaled ΔW in ``factor_delta``."""

    adapter_other_names = ("r", "alpha", "scaling", "rank_dropout", "module_dropout", "rank_dropout_scale")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}

    def set_scale(self, adapter_name: str, config: FactorisedConfig, module_name: str, rescale: bool) -> int:
        """Record the adapter's r, alpha, s = alpha / r and dropouts (``rescale``: rank dropout divides by the kept
        share); return r."""
        r, alpha = config.rank_for(module_name), config.alpha_for(module_name)
        self.r[adapter_name], self.alpha[adapter_name], self.scaling[adapter_name] = r, alpha, alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
        self.rank_dropout_scale[adapter_name] = rescale
        return r

    def new_factor(self, *shape: int) -> nn.Parameter:
        """An uninitialised float32 factor on the base weight's device."""
        return nn.Parameter(torch.empty(shape, device=self.get_base_layer().weight.device))

    def factor_delta(self, name: str) -> torch.Tensor:  # pragma: no cover - interface
        """The unscaled ΔW of adapter ``name``, in any shape holding the base weight's number of elements."""
        raise NotImplementedError(f"{type(self).__name__} must implement factor_delta")

    def delta_weight(self, name: str, sample: bool = False) -> torch.Tensor:
        """s · ΔW in the base weight's shape; ``sample``: with rank dropout (whole output rows zeroed)."""
        delta = self.factor_delta(name).reshape(self.get_base_layer().weight.shape) * self.scaling[name]
        p = self.rank_dropout[name]
        if not sample or not p:
            return delta
        keep = (torch.rand(delta.shape[0], device=delta.device) > p).to(delta.dtype)  # (out,)
        if self.rank_dropout_scale[name] and keep.any():
            keep = keep / keep.mean()
        return delta * keep.view(-1, *[1] * (delta.dim() - 1))

    def base_op(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with ``weight`` and no bias: x Wᵀ, or its convolution (padding mode too)."""
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            return F.linear(x, weight)  # (..., out)
        return base._conv_forward(x, weight, None)  # (B, out, ...)

    def branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """base_op(x, s · ΔW) for adapter ``name``."""
        delta = self.delta_weight(name, sample=self.training)
        return self.base_op(x.to(delta.dtype), delta)

    def skips(self, name: str) -> bool:
        """Module dropout: while training, the whole adapter sits a call out with probability ``module_dropout``."""
        return name not in self.r or (self.training and torch.rand(1).item() < self.module_dropout[name])


def supported(module: nn.Module) -> bool:
    """What these layers wrap: nn.Linear, nn.Conv1d and nn.Conv2d (peft's LyCORIS-style methods take the same)."""
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))


SUPPORTED = "Linear, Conv1d, Conv2d"


def weight_shape(module: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    """(out, in per group, kernel size) of a Linear (kernel ()) or a convolution."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, ()
    return module.out_channels, module.in_channels // module.groups, tuple(module.kernel_size)
