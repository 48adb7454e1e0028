"""LoRA on parameters (``target_parameters``, peft 0.17+): a low-rank update on an nn.Parameter that no Linear holds,
such as the fused 3-D expert weights of transformers 5's mixture-of-experts blocks (Mixtral, Qwen3-MoE, GPT-OSS).

For a 2-D parameter W (out, in) the update is LoRA's, ΔW = s B A (Hu et al. 2021, section 4.1). For a 3-D expert
stack W (E, out, in) every expert e gets its own rank-r update, stored as peft stores it (one Linear pair whose rank
dimension holds all experts, so the file keys are ``lora_A.weight`` / ``lora_B.weight`` as for a Linear):

    A: (E r, in)  rows e r .. e r + r - 1 are A_e           A_e = A.reshape(E, r, in)[e]
    B: (out, r E) columns k E + e are B_e[:, k]             B_e = B.reshape(out, r, E)[:, :, e]
    ΔW_e = s B_e A_e  (out, in)

Experts stored transposed, W (E, in, out) (``is_transposed`` on the module, as GPT-OSS), get ΔW_e^T. The module
runs with W + sum_a ΔW_a in place of W (``torch.func.functional_call``; W itself is never written), merge is
W += ΔW and unmerge its exact inverse W -= ΔW. Several parameters of one module are wrapped one inside the other,
the first-registered innermost, which gives peft's key names (``experts.base_layer.lora_A.weight`` for the inner one).

As in peft: no dropout (x cannot be factored out of the module's forward), no DoRA, no ``lora_bias``, and every
adapter of a model that uses ``target_parameters`` targets the same parameters (the nesting fixes the file keys).
Per-row ``adapter_names=`` works when every row uses the same adapter (or the base model); a mixed batch is refused,
since the experts see tokens, not rows. ``add_weighted_adapter`` refuses these adapters (as peft does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from peftkit.core.inject import Injection, inject_layers, replace_module
from peftkit.core.layer import BASE, AdapterLayer
from peftkit.core.merge import adapter_layers
from peftkit.core.method import AdapterHost
from peftkit.core.targeting import find_targets, iter_free_modules
from peftkit.errors import ConfigError, RoutingError, TargetNotFoundError
from peftkit.methods.lora import arithmetic, attach, corda
from peftkit.methods.lora import hotswap as lora_hotswap
from peftkit.methods.lora.config import LoraConfig
from peftkit.methods.lora.layers import LoraLayer
from peftkit.methods.trainable_tokens import with_token_rows


class LoraParamWrapper(LoraLayer):
    """LoRA on one nn.Parameter of the wrapped module (2-D (out, in), or 3-D experts (E, out, in) / (E, in, out))."""

    adapter_param_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        shape = tuple(self.get_param().shape)
        if len(shape) not in (2, 3):
            raise ConfigError(
                f"target_parameters: {parameter_name!r} has shape {shape}; LoRA adapts 2-D (out, in) weights and 3-D "
                "expert stacks (experts, out, in) only. Target another parameter."
            )
        self.transposed = len(shape) == 3 and bool(getattr(self.get_base_layer(), "is_transposed", False))
        self.num_experts = shape[0] if len(shape) == 3 else 1
        out_f, in_f = shape[-2:]
        self.in_features, self.out_features = (out_f, in_f) if self.transposed else (in_f, out_f)

    def get_param(self) -> nn.Parameter:
        return getattr(self.get_base_layer(), self.parameter_name)

    def reference_weight(self) -> torch.Tensor:
        return self.get_param()

    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        refused = {
            "lora_dropout": config.lora_dropout != 0,
            "use_dora": config.use_dora,
            "lora_bias": config.lora_bias,
            "fan_in_fan_out": config.fan_in_fan_out,
            "init_lora_weights": config.init_lora_weights not in (True, False, "gaussian"),
        }
        bad = [f"{k}={getattr(config, k)!r}" for k, v in refused.items() if v]
        if bad:
            raise ConfigError(
                f"target_parameters: LoRA on parameter {module_name!r} does not support {', '.join(bad)} (peft refuses "
                "them too: the update is added to the parameter, so there is no input to drop out or normalise). "
                "Use lora_dropout=0, use_dora=False, lora_bias=False, init_lora_weights=True / 'gaussian' / False."
            )
        super().update_layer(adapter_name, config, module_name)

    def create(self, adapter_name: str, r: int, bias: bool) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)

    def reset(self, adapter_name: str, init: bool | str) -> None:
        a, b = self.factors(adapter_name)
        if init is False:
            self.lora_A[adapter_name].reset_parameters()
            self.lora_B[adapter_name].reset_parameters()
            return
        if init == "gaussian":
            nn.init.normal_(a, std=1 / self.r[adapter_name])
        else:
            nn.init.kaiming_uniform_(a, a=5**0.5)
        nn.init.zeros_(b)

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """s B A in the parameter's own layout: (out, in), (E, out, in), or (E, in, out) when transposed."""
        a, b = self.factors(adapter_name)  # (E r, in), (out, r E)
        s = self.scaling[adapter_name]
        if self.get_param().ndim == 2:
            return (b @ a) * s
        e = self.num_experts
        a3 = a.reshape(e, -1, a.shape[-1])  # (E, r, in)
        b3 = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # (E, out, r)
        delta = torch.bmm(b3, a3) * s  # (E, out, in)
        return delta.transpose(1, 2) if self.transposed else delta

    def _plus_delta(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """weight + ΔW_name in one fused multiply-add (addmm / baddbmm), with no separate ΔW tensor of the
        parameter's size; the factors take the parameter's dtype first (as peft does)."""
        a, b = (t.to(weight.dtype) for t in self.factors(name))  # (E r, in), (out, r E)
        s = float(self.scaling[name])
        if weight.ndim == 2:
            return torch.addmm(weight, b, a, alpha=s)
        e = self.num_experts
        a3 = a.reshape(e, -1, a.shape[-1])  # (E, r, in)
        b3 = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # (E, out, r)
        if self.transposed:  # W (E, in, out): ΔW_e^T = A_e^T B_e^T
            return torch.baddbmm(weight, a3.transpose(1, 2), b3.transpose(1, 2), alpha=s)
        return torch.baddbmm(weight, b3, a3, alpha=s)

    def merge(self, adapter_names: list[str]) -> None:
        param = self.get_param()
        with torch.no_grad():
            for name in adapter_names:
                param += self.delta_weight(name).to(param.dtype)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        param = self.get_param()
        with torch.no_grad():
            while self.merged_adapters:
                param -= self.delta_weight(self.merged_adapters.pop()).to(param.dtype)

    def _call_adapters(self) -> list[str]:
        """The adapters this call adds: the live ones, or under per-row routing the one adapter every row uses."""
        routing = None if self.disabled else self.routing
        if routing is None:
            return self.live_adapters()
        names = set(routing.names)
        if len(names) > 1:
            raise RoutingError(
                f"per-row adapter_names {sorted(names)} mix adapters in one batch, but {self.parameter_name!r} is "
                "adapted with target_parameters: the module sees tokens (routed to experts), not rows, so rows cannot "
                "use different adapters. Run one batch per adapter (every row the same name)."
            )
        name = names.pop()
        return [name] if name != BASE and name in self.r and name not in self.merged_adapters else []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        names = self._call_adapters()
        if not names:
            return self.base_layer(*args, **kwargs)
        weight = self.get_param()
        for name in names:  # W + sum_a ΔW_a
            weight = self._plus_delta(weight, name)
        key = self.base_prefix() + self.parameter_name
        return functional_call(self.base_layer, {key: weight}, args, kwargs, tie_weights=False, strict=False)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, experts={self.num_experts}"


def _matches(key: str, targets: list[str]) -> bool:
    return any(key == t or key.endswith("." + t) for t in targets)


def find_parameters(model: nn.Module, config: LoraConfig) -> list[tuple[str, str]]:
    """(module path, parameter name) of every parameter ``target_parameters`` names, in the order peft wraps them
    (module by module, each module's parameters in registration order); a name matches ``<module>.<param>`` exactly
    or as a dotted suffix."""
    targets, found = list(config.target_parameters or []), []
    for path, module in iter_free_modules(model):
        base = module.get_base_layer() if isinstance(module, AdapterLayer) else module
        found += [(path, p) for p, _ in base.named_parameters(recurse=False) if _matches(f"{path}.{p}", targets)]
    if not found:
        candidates = [
            f"{path}.{p}" for path, m in iter_free_modules(model) for p, t in m.named_parameters(recurse=False)
        ]
        shown = ", ".join(repr(c) for c in candidates[:12]) + (", ..." if len(candidates) > 12 else "")
        raise TargetNotFoundError(
            f"No parameter matched target_parameters={config.target_parameters!r}. Candidates: {shown or '(none)'}. "
            "Give '<module>.<parameter>' names or dotted suffixes such as 'experts.gate_up_proj'."
        )
    return found


def _wrapper_for(model: nn.Module, path: str, parameter_name: str) -> LoraParamWrapper | None:
    """The wrapper of ``parameter_name`` inside ``path``'s chain of LoraParamWrappers, if any."""
    module = model.get_submodule(path)
    while isinstance(module, LoraParamWrapper):
        if module.parameter_name == parameter_name:
            return module
        module = module.base_layer
    return None


def _wrapped_now(model: nn.Module) -> set[tuple[str, str]]:
    """(module path, parameter) of every parameter some adapter already adapts."""
    out = set()
    for path, layer in adapter_layers(model):
        if isinstance(layer, LoraParamWrapper) and layer.r:
            out.add((path.replace(".base_layer", ""), layer.parameter_name))
    return out


def _module_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """target_modules next to target_parameters: none for ``[]`` or None (peft then uses no model-type default)."""
    if not config.target_modules:
        return []
    return find_targets(model, config, lambda m: attach.dispatch(m) is not None, supported_label=attach.SUPPORTED)


def _check(model: nn.Module, found: list[tuple[str, str]], modules: list[str]) -> None:
    taken = sorted({path for path, _ in found if path in modules or _foreign_wrapper(model.get_submodule(path))})
    if taken:
        raise ConfigError(
            f"target_parameters names parameters of {taken}, which target_modules (or another adapter layer) also "
            "wraps; a module is adapted one way. Leave it out of one of them (target_modules=[] targets none)."
        )
    before = _wrapped_now(model)
    if before and before != set(found):
        raise ConfigError(
            f"target_parameters matched {sorted(f'{m}.{p}' for m, p in found)} but the model's other adapters adapt "
            f"{sorted(f'{m}.{p}' for m, p in before)}; as in peft, every adapter that uses target_parameters must "
            "target the same parameters (their nesting sets the checkpoint's keys). Use the same target_parameters."
        )


def _foreign_wrapper(module: nn.Module) -> bool:
    return isinstance(module, AdapterLayer) and not isinstance(module, LoraParamWrapper)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """LoRA's attach: target_modules as ever (methods/lora/attach.py), then target_parameters, in one transaction."""
    if config.init_lora_weights == "corda":  # every target prepared, before the first weight changes
        corda.check_prepared(model, config)
    if not config.target_parameters:
        attach.inject(model, config, adapter_name)
        return
    found, modules = find_parameters(model, config), _module_targets(model, config)
    _check(model, found, modules)
    with _ParamInjection(model, adapter_name) as inj:
        for path, parameter_name in found:
            inj.wrap_parameter(path, parameter_name, config)
        if modules:
            attach.inject(model, config, adapter_name)
        else:  # modules_to_save, and the embedding rows of trainable_token_indices
            rest = lambda: inject_layers(model, config, adapter_name, [], attach.dispatch)  # noqa: E731
            with_token_rows(model, config.trainable_token_indices, adapter_name, rest)


class _ParamInjection(Injection):
    """core's Injection (undo on failure) for parameter wrappers, which take the parameter's name."""

    def wrap_parameter(self, path: str, parameter_name: str, config: LoraConfig) -> None:
        layer = _wrapper_for(self.model, path, parameter_name)
        key = f"{path}.{parameter_name}"  # the name rank_pattern / alpha_pattern match, as in peft
        if layer is not None:
            self._updated.append(layer)
            layer.update_layer(self.adapter_name, config, key)
            return
        layer = LoraParamWrapper(self.model.get_submodule(path), parameter_name)
        layer.update_layer(self.adapter_name, config, key)
        self._wrapped.append((path, replace_module(self.model, path, layer)))


def _param_layers(peft_model: AdapterHost, name: str) -> list[tuple[str, LoraParamWrapper]]:
    return [(p, m) for p, m in adapter_layers(peft_model.model) if isinstance(m, LoraParamWrapper) and name in m.r]


def combine(peft_model: AdapterHost, adapters: list[str], *args: Any, **kwargs: Any) -> Any:
    """add_weighted_adapter, refused for adapters on parameters (as in peft): their A and B hold every expert's
    factors interleaved, which the rank arithmetic of 'cat' / 'svd' / 'ties' does not keep."""
    on_params = [a for a in adapters if _param_layers(peft_model, a)]
    if on_params:
        raise ConfigError(
            f"add_weighted_adapter cannot combine adapters {on_params}: they use target_parameters (LoRA on "
            "parameters such as fused expert weights), which peft refuses too. Combine adapters without "
            "target_parameters, or merge each one (merge_adapter) instead."
        )
    return arithmetic.combine(peft_model, adapters, *args, **kwargs)


def _refuse_hotswap(peft_model: AdapterHost, name: str) -> None:
    on_params = [p for p, _ in _param_layers(peft_model, name)]
    if on_params:
        raise ConfigError(
            f"Hot-swapping cannot handle adapter {name!r}: it uses target_parameters ({on_params[:3]}), whose factors "
            "hold every expert's block (rank padding and the per-layer scales of lora.hotswap do not apply). Use "
            "load_adapter() and set_adapter() to switch such adapters."
        )


def hotswap(peft_model: AdapterHost, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor]):
    """lora.hotswap, refused for adapters on parameters (see ``_refuse_hotswap``)."""
    _refuse_hotswap(peft_model, name)
    return lora_hotswap.hotswap(peft_model, name, config, tensors)


def prepare_hotswap(peft_model: AdapterHost, name: str, target_rank: int | None) -> None:
    """lora.prepare_hotswap, refused for adapters on parameters (see ``_refuse_hotswap``)."""
    _refuse_hotswap(peft_model, name)
    lora_hotswap.prepare_hotswap(peft_model, name, target_rank)
