"""BitFit: train only the bias terms (Ben Zaken, Ravfogel & Goldberg 2022, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models", section 2).

Every targeted module with an additive bias b (Linear, GPT-2 Conv1D, convolutions, LayerNorm, GroupNorm,
BatchNorm) gets a trainable delta d per adapter, zero at init, added where the bias is added:

    h = f(x; W, b) + d  =  f(x; W, b + d)

so the base model stays frozen and untouched, adapters can be switched, disabled and routed per row, and the
checkpoint holds only the deltas (``<module>.bitfit_bias``). The task head trains whole (modules_to_save).
``bias_patterns`` picks biases by module name (all by default); the paper's minimal variant (section 4.2) trains
only the query and the second feed-forward layer's biases, b_q and b_m2. For bias-free models (Llama, T5)
``add_missing_bias=True`` gives the targeted Linear modules a bias of zero (the output head is left alone
unless a pattern names it). Merging writes ``b + d`` into the base (creating the bias where there was none);
unmerging restores the original bias bit for bit from a copy (biases are tiny), removing an added one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.combine import free_name, mean_head_copies
from peftkit.core.config import TASK_HEADS, PeftConfig
from peftkit.core.inject import inject_layers, own_layer_path
from peftkit.core.layer import AdapterLayer, ModulesToSave
from peftkit.core.merge import adapter_layers
from peftkit.core.method import AdapterHost, Method, Training
from peftkit.core.targeting import base_of, is_conv1d_gpt2, is_linear_like, iter_free_modules, output_head_names
from peftkit.errors import ConfigError, TargetNotFoundError

# Modules whose bias is added to the output's trailing dims ("last") or to its channel dim 1 ("channel").
_LAST: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm)
_CHANNEL: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
SUPPORTED = "Linear, GPT-2 Conv1D, Conv1d/2d/3d (and transposed), LayerNorm, GroupNorm, BatchNorm, InstanceNorm"


@dataclass(kw_only=True)
class BitFitConfig(PeftConfig):
    """BitFit's settings: which biases train, and whether bias-free Linear layers get one."""

    peft_type: ClassVar[str] = "BITFIT"

    bias_patterns: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules whose bias trains: names or dotted suffixes (list), a regex on the full name "
            "(string), or None for every bias. Paper's minimal variant on BERT: "
            r"r'.*(attention\.self\.query|layer\.\d+\.output\.dense)'."
        },
    )
    add_missing_bias: bool = field(
        default=False,
        metadata={"help": "Give targeted bias-free Linear layers a zero bias to train (Llama, T5)."},
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        patterns = self.bias_patterns
        if isinstance(patterns, str):
            try:
                re.compile(patterns)
            except re.error as err:
                problems.append(f"bias_patterns={patterns!r} is not a valid regex ({err}).")
        elif patterns is not None and (
            not isinstance(patterns, (list, tuple, set)) or not all(isinstance(p, str) for p in patterns)
        ):
            problems.append(f"bias_patterns={patterns!r} must be a list of module names, a regex string or None.")
        elif patterns is not None and not patterns:
            problems.append("bias_patterns=[] selects nothing; list module names or leave it None for every bias.")
        if not isinstance(self.add_missing_bias, bool):
            problems.append(f"add_missing_bias={self.add_missing_bias!r} must be True or False.")
        return problems

    def to_dict(self) -> dict:
        out = super().to_dict()
        if isinstance(self.bias_patterns, (set, tuple)):
            out["bias_patterns"] = sorted(self.bias_patterns)
        return out

    def selects(self, module_name: str) -> bool:
        patterns = self.bias_patterns
        if patterns is None:
            return True
        if isinstance(patterns, str):
            return re.fullmatch(patterns, module_name) is not None
        return any(module_name == p or module_name.endswith("." + p) for p in patterns)


def layout(module: nn.Module) -> str | None:
    """Where the module adds its bias: "last" (trailing dims), "channel" (dim 1) or None (not supported)."""
    if isinstance(module, _LAST) or is_conv1d_gpt2(module):
        return "last"
    if isinstance(module, _CHANNEL):
        return "channel"
    return None


def bias_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape the module's bias has, or would have."""
    if is_conv1d_gpt2(module):
        return (module.nf,)
    if isinstance(module, nn.Linear):
        return (module.out_features,)
    if isinstance(module, nn.LayerNorm):
        return tuple(module.normalized_shape)
    if isinstance(module, nn.GroupNorm):
        return (module.num_channels,)
    return (getattr(module, "out_channels", None) or module.num_features,)


def has_bias(module: nn.Module) -> bool:
    return isinstance(getattr(module, "bias", None), nn.Parameter)


# ---- layer ----------------------------------------------------------------------------------------------------
class BitFitLayer(AdapterLayer):
    """A per-adapter bias delta added to a module's output where its bias is added."""

    adapter_param_names = ("bitfit_bias",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bitfit_bias = nn.ParameterDict()
        self.layout = layout(self.get_base_layer())
        self._original: tuple[torch.Tensor | None] | None = None  # the bias before merging (None: there was none)

    def update_layer(self, adapter_name: str, config: BitFitConfig, module_name: str) -> None:
        base = self.get_base_layer()
        ref = next((t for t in (getattr(base, "bias", None), getattr(base, "weight", None)) if t is not None), None)
        dtype = ref.dtype if ref is not None and ref.dtype in (torch.float32, torch.float64) else torch.float32
        device = ref.device if ref is not None else None
        self.bitfit_bias[adapter_name] = nn.Parameter(torch.zeros(bias_shape(base), dtype=dtype, device=device))

    def _shaped(self, delta: torch.Tensor, out_dim: int, batched: bool) -> torch.Tensor:
        """(*bias), or (B, *bias) when ``batched``, -> a shape that broadcasts over an output of ``out_dim`` dims."""
        lead = tuple(delta.shape[:1]) if batched else ()
        bias = tuple(delta.shape[len(lead) :])
        if self.layout == "last":
            return delta.reshape(*lead, *[1] * (out_dim - len(lead) - len(bias)), *bias)  # (B?, 1.., *bias)
        return delta.reshape(*lead, *bias, *[1] * (out_dim - 1 - len(bias)))  # (B?, C, 1..)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)  # (B, ..., out) or (B, C, ...)
        if self.routing is not None and not self.disabled:
            names = self.routing.names
            if not any(n in self.bitfit_bias for n in names):
                return result
            probe = next(iter(self.bitfit_bias.values()))
            stack = torch.stack(
                [self.bitfit_bias[n] if n in self.bitfit_bias else torch.zeros_like(probe) for n in names]
            )
            delta = stack[self.routing.rows(result.shape[0])]  # (B, *bias): gathered, no loop over rows
            return result + self._shaped(delta, result.dim(), batched=True).to(result.dtype)
        for name in self.live_adapters():
            if name in self.bitfit_bias:
                result = result + self._shaped(self.bitfit_bias[name], result.dim(), False).to(result.dtype)
        return result

    # ---- merging: b <- b + d; unmerge restores the saved original exactly ---------------------------------
    @torch.no_grad()
    def merge(self, adapter_names: list[str]) -> None:
        base = self.get_base_layer()
        if not self.merged_adapters:
            self._original = (base.bias.detach().clone() if has_bias(base) else None,)
        for name in adapter_names:
            delta = self.bitfit_bias[name]
            if not has_bias(base):  # add the bias the model lacked (frozen, like every base tensor)
                dtype = base.weight.dtype if getattr(base, "weight", None) is not None else delta.dtype
                base.bias = nn.Parameter(torch.zeros_like(delta, dtype=dtype), requires_grad=False)
            base.bias.add_(delta.to(base.bias.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged_adapters:
            return
        base = self.get_base_layer()
        (original,) = self._original
        if original is None:
            base.bias = None  # remove the bias merge added
        else:
            base.bias.copy_(original)
        self.merged_adapters.clear()
        self._original = None


# ---- attaching ----------------------------------------------------------------------------------------------
def find_bias_targets(model: nn.Module, config: BitFitConfig) -> list[str]:
    """Modules whose bias the adapter trains; raises, naming the candidates, when there is none."""
    heads = output_head_names(model)
    keep = [*(config.modules_to_save or []), *TASK_HEADS.get(config.task_type or "", ())]
    found, bias_free = [], []
    for name, module in iter_free_modules(model):
        base = base_of(module)
        if isinstance(module, ModulesToSave) or layout(base) is None or not config.selects(name):
            continue
        if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in keep):
            continue
        if has_bias(base):
            found.append(name)
        elif config.add_missing_bias and (config.bias_patterns is not None or is_linear_like(base)):
            if config.bias_patterns is not None or name not in heads:
                found.append(name)
        elif is_linear_like(base):
            bias_free.append(name)
    if found:
        return found
    candidates = sorted({".".join(n.split(".")[-2:]) for n, m in iter_free_modules(model) if has_bias(base_of(m))})
    hint = (
        f" {len(bias_free)} matching Linear layers have no bias (e.g. {bias_free[:3]!r}): pass add_missing_bias=True "
        "to give them one."
        if bias_free
        else ""
    )
    shown = ", ".join(repr(c) for c in candidates[:16]) or "(none: the model has no bias terms)"
    raise TargetNotFoundError(
        f"No bias matched bias_patterns={config.bias_patterns!r}.{hint} Modules with a bias ({SUPPORTED}): "
        f"{shown}. Use names or dotted suffixes such as ['query', 'output.dense'], a regex, or None for all."
    )


def dispatch(module: nn.Module) -> type[BitFitLayer] | None:
    return BitFitLayer if layout(module) is not None else None


def inject(model: nn.Module, config: BitFitConfig, adapter_name: str) -> None:
    targets = [own_layer_path(model, n, BitFitLayer) for n in find_bias_targets(model, config)]
    inject_layers(model, config, adapter_name, targets, dispatch)


# ---- combining adapters (PeftModel.add_weighted_adapter) ---------------------------------------------------
def combine(
    peft_model: AdapterHost, adapters: list[str], weights: list[float], new_name: str, combination_type: str, **_: Any
) -> None:
    """``linear``: d_new = sum_i w_i d_i per module (an adapter that does not target the module counts as d_i = 0,
    its identity). The task heads' copies become their weights-weighted mean."""
    if combination_type != "linear":
        raise ConfigError(
            f"combination_type={combination_type!r}: BitFit adapters combine only with 'linear' (a weighted sum of "
            "the bias deltas). Use add_weighted_adapter(..., combination_type='linear')."
        )
    before = _deltas_by_module(peft_model)
    layers = sorted(name for name, held in before.items() if any(n in held for n in adapters))
    configs = [peft_model.peft_config[n] for n in adapters]
    config = configs[0].replace(bias_patterns=layers, add_missing_bias=any(c.add_missing_bias for c in configs))
    peft_model.add_adapter(new_name, config)
    try:
        with torch.no_grad():
            for held in _deltas_by_module(peft_model).values():
                parts = [w * held[n] for n, w in zip(adapters, weights, strict=True) if n in held]
                if parts:
                    held[new_name].copy_(sum(parts))
            mean_head_copies(peft_model, adapters, weights, new_name)
    except Exception:
        peft_model.delete_adapter(new_name)
        raise


def _deltas_by_module(peft_model: AdapterHost) -> dict[str, dict[str, nn.Parameter]]:
    """module name -> {adapter: delta}, across BitFit wrappers at that module (another method may sit between)."""
    out: dict[str, dict[str, nn.Parameter]] = {}
    for path, layer in adapter_layers(peft_model.model):
        if isinstance(layer, BitFitLayer):
            out.setdefault(free_name(path), {}).update(layer.bitfit_bias.items())
    return out


METHOD = Method(
    name="bitfit",
    config_class=BitFitConfig,
    inject=inject,
    can_merge=True,
    combine=combine,
    training=Training(learning_rate=5e-3),
)
