"""Stable Diffusion LoRA: target presets, pipeline loading (kohya / A1111, LyCORIS, diffusers files), scales,
fuse / unfuse / unload, and file conversion (the file formats live in :mod:`peftkit.integrations.sd_formats`
and are re-exported here).

The layers are peftkit's LoRA (:mod:`peftkit.methods.lora`: LoraLinear, LoraConv2d); this module only names the
targets of a diffusers ``UNet2DConditionModel`` and a CLIP text encoder, and moves tensors between files and
those layers. A pipeline is anything with ``.unet``, ``.text_encoder`` and optionally ``.text_encoder_2``
(diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``, or a plain namespace). Each component
gets a :class:`peftkit.PeftModel` (kept at ``component.peftkit_lora``) that adapts it in place, so the pipeline
keeps calling ``pipe.unet(...)`` as before.

    pipe = StableDiffusionPipeline(...)
    load_lora(pipe, "style.safetensors", "style")           # kohya, LyCORIS or diffusers layout
    load_lora(pipe, "subject.safetensors", "subject")
    set_adapters(pipe, ["style", "subject"], [0.8, {"unet": {"down": 0.0, "mid": 1.0, "up": 1.0}}])
    fuse_lora(pipe); ...; unfuse_lora(pipe); unload_lora(pipe)
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.core.merge import adapter_layers, merged_names
from peftkit.core.model import PeftModel
from peftkit.errors import AdapterNameError, AdapterNotFoundError, CheckpointError, ConfigError, MergeError, choices
from peftkit.integrations import sd_formats
from peftkit.integrations.kohya import ModuleLora
from peftkit.integrations.sd_formats import (
    COMPONENTS,
    adapter_modules,
    fit,
    read_lora,
    to_peftkit,
    write_diffusers,
    write_kohya,
    write_peftkit,
)
from peftkit.methods.lora import LoraConfig

MANAGER = "peftkit_lora"  # attribute of an adapted component holding its PeftModel

# The file formats live in sd_formats.py; these names stay importable from here too.
DIFFUSERS_WEIGHTS, METADATA_KEY = sd_formats.DIFFUSERS_WEIGHTS, sd_formats.METADATA_KEY
from_peftkit, parse_diffusers = sd_formats.from_peftkit, sd_formats.parse_diffusers
kohya_to_peftkit, peftkit_to_kohya = sd_formats.kohya_to_peftkit, sd_formats.peftkit_to_kohya
diffusers_to_peftkit, peftkit_to_diffusers = sd_formats.diffusers_to_peftkit, sd_formats.peftkit_to_diffusers
kohya_to_diffusers, diffusers_to_kohya = sd_formats.kohya_to_diffusers, sd_formats.diffusers_to_kohya

_ATTN = r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
_TRANSFORMER = rf"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.({_ATTN}|ff\.net\.(0\.proj|2)))"
_CONV3X3 = r"resnets\.\d+\.(conv1|conv2)|(downsamplers|upsamplers)\.0\.conv"
_RESNET = rf"resnets\.\d+\.(conv_shortcut|time_emb_proj)|{_CONV3X3}"
PRESETS: dict[str, str] = {
    # diffusers' train_text_to_image_lora targets: the attention projections of every transformer block.
    "sd-unet-attn": rf".*{_ATTN}",
    # kohya's default LoRA: every Linear / 1x1 conv of the Transformer2DModel blocks (proj_in/out, attention, FF).
    "sd-unet-transformer": rf".*{_TRANSFORMER}",
    # kohya's LoCon (conv_dim): the above plus ResNet convs, time-embedding projections, down/up-samplers.
    "sd-unet-full": rf".*({_TRANSFORMER}|{_RESNET})",
    # kohya's text encoder targets (CLIPAttention, CLIPMLP); the same for SDXL's two encoders.
    "sd-text-encoder": r".*(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
}


def sd_lora_config(
    preset: str,
    r: int = 4,
    alpha: float | None = None,
    conv_r: int | None = None,
    conv_alpha: float | None = None,
    **kwargs: Any,
) -> LoraConfig:
    """A LoraConfig targeting a Stable Diffusion 1.x / 2.x / XL UNet or CLIP text encoder.

    ``preset``: 'sd-unet-attn', 'sd-unet-transformer', 'sd-unet-full' (LoCon) or 'sd-text-encoder' (see PRESETS).
    ``alpha`` defaults to ``r`` (scale 1, kohya's convention is alpha <= r); ``conv_r`` / ``conv_alpha`` set the
    rank of the 3x3 convolutions in 'sd-unet-full' (kohya's conv_dim / conv_alpha). Other keyword arguments go
    to LoraConfig (lora_dropout, init_lora_weights, ...).
    """
    if preset not in PRESETS:
        raise ConfigError(f"Unknown Stable Diffusion preset {preset!r}; use one of {choices(PRESETS)}.")
    rank_pattern, alpha_pattern = {}, {}
    if conv_r is not None:
        rank_pattern[_CONV3X3] = conv_r
        alpha_pattern[_CONV3X3] = conv_alpha if conv_alpha is not None else conv_r
    return LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else r,
        target_modules=PRESETS[preset],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        **kwargs,
    )


# ---- pipelines ----------------------------------------------------------------------------------------------------
def _components(pipe: Any) -> dict[str, nn.Module]:
    return {c: m for c in COMPONENTS if isinstance(m := getattr(pipe, c, None), nn.Module)}


def _manager(component: nn.Module) -> PeftModel | None:
    return component.__dict__.get(MANAGER)


def load_lora(pipe: Any, source: str | Path | dict, adapter_name: str = "default", scale: float = 1.0) -> list[str]:
    """Load a LoRA file (kohya / A1111, LyCORIS LoHa / LoKr, diffusers, or a peftkit folder) into the pipeline's
    UNet and text encoder(s) as adapter ``adapter_name``, active at ``scale`` next to the already active ones.

    Every module, shape and the scale are checked before anything is attached: on any error the pipeline is
    unchanged.
    Returns the components that received the adapter.
    """
    components = _components(pipe)
    fitted = _fitted(components, source)
    _check_weight(scale, {c: list(modules) for c, modules in fitted.items()})  # a bad scale: nothing attached yet
    for c in fitted:
        manager = _manager(components[c])
        if manager is not None and adapter_name in manager.peft_config:
            raise AdapterNameError(f"{c} already has an adapter {adapter_name!r}; unload it or pick another name.")
    done: list[str] = []
    try:
        for c, modules in fitted.items():
            _attach(components[c], modules, adapter_name)
            done.append(c)
        for c in done:
            manager = _manager(components[c])
            _apply_scale(components[c], manager, adapter_name, scale, c)
            manager.set_adapter([*(n for n in manager.active_adapters if n != adapter_name), adapter_name])
    except Exception:
        for c in done:
            _detach(components[c], adapter_name)
        raise
    return done


def _fitted(components: dict[str, nn.Module], source: str | Path | dict) -> dict[str, dict[str, ModuleLora]]:
    """The source's modules per component, checked against the pipeline (names, shapes); nothing attached."""
    unet = components.get("unet")
    lpb = getattr(getattr(unet, "config", None), "layers_per_block", 2)
    parts = source if isinstance(source, dict) else read_lora(source, lpb if isinstance(lpb, int) else 2)
    where = str(source) if not isinstance(source, dict) else "state"
    missing = sorted(set(parts) - set(components))
    if missing:
        raise CheckpointError(f"{where} holds LoRA weights for {choices(missing)}, which this pipeline lacks.")
    fitted = {c: fit(components[c], mods, f"{where} [{c}]") for c, mods in parts.items() if mods}
    if not fitted:
        raise CheckpointError(f"{where} holds no LoRA modules; nothing to load.")
    return fitted


def _attach(component: nn.Module, modules: dict[str, ModuleLora], adapter_name: str) -> None:
    config, state = to_peftkit(modules)
    config.inference_mode = True
    manager = _manager(component)
    if manager is None:
        flags = {n: p.requires_grad for n, p in component.named_parameters()}
        manager = PeftModel(component, config, adapter_name)
        object.__setattr__(component, MANAGER, manager)  # not a submodule: no cycle, not in state_dict
        try:
            manager._load_state(adapter_name, state, "file")
        except Exception:
            _detach(component, adapter_name)
            for n, p in component.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))
            raise
    else:
        manager.add_adapter(adapter_name, config)
        try:
            manager._load_state(adapter_name, state, "file")
        except Exception:
            manager.delete_adapter(adapter_name)
            raise


def _detach(component: nn.Module, adapter_name: str) -> None:
    manager = _manager(component)
    if manager is None or adapter_name not in manager.peft_config:
        return
    if len(manager.peft_config) == 1:
        manager.unload()
        del component.__dict__[MANAGER]
    else:
        manager.delete_adapter(adapter_name)


def get_active_adapters(pipe: Any) -> list[str]:
    names: dict[str, None] = {}
    for component in _components(pipe).values():
        if (manager := _manager(component)) is not None:
            names.update(dict.fromkeys(manager.active_adapters))
    return list(names)


def list_adapters(pipe: Any) -> dict[str, list[str]]:
    """component -> names of the adapters loaded on it."""
    return {c: list(m.peft_config) for c, comp in _components(pipe).items() if (m := _manager(comp)) is not None}


def set_adapters(pipe: Any, adapter_names: str | list[str], adapter_weights: Any = None) -> None:
    """Activate these adapters (their effects add) with per-adapter weights.

    A weight is a float (every module), or a dict per component: ``{"unet": w, "text_encoder": w}`` where the
    UNet's ``w`` is a float or per-block ``{"down": x, "mid": x, "up": x}`` and ``x`` is a float or
    ``{"block_0": y, ...}`` with ``y`` a float or a list (one value per transformer / resnet layer of the block).
    Components or blocks not named keep weight 1. Weight 0 gives the base model's output.
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    weights = list(adapter_weights) if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
    if len(weights) != len(names):
        raise ConfigError(f"adapter_weights has {len(weights)} entries for {len(names)} adapters; give one each.")
    by_name = dict(zip(names, weights, strict=True))
    known = {n for ns in list_adapters(pipe).values() for n in ns}
    unknown = sorted(set(names) - known)
    if unknown:
        raise AdapterNotFoundError(f"No adapter {choices(unknown)} in this pipeline; loaded: {choices(known)}.")
    managed = {c: (comp, m) for c, comp in _components(pipe).items() if (m := _manager(comp)) is not None}
    for c, (component, manager) in managed.items():  # check every weight first: a bad one changes nothing
        for name in (n for n in names if n in manager.peft_config):
            if name in merged_names(component):
                raise MergeError(f"Adapter {name!r} is fused; unfuse_lora() before changing its scale.")
            paths = [p for p, layer in adapter_layers(component) if name in getattr(layer, "scaling", {})]
            _check_weight(by_name[name], {c: paths})
    for c, (component, manager) in managed.items():
        here = [n for n in names if n in manager.peft_config]
        for name in here:
            _apply_scale(component, manager, name, by_name.get(name), c)
        manager.set_adapter(here if here else [])


def _check_weight(weight: Any, paths: dict[str, list[str]]) -> None:
    """Work out the scale a weight gives each module path of each component; ConfigError if it is malformed."""
    for c, component_paths in paths.items():
        component_weight = _component_weight(weight, c)
        for path in component_paths:
            _block_scale(component_weight, path)


def _component_weight(weight: Any, c: str) -> Any:
    """A component's part of a weight: the weight itself, or ``weight[c]`` (default 1) for a per-component dict."""
    weight = 1.0 if weight is None else weight
    if isinstance(weight, dict):
        bad = sorted(set(weight) - set(COMPONENTS))
        if bad:
            raise ConfigError(f"Scale keys {choices(bad)} name no component; use {choices(COMPONENTS)}.")
        weight = weight.get(c, 1.0)
    return weight


def _apply_scale(component: nn.Module, manager: PeftModel, name: str, weight: Any, c: str) -> None:
    if name in merged_names(component):
        raise MergeError(f"Adapter {name!r} is fused; unfuse_lora() before changing its scale.")
    weight = _component_weight(weight, c)
    config = manager.peft_config[name]
    for path, layer in adapter_layers(component):
        if name in getattr(layer, "scaling", {}):
            r, alpha = config.rank_for(path), config.alpha_for(path)
            base = alpha / r**0.5 if config.use_rslora else alpha / r
            layer.scaling[name] = base * _block_scale(weight, path)


def _block_scale(weight: Any, path: str) -> float:
    if not isinstance(weight, dict):
        return _number(weight, path)
    bad = sorted(set(weight) - {"down", "mid", "up"})
    if bad:
        raise ConfigError(f"UNet scale keys {choices(bad)} are not blocks; use 'down', 'mid', 'up'.")
    m = re.match(r"(down|up)_blocks\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)\.|mid_block\.", path)
    if m is None:
        return 1.0
    part = m.group(1) or "mid"
    value = weight.get(part, 1.0)
    if isinstance(value, dict):
        bad = sorted(k for k in value if not re.fullmatch(r"block_\d+", str(k)))
        if bad:
            raise ConfigError(f"Scale keys {choices(bad)} of {part!r} are not blocks; use 'block_0', 'block_1', ...")
        value = value.get(f"block_{m.group(2)}", 1.0)
    if isinstance(value, (list, tuple)):  # one value per layer; a block's down/up-sampler takes the last one
        j = int(m.group(4)) if m.group(3) in ("attentions", "resnets") else len(value) - 1
        if j >= len(value):
            raise ConfigError(f"Per-layer scales {value!r} for {part} block {m.group(2)} lack layer {j} ({path!r}).")
        value = value[j]
    return _number(value, path)


def _number(value: Any, path: str) -> float:
    """A scale as a finite float; ConfigError naming the value otherwise."""
    try:
        number = float(value) if not isinstance(value, (str, bytes)) else None
    except (TypeError, ValueError, RuntimeError):
        number = None
    if number is None or not math.isfinite(number):
        raise ConfigError(
            f"Scale {value!r} (for {path!r}) is not a finite number. A scale is a float, a dict per component "
            "{'unet': w, 'text_encoder': w}, and for the UNet per block {'down': x, 'mid': x, 'up': x} with x a "
            "float, {'block_0': y, ...} or a list with one float per layer."
        )
    return number


def fuse_lora(pipe: Any, adapter_names: list[str] | None = None) -> None:
    """Add the active (or named) adapters' scaled deltas into the weights: W += s B A; undo with unfuse_lora."""
    for component in _components(pipe).values():
        manager = _manager(component)
        if manager is not None:
            names = adapter_names if adapter_names is not None else manager.active_adapters
            manager.merge_adapter([n for n in names if n in manager.peft_config])


def unfuse_lora(pipe: Any) -> None:
    """Subtract every fused delta again (W -= s B A): the weights are the original ones to float tolerance."""
    for component in _components(pipe).values():
        if (manager := _manager(component)) is not None:
            manager.unmerge_adapter()


def unload_lora(pipe: Any, adapter_name: str | None = None) -> None:
    """Remove one adapter (or all): unfused first, the original modules put back when none is left."""
    for component in _components(pipe).values():
        manager = _manager(component)
        if manager is None:
            continue
        if adapter_name is None:
            manager.unload()
            del component.__dict__[MANAGER]
        elif adapter_name in manager.peft_config:
            if adapter_name in merged_names(component):
                manager.unmerge_adapter()
            _detach(component, adapter_name)


def save_lora(pipe: Any, path: str | Path, adapter_name: str = "default", format: str = "kohya", **kwargs: Any) -> None:
    """Write one loaded (or trained) adapter of the pipeline as 'kohya', 'diffusers' or 'peftkit' files.
    The current per-module scales are folded into each module's alpha."""
    parts = {}
    for c, component in _components(pipe).items():
        if isinstance(component, PeftModel):
            component = component.model
        mods = adapter_modules(component, adapter_name)
        if mods:
            parts[c] = mods
    if not parts:
        raise AdapterNotFoundError(f"No component of the pipeline has an adapter {adapter_name!r}.")
    writers = {"kohya": write_kohya, "diffusers": write_diffusers, "peftkit": write_peftkit}
    if format not in writers:
        raise ConfigError(f"format={format!r} is not one of {choices(writers)}.")
    if format == "kohya":
        write_kohya(parts, path, unet=_components(pipe).get("unet"), **kwargs)
    else:
        writers[format](parts, path)


def is_adapted(module: nn.Module) -> bool:
    return any(isinstance(m, AdapterLayer) for m in module.modules())
