"""LN tuning: train only the normalisation layers (Zhao et al. 2023, "Tuning LayerNorm in Attention: Towards
Efficient Multi-Modal LLM Finetuning", section 3: tuning the LayerNorm gain and bias of every block is enough to adapt
a frozen LLM to a new domain, at a fraction of LoRA's parameters).

Every targeted module (LayerNorm, RMSNorm, T5LayerNorm... by default peft's per-model norm names) gets, per adapter,
a trainable copy of itself, as in Hugging Face peft's ``LNTuningConfig``. With the copy's tensors P_a and the base
module's originals W:

    one adapter:   y = norm(x; P_a)                           the copy replaces the norm (exactly peft's forward)
    several:       y = norm(x; W + sum_a (P_a - W))           each adapter adds its change to the norm's tensors

so a fresh copy (P_a = W) leaves the model unchanged. Merging writes that composition into the base tensors
(one adapter: its copy's values exactly); unmerging restores the originals bit for bit from a copy taken at the
first merge (norm tensors are tiny). Per-row routing (``adapter_names=``) runs each row group with its adapter.

The checkpoint is peft's: the copy's tensors as ``<module>.ln_tuning_layers.weight`` (and ``.bias``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from peftkit.core.inject import inject_layers, own_layer_path
from peftkit.core.layer import WrapsInPlace
from peftkit.core.method import Method, Training
from peftkit.core.targeting import TargetingConfig, find_targets, resolve_targets

# Hugging Face peft's per-model defaults (TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING), plus BERT-style
# encoders, which peft lacks (their norms are all named LayerNorm): `peftkit compare` runs every method on MiniLM.
_LLAMA_LIKE = ["input_layernorm", "post_attention_layernorm", "norm"]
_GEMMA2_LIKE = [
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "norm",
]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **dict.fromkeys(["llama", "mistral", "gemma"], _LLAMA_LIKE),
    **dict.fromkeys(["bloom", "falcon"], ["input_layernorm", "post_attention_layernorm", "ln_f"]),
    "llava": ["multi_modal_projector", *_LLAMA_LIKE, "embed_tokens", "lm_head"],
    **dict.fromkeys(["t5", "mt5"], ["layer_norm", "final_layer_norm"]),
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"],
    "phi": ["input_layernorm", "final_layernorm"],
    **dict.fromkeys(["gemma2", "gemma3_text"], _GEMMA2_LIKE),
    **dict.fromkeys(["qwen2", "qwen3"], ["post_attention_layernorm"]),
    **dict.fromkeys(["bert", "roberta", "xlm-roberta"], ["LayerNorm"]),  # peftkit's addition
}
SUPPORTED = "modules holding their own floating-point tensors (LayerNorm, RMSNorm, T5LayerNorm, GroupNorm...)"


@dataclass(kw_only=True)
class LNTuningConfig(TargetingConfig):
    """LN tuning's settings, with Hugging Face peft's names: which modules get a trainable copy.

    ``target_modules`` None takes peft's default norm names for the model type (Llama: input_layernorm,
    post_attention_layernorm, norm); for BERT / RoBERTa, which peft has no default for, peftkit takes ``LayerNorm``.
    """

    peft_type: ClassVar[str] = "LN_TUNING"
    default_target_modules: ClassVar[dict[str, list[str]]] = DEFAULT_TARGETS

    def to_dict(self) -> dict:
        out = super().to_dict()
        for key in ("layers_to_transform", "layers_pattern"):  # not in peft's LNTuningConfig: written only when used
            if out.get(key) is None:
                out.pop(key, None)
        return out


def supported(module: nn.Module) -> bool:
    """A module LN tuning can copy and run with other tensors: it holds floating-point tensors of its own."""
    return any(p.is_floating_point() for p in module.parameters(recurse=False))


# ---- layer ----------------------------------------------------------------------------------------------------
class LNTuningLayer(WrapsInPlace):
    """A trainable copy of the wrapped (norm) module per adapter, in ``ln_tuning_layers``."""

    adapter_param_names = ("ln_tuning_layers",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ln_tuning_layers = nn.ModuleDict()
        self._original: dict[str, torch.Tensor] | None = None  # the base tensors before the first merge

    def update_layer(self, adapter_name: str, config: LNTuningConfig, module_name: str) -> None:
        module = copy.deepcopy(self.get_base_layer())
        if self._original is not None:  # merged: the copy starts from the original tensors, not the merged ones
            with torch.no_grad():
                for key, value in self._original.items():
                    module.get_parameter(key).copy_(value)
        self.ln_tuning_layers[adapter_name] = module

    # ---- the composition ------------------------------------------------------------------------------------
    def _base_params(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.get_base_layer().named_parameters() if p.is_floating_point()}

    def _copy_params(self, name: str) -> dict[str, nn.Parameter]:
        return dict(self.ln_tuning_layers[name].named_parameters())

    def _combined(self, names: list[str]) -> dict[str, torch.Tensor]:
        """W + sum_a (P_a - W) over ``names`` (W: the original tensors); exactly P_a for one adapter."""
        base = self._base_params()
        if len(names) == 1:
            own = self._copy_params(names[0])
            return {k: own[k].to(p.dtype) for k, p in base.items()}
        original = self._original or {k: p.detach() for k, p in base.items()}
        copies = [self._copy_params(n) for n in names]
        return {k: w + sum(c[k].to(w.dtype) - w for c in copies) for k, w in original.items()}

    def _run(self, names: list[str], args: tuple, kwargs: dict) -> Any:
        """The wrapped module with the merged adapters' and ``names``' composition as its tensors."""
        weights = {self.base_prefix() + k: v for k, v in self._combined([*self.merged_adapters, *names]).items()}
        return functional_call(self.base_layer, weights, args, kwargs, tie_weights=False, strict=False)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.routing is not None and not self.disabled:
            return self._routed(x, args, kwargs)
        live = [n for n in self.live_adapters() if n in self.ln_tuning_layers]
        if not live:
            return self.base_layer(x, *args, **kwargs)
        return self._run(live, (x, *args), kwargs)

    def _routed(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Per-row adapters: each group of rows runs the module with its adapter's tensors; BASE rows the base's."""
        out = self.base_layer(x, *args, **kwargs)  # (B, ..., H)
        groups = self.routed_groups(x.shape[0])
        if not groups:
            return out
        out = out.clone()
        for name, rows in groups:
            out[rows] = self._run([name], (x[rows], *args), kwargs).to(out.dtype)  # (G, ..., H)
        return out

    # ---- merging: the composition is written into the base tensors; unmerge restores the originals -----------
    @torch.no_grad()
    def merge(self, adapter_names: list[str]) -> None:
        base = self._base_params()
        if self._original is None:
            self._original = {k: p.detach().clone() for k, p in base.items()}
        self.merged_adapters.extend(adapter_names)
        for key, value in self._combined(list(self.merged_adapters)).items():
            base[key].copy_(value)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._original is None:
            return
        base = self._base_params()
        for key, value in self._original.items():
            base[key].copy_(value)
        self.merged_adapters.clear()
        self._original = None


# ---- attaching ----------------------------------------------------------------------------------------------
def inject(model: nn.Module, config: LNTuningConfig, adapter_name: str) -> None:
    """Resolve peft's per-model default into the (copied) config, so it is saved explicit, then wrap."""
    config.target_modules = resolve_targets(model, config)
    targets = find_targets(model, config, supported, supported_label=SUPPORTED)
    targets = [own_layer_path(model, n, LNTuningLayer) for n in targets]
    inject_layers(model, config, adapter_name, targets, lambda m: LNTuningLayer if supported(m) else None)


METHOD = Method(
    name="ln_tuning",
    config_class=LNTuningConfig,
    inject=inject,
    can_merge=True,
    training=Training(learning_rate=1e-3),
)
