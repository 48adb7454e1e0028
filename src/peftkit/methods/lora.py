"""LoRA: low-rank adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen weight W gets a trainable low-rank update (section 4.1, eq. 3):

    h = W x + (alpha / r) * B A x          A: (r, in), B: (out, r), B = 0 at init so h = W x

rsLoRA (Kalajdzievski 2023) scales by alpha / sqrt(r) instead, which keeps the update's magnitude stable as r
grows. Merging is ``W += s * B A`` and its exact inverse ``W -= s * B A``.

Layers: nn.Linear and GPT-2's Conv1D (weight stored transposed, "fan_in_fan_out"), nn.Embedding (A acts as
an embedding table, as in peft), and nn.Conv1d / nn.Conv2d, where A is a convolution with the base layer's
kernel, stride and padding and B a 1x1 convolution, so ΔW[o, i, ...] = s * sum_r B[o, r] A[r, i, ...].
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.combine import COMBINATIONS, combine_tensors, mean_head_copies, svd_factors
from peftkit.core.inject import inject_layers
from peftkit.core.layer import AdapterLayer, ModulesToSave
from peftkit.core.merge import adapter_layers
from peftkit.core.method import AdapterHost, Method, Training
from peftkit.core.targeting import TargetingConfig, base_of, find_targets, is_conv1d_gpt2, iter_free_modules
from peftkit.errors import CheckpointError, ConfigError, choices

BIAS_CHOICES = ("none", "all", "lora_only")
INIT_CHOICES = (True, False, "gaussian")


@dataclass(kw_only=True)
class LoraConfig(TargetingConfig):
    """LoRA's settings, with Hugging Face peft's names and defaults."""

    peft_type: ClassVar[str] = "LORA"
    default_target_modules: ClassVar[dict[str, list[str]]] = {
        **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "deberta", "layoutlm"], ["query", "value"]),
        "deberta-v2": ["query_proj", "value_proj"],
        "distilbert": ["q_lin", "v_lin"],
        "gpt2": ["c_attn"],
        "gpt_neox": ["query_key_value"],
        **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
        **dict.fromkeys(
            [
                "llama",
                "mistral",
                "mixtral",
                "qwen2",
                "qwen3",
                "gemma",
                "gemma2",
                "opt",
                "bart",
                "whisper",
                "clip",
                "clip_text_model",
                "clip_vision_model",
                "phi3",
                "olmo",
                "starcoder2",
            ],
            ["q_proj", "v_proj"],
        ),
        "phi": ["q_proj", "v_proj", "fc1", "fc2"],
        "UNet2DConditionModel": ["to_q", "to_k", "to_v", "to_out.0"],
    }
    foreign_defaults: ClassVar[dict[str, Any]] = {
        "use_dora": False,
        "lora_bias": False,
        "layer_replication": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "use_qalora": False,
        "qalora_group_size": 16,
        "trainable_token_indices": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "target_parameters": None,
        "alora_invocation_tokens": None,
        "arrow_config": None,
        "ensure_weight_tying": False,
        "kasa_config": None,
        "lora_ga_config": None,
        "monteclora_config": None,
        "use_bdlora": None,
        "velora_config": None,
        "runtime_config": None,
    }

    r: int = field(default=8, metadata={"help": "Rank of the update B A."})
    lora_alpha: float = field(default=8, metadata={"help": "Scale numerator: the update is multiplied by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "Weights stored (in, out), as GPT-2's Conv1D; set per layer automatically."}
    )
    bias: str = field(default="none", metadata={"help": "Which biases also train: 'none', 'all' or 'lora_only'."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale by alpha / sqrt(r) (rank-stabilised LoRA)."})
    init_lora_weights: bool | str = field(
        default=True, metadata={"help": "True: B = 0 (identity at start); 'gaussian': A ~ N(0, 1/r); False: random."}
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-module rank: {name-or-regex: r}."}
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Per-module alpha: {name-or-regex: alpha}."}
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            problems.append(f"r={self.r!r} must be a positive integer (typical: 4, 8, 16).")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout={self.lora_dropout!r} must be in [0, 1).")
        if self.bias not in BIAS_CHOICES:
            problems.append(f"bias={self.bias!r} is not one of {choices(BIAS_CHOICES)}.")
        if self.init_lora_weights not in INIT_CHOICES or (
            isinstance(self.init_lora_weights, int) and not isinstance(self.init_lora_weights, bool)
        ):
            problems.append(f"init_lora_weights={self.init_lora_weights!r} must be True, False or 'gaussian'.")
        bad = {k: v for k, v in self.rank_pattern.items() if not isinstance(v, int) or v <= 0}
        if bad:
            problems.append(f"rank_pattern has non-positive ranks {bad}; every rank must be a positive integer.")
        return problems

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)


def _pattern_value(pattern: dict, module_name: str, default):
    """peft's rule: a key matches a module whose name ends with it (regex allowed)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


# ---- layers -------------------------------------------------------------------------------------------------
class LoraLayer(AdapterLayer):
    """What every LoRA layer shares: ranks, scalings, merge as W ± ΔW, and per-row routing.

    Subclasses create the factors (``create``), give them as matrices (``factors``: A (r, in), B (out, r))
    and turn them into a weight-shaped delta (``delta_weight``).
    """

    adapter_other_names = ("lora_dropout", "scaling", "r")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.r: dict[str, int] = {}
        self._stack_cache: tuple[Any, Any] | None = None

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        r, alpha = config.rank_for(module_name), config.alpha_for(module_name)
        self.r[adapter_name] = r
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        p = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        with torch.device("meta"):  # no throw-away init: allocate once on the base's device, initialise once
            self.create(adapter_name, r)
        for attr in self.adapter_param_names:
            holder = getattr(self, attr)
            if isinstance(holder[adapter_name], nn.Parameter):
                holder[adapter_name] = nn.Parameter(
                    torch.empty_like(holder[adapter_name], device=weight.device, dtype=dtype)
                )
            else:
                holder[adapter_name].to_empty(device=weight.device).to(dtype)
        with torch.no_grad():
            self.reset(adapter_name, config.init_lora_weights)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: model code reads it through the wrapper (T5 casts to ``wo.weight.dtype``)."""
        return self.get_base_layer().weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.get_base_layer().bias

    def create(self, adapter_name: str, r: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def reset(self, adapter_name: str, init: bool | str) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def merge(self, adapter_names: list[str]) -> None:
        weight = self.get_base_layer().weight
        with torch.no_grad():
            for name in adapter_names:
                weight += self.delta_weight(name).to(weight.dtype)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        with torch.no_grad():
            while self.merged_adapters:
                weight -= self.delta_weight(self.merged_adapters.pop()).to(weight.dtype)

    @torch.no_grad()
    def stacked_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Routed adapters' factors, ranks zero-padded: A (n, in, r_max), B (n, r_max, out), scaling folded
        into B, zeros for the base model. Cached until a factor changes (tensor version counters)."""
        names = self.routing.names
        params = [p for n in names if n in self.r for p in self.adapter_parameters(n)]
        key = (names, dtype, tuple((id(p), p._version) for p in params), tuple(self.scaling.get(n) for n in names))
        if self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1]
        r_max = max((self.r[n] for n in names if n in self.r), default=1)
        probe_a, probe_b = self.factors(next(n for n in names if n in self.r))
        a_stack = probe_a.new_zeros(len(names), probe_a.shape[1], r_max, dtype=dtype)
        b_stack = probe_b.new_zeros(len(names), r_max, probe_b.shape[0], dtype=dtype)
        for k, name in enumerate(names):
            if name in self.r:
                a, b = self.factors(name)
                a_stack[k, :, : a.shape[0]] = a.T
                b_stack[k, : b.shape[1], :] = (b * self.scaling[name]).T
        self._stack_cache = (key, (a_stack, b_stack))
        return a_stack, b_stack

    def has_routed_adapters(self) -> bool:
        return any(n in self.r for n in self.routing.names)


class LoraLinear(LoraLayer):
    """LoRA on nn.Linear, and on GPT-2's Conv1D (``fan_in_fan_out``: weight (in, out), ΔW transposed)."""

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.fan_in_fan_out = is_conv1d_gpt2(self.get_base_layer())

    def create(self, adapter_name: str, r: int) -> None:
        out_f, in_f = self.get_base_layer().weight.shape
        if self.fan_in_fan_out:
            in_f, out_f = out_f, in_f
        self.lora_A[adapter_name] = nn.Linear(in_f, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, out_f, bias=False)

    def reset(self, adapter_name: str, init: bool | str) -> None:
        if init is False:  # the layers' own random init for A and B: not an identity at start
            self.lora_A[adapter_name].reset_parameters()
            self.lora_B[adapter_name].reset_parameters()
            return
        a = self.lora_A[adapter_name].weight
        if init == "gaussian":
            nn.init.normal_(a, std=1 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[adapter_name].weight)

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.factors(adapter_name)
        delta = (b @ a) * self.scaling[adapter_name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def _plain_weight(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor | None:
        """The base weight as (in, out) when the base is a plain Linear / Conv1D this call can bypass, else None."""
        base = self.base_layer
        plain = type(base) is nn.Linear or (self.fan_in_fan_out and is_conv1d_gpt2(base))
        if (
            not plain
            or args
            or kwargs
            or base._forward_hooks
            or base._forward_pre_hooks
            or nn.modules.module._global_forward_hooks
        ):
            return None
        weight = base.weight
        if torch.is_autocast_enabled(x.device.type):  # autocast casts addmm but not the in-place addmm_
            return None
        if x.dtype != weight.dtype or weight.dtype != next(iter(self.lora_A.values())).weight.dtype:
            return None
        return weight if self.fan_in_fan_out else weight.T

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """W x + b + sum_a s_a B_a A_a x. On a plain base layer the low-rank terms (and b) are computed first and
        the base GEMM accumulates into them (``addmm``), which saves two passes over the output."""
        routed = self.routing is not None and not self.disabled
        live = self.live_adapters() if not routed else []
        if not live and not (routed and self.has_routed_adapters()):
            return self.base_layer(x, *args, **kwargs)
        weight_t = self._plain_weight(x, *args, **kwargs)  # (in, out) or None
        if weight_t is None:
            result = self.base_layer(x, *args, **kwargs)  # (..., out)
            delta = self._routed(x, None) if routed else self._delta(x.reshape(-1, x.shape[-1]), live, None)
            return result + delta.reshape(result.shape).to(result.dtype)
        bias = self.base_layer.bias
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        delta = self._routed(x, bias) if routed else self._delta(x2, live, bias)  # (N, out)
        # in place: delta is a fresh tensor no backward needs, so the GEMM accumulates into it without a copy
        return delta.reshape(x2.shape[0], -1).addmm_(x2, weight_t).reshape(*x.shape[:-1], -1)

    def _delta(self, x2: torch.Tensor, names: list[str], bias: torch.Tensor | None) -> torch.Tensor:
        """bias + sum_a s_a (x A_a^T) B_a^T for rows x2 (N, in); the scale is applied to the small (N, r) term."""
        acc = bias
        for name in names:
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            h = lora_a(self.lora_dropout[name](x2.to(lora_a.weight.dtype))) * self.scaling[name]  # (N, r)
            acc = torch.mm(h, lora_b.weight.T) if acc is None else torch.addmm(acc, h, lora_b.weight.T)  # (N, out)
        return acc

    def _routed(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Each row through its own adapter with two batched matmuls over gathered factors (no row loop)."""
        a_stack, b_stack = self.stacked_factors(x.dtype)  # (n, in, r), (n, r, out)
        rows = self.routing.rows(x.shape[0])  # (B,)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, in)
        h = torch.bmm(flat, a_stack[rows])  # (B, T, r)
        b_rows = b_stack[rows]  # (B, r, out)
        return torch.bmm(h, b_rows) if bias is None else torch.baddbmm(bias, h, b_rows)  # (B, T, out)


class LoraEmbedding(LoraLayer):
    """LoRA on nn.Embedding: A is an (r, num_embeddings) table looked up by token id, B maps r -> dim."""

    adapter_param_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def create(self, adapter_name: str, r: int) -> None:
        num, dim = self.get_base_layer().weight.shape
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.randn(r, num))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.randn(dim, r))

    def reset(self, adapter_name: str, init: bool | str) -> None:
        if init is False:  # random A and B (standard normal): not an identity at start
            nn.init.normal_(self.lora_embedding_A[adapter_name])
            nn.init.normal_(self.lora_embedding_B[adapter_name])
            return
        nn.init.zeros_(self.lora_embedding_A[adapter_name])
        nn.init.normal_(self.lora_embedding_B[adapter_name])

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.factors(adapter_name)
        return (b @ a).T * self.scaling[adapter_name]  # (num, dim)

    def _lookup(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        return F.embedding(
            ids, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # (..., dim)
        if self.routing is not None and not self.disabled:
            return result + self._routed(x).to(result.dtype) if self.has_routed_adapters() else result
        for name in self.live_adapters():
            a, b = self.factors(name)
            h = self._lookup(x, a.T)  # (..., r)
            result = result + ((h @ b.T) * self.scaling[name]).to(result.dtype)
        return result

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        a_stack, b_stack = self.stacked_factors(self.get_base_layer().weight.dtype)  # (n, num, r), (n, r, dim)
        rows = self.routing.rows(x.shape[0])
        ids = x.reshape(x.shape[0], -1)  # (B, T)
        h = a_stack[rows[:, None], ids]  # (B, T, r)
        delta = torch.bmm(h, b_stack[rows])  # (B, T, dim)
        return delta.reshape(*x.shape, delta.shape[-1])


class _LoraConv(LoraLayer):
    """LoRA on a convolution; subclasses only name the conv class (Conv1d, Conv2d, Conv3d)."""

    adapter_param_names = ("lora_A", "lora_B")
    conv_class: ClassVar[type[nn.Module]]

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def create(self, adapter_name: str, r: int) -> None:
        base = self.get_base_layer()
        if base.groups != 1:
            raise ConfigError(f"LoRA on grouped convolutions (groups={base.groups}) is not supported; exclude it.")
        self.lora_A[adapter_name] = self.conv_class(
            base.in_channels,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
        )
        self.lora_B[adapter_name] = self.conv_class(r, base.out_channels, 1, 1, bias=False)

    reset = LoraLinear.reset

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight  # (r, in, *k), (out, r, 1..)
        delta = b.flatten(1) @ a.flatten(1)  # (out, in * prod(k))
        return delta.view(b.shape[0], *a.shape[1:]) * self.scaling[adapter_name]

    def _branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora_a = self.lora_A[name]
        return self.lora_B[name](lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype)))) * self.scaling[name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # (B, out, ...)
        if self.routing is not None and not self.disabled:
            groups = self.routed_groups(x.shape[0])  # a loop over adapters present, not over rows
            if groups:
                delta = torch.zeros_like(result)
                for name, idx in groups:
                    delta[idx] = self._branch(name, x[idx]).to(result.dtype)
                result = result + delta
            return result
        for name in self.live_adapters():
            result = result + self._branch(name, x).to(result.dtype)
        return result


class LoraConv1d(_LoraConv):
    conv_class = nn.Conv1d


class LoraConv2d(_LoraConv):
    conv_class = nn.Conv2d


class LoraConv3d(_LoraConv):
    conv_class = nn.Conv3d


# ---- attaching ----------------------------------------------------------------------------------------------
_DISPATCH: list[tuple[Any, type[LoraLayer]]] = [  # first match wins
    (nn.Linear, LoraLinear),
    (is_conv1d_gpt2, LoraLinear),
    (nn.Embedding, LoraEmbedding),
    (nn.Conv2d, LoraConv2d),
    (nn.Conv1d, LoraConv1d),
    (nn.Conv3d, LoraConv3d),
]
SUPPORTED = "Linear, Embedding, Conv1d, Conv2d, Conv3d, GPT-2 Conv1D"


def dispatch(module: nn.Module) -> type[LoraLayer] | None:
    for kind, layer_class in _DISPATCH:
        if (isinstance(kind, type) and isinstance(module, kind)) or (not isinstance(kind, type) and kind(module)):
            return layer_class
    return None


def inject(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    targets = find_targets(model, config, lambda m: dispatch(m) is not None, supported_label=SUPPORTED)
    inject_layers(model, config, adapter_name, targets, dispatch)


def extra_trainable(model: nn.Module, config: LoraConfig) -> dict[str, nn.Parameter]:
    """``bias="all"``: every bias of the base model; ``"lora_only"``: biases of the layers LoRA wraps."""
    if config.bias == "none":
        return {}
    out = {}
    for name, module in iter_free_modules(model):
        if isinstance(module, ModulesToSave):  # its trainable copy already holds (and saves) its bias
            continue
        if isinstance(module, AdapterLayer):
            if config.bias == "lora_only" and not isinstance(module, LoraLayer):
                continue
            prefix, base = _base_path(name, module)
        elif config.bias == "all" and not any(True for _ in module.children()):
            prefix, base = name, module
        else:
            continue
        if getattr(base, "bias", None) is not None and isinstance(base.bias, nn.Parameter):
            out[f"{prefix}.bias"] = base.bias
    return out


def _base_path(name: str, module: nn.Module) -> tuple[str, nn.Module]:
    path = name
    while isinstance(module, AdapterLayer):
        path, module = f"{path}.base_layer", module.base_layer
    return path, base_of(module)


# ---- combining adapters (PeftModel.add_weighted_adapter) ---------------------------------------------------
COMBINATION_CHOICES = ("svd", "linear", "cat", *(c for c in COMBINATIONS if c != "linear"))


def _factors_of(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The A and B tensors of any LoRA layer in their own shapes (A: (r, ...), B: (out, r, ...))."""
    a, b = (getattr(layer, attr)[name] for attr in layer.adapter_param_names)
    return (a if isinstance(a, nn.Parameter) else a.weight), (b if isinstance(b, nn.Parameter) else b.weight)


def _layer_plan(layer: LoraLayer, present: list[str], combination_type: str, svd_rank: int | None) -> int:
    ranks = [layer.r[n] for n in present]
    if combination_type == "cat":
        return sum(ranks)
    if combination_type == "svd":
        return svd_rank or max(ranks)
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
    pairs = [_factors_of(layer, n) for n in present]
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
    plan = {}  # path -> (layer, adapters present, new rank)
    for path, layer in adapter_layers(peft_model.model):
        present = [n for n in adapters if isinstance(layer, LoraLayer) and n in layer.r]
        if present:
            plan[path] = (layer, present, _layer_plan(layer, present, combination_type, svd_rank))
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
    )
    peft_model.add_adapter(new_name, config)
    kw = {"density": density, "majority_sign_method": majority_sign_method, "generator": generator}
    try:
        with torch.no_grad():
            for layer, present, rank in plan.values():
                w = [weights[adapters.index(n)] for n in present]
                for dst, src in zip(
                    _factors_of(layer, new_name), _combined_factors(layer, present, w, combination_type, rank, **kw)
                ):
                    dst.copy_(src)
            mean_head_copies(peft_model, adapters, weights, new_name)
    except Exception:
        peft_model.delete_adapter(new_name)
        raise


# ---- hot-swapping (peftkit.core.hotswap) ----------------------------------------------------------------------
def _lora_layers(peft_model: AdapterHost, adapter_name: str) -> list[tuple[str, LoraLayer]]:
    return [(p, m) for p, m in adapter_layers(peft_model.model) if isinstance(m, LoraLayer) and adapter_name in m.r]


def _describe(
    peft_model: AdapterHost, name: str, config: LoraConfig, scales: dict[str, float] | None = None
) -> LoraConfig:
    """``config`` restated for the loaded (padded) ranks and the scales (``scales`` overrides some), so that what
    save_pretrained writes loads back."""
    layers = _lora_layers(peft_model, name)
    scales = {p: float(m.scaling[name]) for p, m in layers} | (scales or {})
    ranks = [m.r[name] for _, m in layers]
    r0 = max(set(ranks), key=ranks.count) if ranks else config.r
    rank_pattern = {re.escape(p): m.r[name] for p, m in layers if m.r[name] != r0}
    alpha_pattern = {re.escape(p): scales[p] * m.r[name] for p, m in layers}
    return config.replace(r=r0, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_rslora=False)


def hotswap(peft_model: AdapterHost, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor]):
    """Check a checkpoint's factors against the loaded (possibly padded) ones; return the keys handled, a function
    that writes them (A into the first r rows, B into the first r columns, zeros elsewhere) and the new config."""
    writes, scales = [], {}
    for path, layer in _lora_layers(peft_model, name):
        keys, (a, b) = [f"{path}.{k}" for k in layer.adapter_state_dict(name)], _factors_of(layer, name)
        new_a, new_b = tensors[keys[0]], tensors[keys[1]]
        r = new_a.shape[0]
        if r > a.shape[0] or new_a.shape[1:] != a.shape[1:] or new_b.shape != (b.shape[0], r, *b.shape[2:]):
            raise CheckpointError(
                f"{path!r}: the checkpoint's factors {tuple(new_a.shape)}, {tuple(new_b.shape)} do not fit the loaded "
                f"{tuple(a.shape)}, {tuple(b.shape)}. Ranks above the loaded one need padding first: "
                f"prepare_model_for_compiled_hotswap(model, target_rank={r}) before compiling."
            )
        alpha = config.alpha_for(path)
        scales[path] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        writes.append((keys, layer, a, b, new_a, new_b, scales[path]))

    def commit() -> None:
        for _, layer, a, b, new_a, new_b, scale in writes:
            r = new_a.shape[0]
            a.zero_()[:r].copy_(new_a.to(a))
            b.zero_()[:, :r].copy_(new_b.to(b))
            if isinstance(layer.scaling[name], torch.Tensor):  # compile-stable: same tensor, new value
                layer.scaling[name].fill_(scale)
            else:
                layer.scaling[name] = scale

    handled = {k for keys, *_ in writes for k in keys}
    return handled, commit, _describe(peft_model, name, config, scales)


def _pad(layer: LoraLayer, attr: str, name: str, dim: int, size: int) -> None:
    """Zero-pad factor ``attr`` of adapter ``name`` along its rank dimension ``dim`` to ``size``."""
    holder = getattr(layer, attr)
    owner = holder[name]
    old = owner if isinstance(owner, nn.Parameter) else owner.weight
    shape = list(old.shape)
    shape[dim] = size - shape[dim]
    new = nn.Parameter(torch.cat([old.data, old.new_zeros(shape)], dim), requires_grad=old.requires_grad)
    if isinstance(owner, nn.Parameter):
        holder[name] = new
        return
    owner.weight = new
    for field_name in ("out_features", "out_channels") if dim == 0 else ("in_features", "in_channels"):
        if hasattr(owner, field_name):  # keep the module's repr truthful
            setattr(owner, field_name, size)


def prepare_hotswap(peft_model: AdapterHost, name: str, target_rank: int | None) -> None:
    """Pad adapter ``name`` to ``target_rank`` (zeros: same output) and hold its scales as 0-dim tensors."""
    layers = _lora_layers(peft_model, name)
    target = target_rank or max((m.r[name] for _, m in layers), default=1)
    too_big = {p: m.r[name] for p, m in layers if m.r[name] > target}
    if too_big:
        raise ConfigError(f"target_rank={target} is below adapter {name!r}'s ranks {too_big}; raise it.")
    for _, layer in layers:
        if layer.r[name] < target:
            _pad(layer, layer.adapter_param_names[0], name, 0, target)  # A: (r, ...)
            _pad(layer, layer.adapter_param_names[1], name, 1, target)  # B: (out, r, ...)
            layer.r[name] = target
        if not isinstance(layer.scaling[name], torch.Tensor):
            device = _factors_of(layer, name)[0].device
            layer.scaling[name] = torch.tensor(float(layer.scaling[name]), device=device)
    peft_model.peft_config[name] = _describe(peft_model, name, peft_model.peft_config[name])


METHOD = Method(
    name="lora",
    config_class=LoraConfig,
    inject=inject,
    can_merge=True,
    extra_trainable=extra_trainable,
    combine=combine,
    hotswap=hotswap,
    prepare_hotswap=prepare_hotswap,
    training=Training(learning_rate=2e-3),
)
