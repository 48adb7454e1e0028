"""(IA)3: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", section 3.3).

Learned vectors rescale activations elementwise. On the attention key and value projections the vector scales
the output; on the feed-forward projection (peft's ``feedforward_modules``) it scales the input:

    k/v:           h = l ⊙ (W x + b)          l: (out,), all ones at init, so h = W x + b
    feed-forward:  h = W (l ⊙ x) + b          l: (in,)

Both are a rescaling of W, so merging is ``W * s`` (rows for k/v, columns for feed-forward; k/v also scale b)
and unmerging is its exact inverse ``W / s``. Division by a scale near zero would lose the weight (W * 0 = 0), so
merge copies the few weight slices whose scale has ``|l| < UNMERGE_GUARD`` and unmerge writes those copies back
verbatim and divides only the rest, by the scale used at merge time. Several active adapters multiply.

Layers: nn.Linear, GPT-2's Conv1D (weight stored (in, out)) and nn.Conv2d / nn.Conv3d (the vector scales output
channels, or input channels for feed-forward, grouped convolutions included), as in peft. The checkpoint is
peft's: one tensor ``<module>.ia3_l`` per layer, shaped (out, 1) or (1, in) for linear layers and
(1, C, 1, 1[, 1]) for convolutions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core import quantized
from peftkit.core.combine import free_name, mean_head_copies
from peftkit.core.inject import inject_layers, own_layer_path
from peftkit.core.layer import AdapterLayer
from peftkit.core.merge import adapter_layers
from peftkit.core.method import AdapterHost, Method, Training
from peftkit.core.targeting import (
    TargetingConfig,
    base_of,
    find_targets,
    is_conv1d_gpt2,
    model_type,
    resolve_targets,
)
from peftkit.errors import ConfigError

UNMERGE_GUARD = 1e-3  # |scale| below this: the weight slice is copied at merge, not recovered by division

# Hugging Face peft's per-model defaults (TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING).
_LLM_QV_DOWN = ["q_proj", "v_proj", "down_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": _LLM_QV_DOWN,
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    **dict.fromkeys(["RefinedWebModel", "RefinedWeb", "falcon"], ["query_key_value", "dense_4h_to_h"]),
    "phi": ["q_proj", "v_proj", "fc2"],
    **dict.fromkeys(["gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"], _LLM_QV_DOWN),
}
DEFAULT_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["mlp.c_proj"]),
    "bloom": ["mlp.dense_4h_to_h"],
    **dict.fromkeys(["roberta", "bert", "deberta-v2", "deberta"], ["output.dense"]),
    **dict.fromkeys(["opt", "bart", "phi"], ["fc2"]),
    "gptj": ["fc_out"],
    **dict.fromkeys(["gpt_neox", "RefinedWeb", "RefinedWebModel", "falcon"], ["dense_4h_to_h"]),
    "gpt_neo": ["c_proj"],
    **dict.fromkeys(["llama", "llama4", "mistral", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"], ["down_proj"]),
    "mixtral": ["w2"],
}


@dataclass(kw_only=True)
class IA3Config(TargetingConfig):
    """(IA)3's settings, with Hugging Face peft's names and defaults."""

    peft_type: ClassVar[str] = "IA3"
    default_target_modules: ClassVar[dict[str, list[str]]] = DEFAULT_TARGETS

    feedforward_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Targets whose input (not output) is scaled, as the paper's feed-forward vectors: names "
            "(a module matches when its name ends with one) or a regex; default per model type, else none."
        },
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "Weights stored (in, out), as GPT-2's Conv1D; set per layer automatically."}
    )
    init_ia3_weights: bool = field(
        default=True, metadata={"help": "True: vectors start at 1 (identity); False: random (discouraged)."}
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        ff, targets = self.feedforward_modules, self.target_modules
        if isinstance(ff, str):
            try:
                re.compile(ff)
            except re.error as err:
                problems.append(f"feedforward_modules={ff!r} is not a valid regex ({err}).")
        if isinstance(ff, (list, tuple, set)) and isinstance(targets, (list, tuple, set)):
            extra = sorted(set(ff) - set(targets))
            if extra:
                problems.append(
                    f"feedforward_modules={sorted(ff)!r} names {extra!r}, which are not in target_modules="
                    f"{sorted(targets)!r}; feedforward_modules must be a subset of target_modules (add them there)."
                )
        if not isinstance(self.init_ia3_weights, bool):
            problems.append(f"init_ia3_weights={self.init_ia3_weights!r} must be True or False.")
        return problems

    def to_dict(self) -> dict:
        out = super().to_dict()
        if isinstance(self.feedforward_modules, (set, tuple)):
            out["feedforward_modules"] = sorted(self.feedforward_modules)
        for key in ("layers_to_transform", "layers_pattern"):  # not in peft's IA3Config: written only when used
            if out.get(key) is None:
                out.pop(key, None)
        return out

    def is_feedforward(self, module_name: str) -> bool:
        """peft's rule: a regex must match the full name; a list entry matches a name that ends with it."""
        ff = self.feedforward_modules or []
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        return any(module_name.endswith(key) for key in ff)


# ---- layers -------------------------------------------------------------------------------------------------
class IA3Layer(AdapterLayer):
    """One learned vector ``ia3_l`` per adapter, scaling the output (k/v) or the input (feed-forward).

    Subclasses say how the vector lines up with the activation (``act_scale``) and with the weight
    (``weight_scale``); merge, unmerge, routing and the product over active adapters are shared.
    """

    adapter_param_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = False
        # adapter -> (scale used at merge, weight mask, weight copies, bias copies) for exact unmerge
        self._merge_state: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def param_shape(self, features: int) -> tuple[int, ...]:  # pragma: no cover - interface
        raise NotImplementedError

    def act_scale(self, vector: torch.Tensor, ndim: int) -> torch.Tensor:  # pragma: no cover - interface
        """(F,) -> a shape that broadcasts over an activation of ``ndim`` dims."""
        raise NotImplementedError

    def weight_scale(self, vector: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """(F,) -> a shape that broadcasts over the base weight (rows, columns or channels it scales)."""
        raise NotImplementedError

    def features(self) -> tuple[int, int]:  # pragma: no cover - interface
        """(in, out) of the base layer."""
        raise NotImplementedError

    def update_layer(self, adapter_name: str, config: IA3Config, module_name: str) -> None:
        module_name = free_name(module_name)
        is_ff = config.is_feedforward(module_name)
        if self.ia3_l and is_ff != self.is_feedforward:
            raise ConfigError(
                f"{module_name!r} is a feed-forward (IA)3 layer for one adapter and a key/value one for another; "
                "give both adapters the same feedforward_modules."
            )
        self.is_feedforward = is_ff
        in_f, out_f = self.features()
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        init = torch.ones if config.init_ia3_weights else torch.randn
        shape = self.param_shape(in_f if is_ff else out_f)
        self.ia3_l[adapter_name] = nn.Parameter(init(shape, dtype=dtype, device=weight.device))

    def vector(self, adapter_name: str) -> torch.Tensor:
        return self.ia3_l[adapter_name].reshape(-1)  # (F,)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._merge_state.pop(adapter_name, None)

    # ---- merging: W * s and its exact inverse -------------------------------------------------------------
    @torch.no_grad()
    def merge(self, adapter_names: list[str]) -> None:
        base = self.get_base_layer()
        for name in adapter_names:
            vec = self.vector(name).detach().clone()  # (F,)
            scale = self.weight_scale(vec).to(base.weight.dtype)
            mask = (scale.abs() < UNMERGE_GUARD).expand_as(base.weight)
            saved_w = base.weight.masked_select(mask)
            saved_b = None
            if not self.is_feedforward and base.bias is not None:
                saved_b = base.bias[vec.abs() < UNMERGE_GUARD].clone()
                base.bias.mul_(vec.to(base.bias.dtype))
            base.weight.mul_(scale)
            self._merge_state[name] = (vec, mask, saved_w, saved_b)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            vec, mask, saved_w, saved_b = self._merge_state.pop(name)
            small = vec.abs() < UNMERGE_GUARD
            safe = torch.where(small, torch.ones_like(vec), vec)  # no division by ~0: those slices are copied back
            base.weight.div_(self.weight_scale(safe).to(base.weight.dtype))
            base.weight.masked_scatter_(mask, saved_w)
            if saved_b is not None:
                base.bias.div_(safe.to(base.bias.dtype))
                base.bias[small] = saved_b

    # ---- forward -------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.routing is not None and not self.disabled:
            scale = self._routed_scale(x.shape[0], x.dim())  # (B, ...) broadcastable, ones for the base model
        else:
            live = [n for n in self.live_adapters() if n in self.ia3_l]
            if not live:
                return self.base_layer(x, *args, **kwargs)
            vec = self.vector(live[0])
            for name in live[1:]:
                vec = vec * self.vector(name)  # several active adapters: the scales multiply
            scale = self.act_scale(vec, x.dim())
        if self.is_feedforward:
            return self.base_layer((x * scale.to(x.dtype)), *args, **kwargs)  # W (l ⊙ x) + b
        result = self.base_layer(x, *args, **kwargs)
        return result * scale.to(result.dtype)  # l ⊙ (W x + b)

    def _routed_scale(self, batch: int, ndim: int) -> torch.Tensor:
        """Per-row scales gathered from a stack (no loop over rows): row i gets its adapter's vector."""
        names = self.routing.names
        probe = self.ia3_l[next(iter(self.ia3_l))]
        size = probe.numel()
        stack = torch.stack(  # (n, F): ones for the base model and for adapters this layer lacks
            [self.vector(n) if n in self.ia3_l else probe.new_ones(size) for n in names]
        )
        rows = self.routing.rows(batch)  # (B,)
        return self.act_scale(stack[rows], ndim)


class IA3Linear(IA3Layer):
    """(IA)3 on nn.Linear and GPT-2's Conv1D: the vector acts on the last dimension of the activation."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = is_conv1d_gpt2(self.get_base_layer())

    def features(self) -> tuple[int, int]:
        rows, cols = self.get_base_layer().weight.shape
        return (rows, cols) if self.fan_in_fan_out else (cols, rows)

    def param_shape(self, features: int) -> tuple[int, ...]:
        return (1, features) if self.is_feedforward else (features, 1)  # peft's shapes

    def act_scale(self, vector: torch.Tensor, ndim: int) -> torch.Tensor:
        if vector.dim() == 1:
            return vector  # (F,) over (..., F)
        return vector.reshape(vector.shape[0], *[1] * (ndim - 2), vector.shape[-1])  # (B, 1.., F)

    def weight_scale(self, vector: torch.Tensor) -> torch.Tensor:
        # Linear W: (out, in); Conv1D W: (in, out). Output scale hits the out axis, input scale the in axis.
        out_axis = 1 if self.fan_in_fan_out else 0
        scales_rows = (out_axis == 0) != self.is_feedforward
        return vector[:, None] if scales_rows else vector[None, :]


class IA3Conv(IA3Layer):
    """(IA)3 on nn.Conv2d / nn.Conv3d: the vector scales channels (dim 1 of the activation)."""

    def features(self) -> tuple[int, int]:
        base = self.get_base_layer()
        return base.in_channels, base.out_channels

    def param_shape(self, features: int) -> tuple[int, ...]:
        return (1, features) + (1,) * (self.get_base_layer().weight.dim() - 2)

    def act_scale(self, vector: torch.Tensor, ndim: int) -> torch.Tensor:
        batch = (1,) if vector.dim() == 1 else (vector.shape[0],)
        return vector.reshape(*batch, vector.shape[-1], *[1] * (ndim - 2))  # (1 or B, C, 1, ...)

    def weight_scale(self, vector: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()  # W: (out, in / groups, *kernel)
        spatial = [1] * (base.weight.dim() - 2)
        if not self.is_feedforward:
            return vector.reshape(-1, 1, *spatial)  # scale output channels
        groups, per_in = base.groups, base.in_channels // base.groups
        per_out = base.out_channels // groups
        # input channel g * per_in + j feeds only the out channels of group g, at position j of their kernel
        grouped = vector.reshape(groups, 1, per_in).expand(groups, per_out, per_in)
        return grouped.reshape(base.out_channels, per_in, *spatial)


# ---- attaching ----------------------------------------------------------------------------------------------
SUPPORTED = "Linear, GPT-2 Conv1D, Conv2d, Conv3d"


def dispatch(module: nn.Module) -> type[IA3Layer] | None:
    if quantized.is_quantized(module):  # bitsandbytes 4/8-bit, torchao int8 (its file builds on IA3Linear)
        from peftkit.methods.ia3_quantized import QuantizedIA3Linear

        return QuantizedIA3Linear
    if isinstance(module, nn.Linear) or is_conv1d_gpt2(module):
        return IA3Linear
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        return IA3Conv
    return None


def inject(model: nn.Module, config: IA3Config, adapter_name: str) -> None:
    """Resolve peft's per-model defaults into the (copied) config, so it is saved explicit, then wrap."""
    config.target_modules = resolve_targets(model, config)
    if config.feedforward_modules is None:
        config.feedforward_modules = list(DEFAULT_FEEDFORWARD.get(model_type(model), []))
    targets = find_targets(model, config, lambda m: dispatch(m) is not None, supported_label=SUPPORTED)
    # layers detect the (in, out) storage themselves; the saved flag says so, as peft writes it for GPT-2
    config.fan_in_fan_out = any(is_conv1d_gpt2(base_of(model.get_submodule(n))) for n in targets)
    inject_layers(model, config, adapter_name, [own_layer_path(model, n, IA3Layer) for n in targets], dispatch)


# ---- combining adapters (PeftModel.add_weighted_adapter) ---------------------------------------------------
def combine(
    peft_model: AdapterHost, adapters: list[str], weights: list[float], new_name: str, combination_type: str, **_: Any
) -> None:
    """``linear``: l_new = sum_i w_i l_i per layer, where an adapter that does not target the layer counts as
    l_i = 1 (the identity; peft counts it as 0). The task heads' copies become their weights-weighted mean."""
    if combination_type != "linear":
        raise ConfigError(
            f"combination_type={combination_type!r}: (IA)3 adapters combine only with 'linear' (a weighted sum of "
            "the scaling vectors). Use add_weighted_adapter(..., combination_type='linear')."
        )
    before = _vectors_by_module(peft_model)
    layers = sorted(name for name, (held, _) in before.items() if any(n in held for n in adapters))
    config = peft_model.peft_config[adapters[0]].replace(
        target_modules=layers,
        feedforward_modules=[name for name in layers if before[name][1]],
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
    )
    peft_model.add_adapter(new_name, config)
    try:
        with torch.no_grad():
            for name, (held, _) in _vectors_by_module(peft_model).items():
                if name in layers:
                    parts = [w * held.get(n, 1.0) for n, w in zip(adapters, weights, strict=True)]
                    held[new_name].copy_(sum(parts))
            mean_head_copies(peft_model, adapters, weights, new_name)
    except Exception:
        peft_model.delete_adapter(new_name)
        raise


def _vectors_by_module(peft_model: AdapterHost) -> dict[str, tuple[dict[str, nn.Parameter], bool]]:
    """module name -> ({adapter: vector}, is feed-forward), across (IA)3 wrappers at that module."""
    out: dict[str, tuple[dict[str, nn.Parameter], bool]] = {}
    for path, layer in adapter_layers(peft_model.model):
        if isinstance(layer, IA3Layer):
            held, _ = out.setdefault(free_name(path), ({}, layer.is_feedforward))
            held.update(layer.ia3_l.items())
    return out


METHOD = Method(
    name="ia3",
    config_class=IA3Config,
    inject=inject,
    can_merge=True,
    combine=combine,
    training=Training(learning_rate=1e-2),
)
