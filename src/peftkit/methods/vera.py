"""VeRA: vector-based random matrix adaptation (Kopiczko, Blankevoort & Asano 2024, "VeRA: Vector-based Random
Matrix Adaptation", section 3).

One pair of random low-rank matrices A (r, in) and B (out, r) is drawn once from ``projection_prng_key``, frozen and
shared by every adapted layer; each layer trains only two scaling vectors, d (r,) and b (out,):

    h = W x + Λ_b B Λ_d A x          Λ_b = diag(vera_lambda_b), Λ_d = diag(vera_lambda_d)
    ΔW = Λ_b B Λ_d A                  (out, in); b = 0 at init (so h = W x), d = d_initial

As in Hugging Face peft, the shared pair is drawn at the largest (out, in) among the targets (Kaiming-uniform, A then
B, from a CPU generator seeded with ``projection_prng_key``) and each layer uses its top-left slice A[:, :in],
B[:out, :], so peft and peftkit draw the same values. Each adapter has its own pair. Merging adds ΔW to W (GPT-2's
Conv1D stores W as (in, out): ΔWᵀ), unmerging subtracts it. Per-row routing (``adapter_names=``) adds each row
group's own ΔW x.

The checkpoint is peft's: ``<module>.vera_lambda_b`` / ``vera_lambda_d`` per layer and, with ``save_projection``
(the default), the pair once as ``base_model.vera_A`` / ``base_model.vera_B``; without it they are re-drawn from the
key at load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from peftkit.core.inject import Injection, add_modules_to_save, own_layer_path, trainable_biases
from peftkit.core.layer import AdditiveLayer, WrapsInPlace
from peftkit.core.method import Method, Training
from peftkit.core.targeting import (
    TargetingConfig,
    base_of,
    find_targets,
    is_conv1d_gpt2,
    is_linear_like,
    resolve_targets,
)

BIASES = ("none", "all", "vera_only")
PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")  # peft's model-level keys of the shared pair

# Hugging Face peft's per-model defaults (TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING), the common models.
_QV = ["q_proj", "v_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bloom", "gpt_neox", "RefinedWebModel", "RefinedWeb", "falcon", "chatglm"], ["query_key_value"]),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "layoutlm"], ["query", "value"]),
    **dict.fromkeys(
        ["bart", "opt", "gptj", "gpt_neo", "llama", "llama4", "mistral", "mixtral", "stablelm", "phi", "gemma"], _QV
    ),
    **dict.fromkeys(["gemma2", "gemma3_text", "qwen2", "qwen3"], _QV),
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "mpt": ["Wqkv"],
    "codegen": ["qkv_proj"],
}


@dataclass(kw_only=True)
class VeraConfig(TargetingConfig):
    """VeRA's settings, with Hugging Face peft's names and defaults."""

    peft_type: ClassVar[str] = "VERA"
    default_target_modules: ClassVar[dict[str, list[str]]] = DEFAULT_TARGETS

    r: int = field(default=256, metadata={"help": "Rank of the shared random matrices (higher than LoRA's r)."})
    projection_prng_key: int = field(default=0, metadata={"help": "Seed of the shared random A and B."})
    save_projection: bool = field(
        default=True, metadata={"help": "Save A and B in the checkpoint (else re-drawn from the key at load)."}
    )
    vera_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the VeRA branch."})
    d_initial: float = field(default=0.1, metadata={"help": "Initial value of every entry of d (vera_lambda_d)."})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "Weights stored (in, out), as GPT-2's Conv1D; set per layer automatically."}
    )
    bias: str = field(default="none", metadata={"help": "Biases that also train: 'none', 'all' or 'vera_only'."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: b = 0, d = d_initial (identity at init); False: b = 1, d random."}
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        if not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"r={self.r!r} must be a positive integer (the paper uses 256 to 1024).")
        if not 0 <= self.vera_dropout < 1:
            problems.append(f"vera_dropout={self.vera_dropout!r} must be in [0, 1).")
        if self.bias not in BIASES:
            problems.append(f"bias={self.bias!r} must be one of {list(BIASES)}.")
        if self.layers_pattern and self.layers_to_transform is None:
            problems.append("layers_pattern is set but layers_to_transform is not; give both or neither.")
        return problems

    def to_dict(self) -> dict:
        out = super().to_dict()
        if out.get("exclude_modules") is None:  # not in peft's VeraConfig: written only when used
            out.pop("exclude_modules", None)
        return out


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-bound, bound) with bound = sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1] (He et al. 2015)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape, device="cpu").uniform_(-bound, bound, generator=generator)


class VeraProjection(nn.Module):
    """One adapter's frozen shared pair: A (r, in_max) and B (out_max, r), the same module in every layer."""

    def __init__(self, config: VeraConfig, out_max: int, in_max: int, device: torch.device) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        self.register_buffer("vera_A", kaiming_uniform((config.r, in_max), generator).to(device))
        self.register_buffer("vera_B", kaiming_uniform((out_max, config.r), generator).to(device))
        self.saved = config.save_projection


# ---- layer ----------------------------------------------------------------------------------------------------
class VeraLinear(AdditiveLayer, WrapsInPlace):
    """VeRA on nn.Linear and GPT-2's Conv1D: per adapter the vectors b (out,) and d (r,) around the shared A, B."""

    adapter_param_names = ("vera_lambda_b", "vera_lambda_d")
    adapter_other_names = ("vera_dropout", "vera_projection")
    root_state_keys = PROJECTION_KEYS

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.vera_projection = nn.ModuleDict()  # adapter -> VeraProjection, attached by inject after update_layer
        self.fan_in_fan_out = is_conv1d_gpt2(self.get_base_layer())

    def features(self) -> tuple[int, int]:
        """(out, in) of the base layer."""
        rows, cols = self.get_base_layer().weight.shape
        return (cols, rows) if self.fan_in_fan_out else (rows, cols)

    def update_layer(self, adapter_name: str, config: VeraConfig, module_name: str) -> None:
        out_f, _ = self.features()
        like = {"device": self.get_base_layer().weight.device, "dtype": torch.float32}
        if config.init_weights:
            b, d = torch.zeros(out_f, **like), torch.full((config.r,), float(config.d_initial), **like)
        else:
            b, d = torch.ones(out_f, **like), torch.randn(config.r, **like)
        self.vera_lambda_b[adapter_name] = nn.Parameter(b)  # (out,)
        self.vera_lambda_d[adapter_name] = nn.Parameter(d)  # (r,)
        self.vera_dropout[adapter_name] = nn.Dropout(config.vera_dropout) if config.vera_dropout else nn.Identity()

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        if adapter_name not in self.vera_lambda_b:
            return {}
        out = {"vera_lambda_b": self.vera_lambda_b[adapter_name], "vera_lambda_d": self.vera_lambda_d[adapter_name]}
        projection = self.vera_projection[adapter_name]  # attached by inject, right after update_layer
        if projection.saved:
            out.update(zip(PROJECTION_KEYS, (projection.vera_A, projection.vera_B), strict=True))
        return out

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices of the shared pair: A[:, :in] (r, in) and B[:out, :] (out, r)."""
        out_f, in_f = self.features()
        projection = self.vera_projection[name]
        return projection.vera_A[:, :in_f], projection.vera_B[:out_f, :]

    def branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Λ_b B Λ_d A x for the input ``x`` (..., in) -> (..., out)."""
        a, b = self._factors(name)
        lambda_d, lambda_b = self.vera_lambda_d[name], self.vera_lambda_b[name]
        h = self.vera_dropout[name](x.to(lambda_d.dtype)) @ a.to(lambda_d.dtype).T  # (..., r)
        return lambda_b * ((lambda_d * h) @ b.to(lambda_d.dtype).T)  # (..., out)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = Λ_b B Λ_d A, (out, in); transposed for a weight stored (in, out)."""
        a, b = self._factors(name)
        delta = (self.vera_lambda_b[name][:, None] * b) @ (self.vera_lambda_d[name][:, None] * a)
        return delta.T if self.fan_in_fan_out else delta

    def skips(self, name: str) -> bool:
        return name not in self.vera_lambda_b


# ---- attaching ----------------------------------------------------------------------------------------------
SUPPORTED = "Linear, GPT-2 Conv1D"


def largest_shape(model: nn.Module, targets: list[str]) -> tuple[int, int]:
    """The elementwise largest (out, in) among the targets: the size of the shared pair, as peft draws it."""
    shapes = []
    for name in targets:
        rows, cols = base_of(model.get_submodule(name)).weight.shape
        shapes.append((cols, rows) if is_conv1d_gpt2(base_of(model.get_submodule(name))) else (rows, cols))
    return max(s[0] for s in shapes), max(s[1] for s in shapes)


def inject(model: nn.Module, config: VeraConfig, adapter_name: str) -> None:
    """Resolve peft's default targets into the (copied) config, draw the adapter's pair, wrap, attach the pair."""
    config.target_modules = resolve_targets(model, config)
    targets = find_targets(model, config, is_linear_like, supported_label=SUPPORTED)
    config.fan_in_fan_out = any(is_conv1d_gpt2(base_of(model.get_submodule(n))) for n in targets)  # as peft saves
    device = base_of(model.get_submodule(targets[0])).weight.device
    projection = VeraProjection(config, *largest_shape(model, targets), device)
    with Injection(model, adapter_name) as inj:
        for name in targets:
            layer = inj.wrap(own_layer_path(model, name, VeraLinear), VeraLinear, config)
            layer.vera_projection[adapter_name] = projection
        add_modules_to_save(model, config, inj)


def extra_trainable(model: nn.Module, config: VeraConfig) -> dict[str, nn.Parameter]:
    """``bias="all"``: every bias of the base model; ``"vera_only"``: those of the layers VeRA wraps (peft's keys)."""
    return {} if config.bias == "none" else trainable_biases(model, config.bias == "all", VeraLinear)


METHOD = Method(
    name="vera",
    config_class=VeraConfig,
    inject=inject,
    can_merge=True,
    extra_trainable=extra_trainable,
    training=Training(learning_rate=1e-2),
)
