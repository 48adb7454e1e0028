"""Stable Diffusion LoRA: target presets, pipeline loading (kohya / A1111, LyCORIS, diffusers files), scales,
fuse / unfuse / unload, and file conversion.

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

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.core.layer import AdapterLayer
from peftkit.core.merge import adapter_layers, merged_names
from peftkit.core.model import PeftModel
from peftkit.core.targeting import base_of, iter_free_modules
from peftkit.errors import AdapterNameError, AdapterNotFoundError, CheckpointError, ConfigError, MergeError, choices
from peftkit.integrations import kohya
from peftkit.integrations.kohya import ModuleLora
from peftkit.methods.lora import LoraConfig

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
MANAGER = "peftkit_lora"  # attribute of an adapted component holding its PeftModel
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata key (LoraConfig fields per component)

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


# ---- peftkit <-> per-module factors ---------------------------------------------------------------------------
def to_peftkit(modules: dict[str, ModuleLora]) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Per-module factors -> a LoraConfig (exact targets, per-module rank / alpha) and peftkit's state dict."""
    rank = Counter(m.rank for m in modules.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in modules.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(modules),
        rank_pattern={re.escape(p): m.rank for p, m in modules.items() if m.rank != rank},
        alpha_pattern={re.escape(p): m.alpha for p, m in modules.items() if m.alpha != alpha},
    )
    state = {}
    for path, m in modules.items():
        state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"] = m.down, m.up
    return config, state


def from_peftkit(config: LoraConfig, state: dict[str, torch.Tensor]) -> dict[str, ModuleLora]:
    """peftkit's LoRA state dict (model-relative keys) and its config -> per-module factors."""
    out = {}
    for key, down in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key.removesuffix(".lora_A.weight")
        up = state.get(f"{path}.lora_B.weight")
        if up is None:
            raise CheckpointError(f"{path!r} has lora_A but no lora_B; the checkpoint is incomplete.")
        alpha = config.alpha_for(path)
        if config.use_rslora:  # kohya has no rsLoRA: fold alpha / sqrt(r) into alpha / r
            alpha = alpha * down.shape[0] ** 0.5
        out[path] = ModuleLora(down.detach().float(), up.detach().float(), float(alpha))
    return out


def adapter_modules(component: nn.Module, adapter_name: str) -> dict[str, ModuleLora]:
    """A loaded adapter's factors on one component, with its current per-module scales folded into alpha."""
    out = {}
    for path, layer in adapter_layers(component):
        if adapter_name in getattr(layer, "r", {}) and hasattr(layer, "lora_A"):
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            out[path] = ModuleLora(a.detach().float(), b.detach().float(), layer.scaling[adapter_name] * a.shape[0])
    return out


# ---- fitting factors to a model -------------------------------------------------------------------------------
def _resolve(component: nn.Module, path: str, names: set[str]) -> str | None:
    """A file's module path on this model; CLIP's 'text_model.' prefix may be present on one side only."""
    for candidate in (path, path.removeprefix("text_model."), "text_model." + path):
        if candidate in names:
            return candidate
    return None


def fit(component: nn.Module, modules: dict[str, ModuleLora], where: str) -> dict[str, ModuleLora]:
    """Check every module exists and the factor shapes fit; reshape (r, n) to conv shapes. Touches nothing."""
    found = {n: b for n, m in iter_free_modules(component) if isinstance(b := base_of(m), (nn.Linear, nn.Conv2d))}
    names = set(found)
    out, unknown = {}, []
    for path, mod in modules.items():
        target = _resolve(component, path, names)
        if target is None:
            unknown.append(path)
            continue
        base = found[target]
        weight = base.weight
        out_f, in_f = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        want_down, want_up = (mod.rank, in_f, *kernel), (out_f, mod.rank, *(1,) * len(kernel))
        if mod.down.numel() != _prod(want_down) or mod.up.numel() != _prod(want_up):
            raise CheckpointError(
                f"{where}: module {target!r} ({type(base).__name__} {tuple(weight.shape)}) does not fit the file's "
                f"factors down {tuple(mod.down.shape)} / up {tuple(mod.up.shape)}; the LoRA was made for another "
                "model (or another rank of this one)."
            )
        out[target] = ModuleLora(mod.down.reshape(want_down), mod.up.reshape(want_up), mod.alpha)
    if unknown:
        examples = sorted(n for n in names if "." in n)[:4]
        raise CheckpointError(
            f"{where}: {len(unknown)} of {len(modules)} LoRA modules match no module of this "
            f"{type(component).__name__} (e.g. {choices(unknown[:3])}; the model has e.g. {choices(examples)}). "
            "The file was made for another architecture; load it into the model it was trained for."
        )
    return out


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---- reading files ----------------------------------------------------------------------------------------------
def read_lora(path: str | Path, layers_per_block: int = 2) -> dict[str, dict[str, ModuleLora]]:
    """A kohya / A1111 / LyCORIS single file, a diffusers LoRA file (or folder), or a peftkit save_pretrained
    folder (with unet/, text_encoder/ sub-folders) -> {component: {module path: ModuleLora}}."""
    path = Path(path)
    if path.is_dir():
        if (path / DIFFUSERS_WEIGHTS).is_file():
            return read_lora(path / DIFFUSERS_WEIGHTS, layers_per_block)
        parts = {c: _read_peftkit(path / c) for c in COMPONENTS if (path / c / "adapter_config.json").is_file()}
        if not parts:
            raise CheckpointError(
                f"Folder {str(path)!r} holds no {DIFFUSERS_WEIGHTS} and no unet/ or text_encoder/ adapter folders."
            )
        return parts
    tensors, meta = kohya.read_file(path)
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors; it is not a LoRA file.")
    if kohya.is_kohya(tensors):
        return kohya.parse(tensors, layers_per_block)
    return parse_diffusers(tensors, meta, str(path))


def _read_peftkit(folder: Path) -> dict[str, ModuleLora]:
    from peftkit.core import io
    from peftkit.core.config import PeftConfig
    from peftkit.core.registry import config_from_dict

    config = config_from_dict(PeftConfig.read_dict(folder))
    if not isinstance(config, LoraConfig):
        raise CheckpointError(f"{folder} holds a {config.peft_type} adapter; Stable Diffusion files hold LoRA.")
    return from_peftkit(config, io.from_file_keys(io.load_tensors(folder)))


_DIFFUSERS_PAIRS = (
    (".lora_A.weight", ".lora_B.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)


def parse_diffusers(tensors: dict[str, torch.Tensor], meta: dict[str, str], where: str) -> dict[str, dict]:
    """diffusers' layout: ``unet.<path>.lora_A.weight`` / ``lora_B`` (or the older ``.lora.down`` / ``.lora.up``,
    ``.lora_linear_layer.down`` / ``.up``), alpha from the ``lora_adapter_metadata`` LoraConfig fields, or
    ``<path>.alpha`` keys, else alpha = r."""
    configs = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
    out: dict[str, dict[str, ModuleLora]] = {}
    used = set()
    for key, down in tensors.items():
        pair = next(((a, b) for a, b in _DIFFUSERS_PAIRS if key.endswith(a)), None)
        if pair is None:
            continue
        component, _, path = key.removesuffix(pair[0]).partition(".")
        if component not in COMPONENTS:
            raise CheckpointError(f"{where}: key {key!r} names no pipeline component ({choices(COMPONENTS)}).")
        up_key = key.removesuffix(pair[0]) + pair[1]
        if up_key not in tensors:
            raise CheckpointError(f"{where}: {key!r} has no matching {up_key!r}; the file is incomplete.")
        up = tensors[up_key]
        if down.shape[0] != up.shape[1]:
            raise CheckpointError(
                f"{where}: rank mismatch at {path!r}: down {tuple(down.shape)} vs up {tuple(up.shape)}; corrupt file."
            )
        path = path.replace(".processor.", ".")
        alpha_key = f"{component}.{path}.alpha"
        if alpha_key in tensors:
            alpha = float(tensors[alpha_key].item())
            used.add(alpha_key)
        else:
            fields = {k.partition(".")[2]: v for k, v in configs.items() if k.startswith(component + ".")}
            alpha = _alpha_from_fields(fields, path, down.shape[0])
        out.setdefault(component, {})[path] = ModuleLora(down.float(), up.float(), alpha)
        used.update((key, up_key))
    left = sorted(set(tensors) - used)
    if left:
        raise CheckpointError(
            f"{where}: {len(left)} tensors are neither kohya nor diffusers LoRA keys (e.g. {choices(left[:3])}). "
            "Pass a Stable Diffusion LoRA file (kohya / A1111 / LyCORIS, or diffusers' pytorch_lora_weights)."
        )
    return out


def _alpha_from_fields(fields: dict, path: str, rank: int) -> float:
    if not fields:
        return float(rank)
    config = LoraConfig(
        r=fields.get("r", rank),
        lora_alpha=fields.get("lora_alpha", fields.get("r", rank)),
        rank_pattern=fields.get("rank_pattern") or {},
        alpha_pattern=fields.get("alpha_pattern") or {},
    )
    alpha = config.alpha_for(path)
    return float(alpha * rank**0.5 if fields.get("use_rslora") else alpha)


# ---- writing files ----------------------------------------------------------------------------------------------
def _is_sdxl(unet: nn.Module | None) -> bool:
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def write_kohya(
    parts: dict[str, dict[str, ModuleLora]],
    path: str | Path,
    unet: nn.Module | None = None,
    ldm_names: bool | None = None,
    title: str = "lora",
    extra_metadata: dict | None = None,
) -> None:
    """Write a kohya / A1111 file. ``ldm_names``: spell UNet paths as LDM/SGM (kohya's SDXL convention; needs
    ``unet``); default: True for an SDXL UNet, else diffusers' spelling (kohya's SD 1.x/2.x convention)."""
    sdxl = _is_sdxl(unet) or "text_encoder_2" in parts
    ldm_names = sdxl and unet is not None if ldm_names is None else ldm_names
    renames = {}
    if ldm_names:
        if unet is None:
            raise ConfigError("write_kohya(ldm_names=True) needs unet= to know the block layout.")
        up_attn = {i: hasattr(b, "attentions") for i, b in enumerate(unet.up_blocks)}
        renames = kohya.ldm_unet_names(list(parts.get("unet", {})), unet.config.layers_per_block, up_attn)
    te = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}
    tensors = kohya.build(parts, te, renames)
    cross = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    base = "sdxl_base_v1-0" if sdxl else "sd_v2" if cross == 1024 else "sd_v1"  # SD 2.x: OpenCLIP-H, 1024 wide
    kohya.write_file(tensors, path, kohya.metadata(parts, base, title, extra_metadata))


def write_diffusers(parts: dict[str, dict[str, ModuleLora]], path: str | Path) -> None:
    """Write diffusers' layout (``unet.<path>.lora_A.weight``...) with per-component LoraConfig fields in the
    ``lora_adapter_metadata`` metadata, as diffusers' save_lora_weights does. ``path``: a file or a folder."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path.mkdir(parents=True, exist_ok=True)
        path = path / DIFFUSERS_WEIGHTS
    tensors, fields = {}, {}
    for component, modules in parts.items():
        config, state = to_peftkit(modules)
        tensors.update({f"{component}.{k}": v for k, v in state.items()})
        for key in ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern"):
            fields[f"{component}.{key}"] = getattr(config, key)
        fields[f"{component}.peft_type"] = "LORA"
    kohya.write_file(tensors, path, {"format": "pt", METADATA_KEY: json.dumps(fields, sort_keys=True)})


def write_peftkit(parts: dict[str, dict[str, ModuleLora]], folder: str | Path) -> None:
    """One peftkit / peft save_pretrained folder per component: ``folder/unet``, ``folder/text_encoder``..."""
    from peftkit.core import io

    for component, modules in parts.items():
        config, state = to_peftkit(modules)
        target = Path(folder) / component
        io.save_tensors(io.to_file_keys(state), target)
        config.replace(inference_mode=True).save_pretrained(target)


# Plain conversion functions (the CLI's `peftkit convert` calls these). Pass the pipeline components as
# keyword arguments (unet=..., text_encoder=...) to check that the file fits them and reshape conv factors.
def kohya_to_peftkit(source: str | Path, output: str | Path, **components: nn.Module) -> None:
    write_peftkit(_checked(read_lora(source), components), output)


def peftkit_to_kohya(source: str | Path, output: str | Path, **components: nn.Module) -> None:
    write_kohya(_checked(read_lora(source), components), output, unet=components.get("unet"))


def diffusers_to_peftkit(source: str | Path, output: str | Path, **components: nn.Module) -> None:
    write_peftkit(_checked(read_lora(source), components), output)


def peftkit_to_diffusers(source: str | Path, output: str | Path, **components: nn.Module) -> None:
    write_diffusers(_checked(read_lora(source), components), output)


def kohya_to_diffusers(source: str | Path, output: str | Path, **components: nn.Module) -> None:
    write_diffusers(_checked(read_lora(source), components), output)


def diffusers_to_kohya(source: str | Path, output: str | Path, **components: nn.Module) -> None:
    write_kohya(_checked(read_lora(source), components), output, unet=components.get("unet"))


def _checked(parts: dict[str, dict[str, ModuleLora]], components: dict[str, nn.Module]) -> dict[str, dict]:
    return {c: fit(components[c], mods, c) if c in components else mods for c, mods in parts.items()}


# ---- pipelines ----------------------------------------------------------------------------------------------------
def _components(pipe: Any) -> dict[str, nn.Module]:
    return {c: m for c in COMPONENTS if isinstance(m := getattr(pipe, c, None), nn.Module)}


def _manager(component: nn.Module) -> PeftModel | None:
    return component.__dict__.get(MANAGER)


def load_lora(pipe: Any, source: str | Path | dict, adapter_name: str = "default", scale: float = 1.0) -> list[str]:
    """Load a LoRA file (kohya / A1111, LyCORIS LoHa / LoKr, diffusers, or a peftkit folder) into the pipeline's
    UNet and text encoder(s) as adapter ``adapter_name``, active at ``scale`` next to the already active ones.

    Every module and shape is checked before anything is attached: on any error the pipeline is unchanged.
    Returns the components that received the adapter.
    """
    components = _components(pipe)
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
    for c in fitted:
        manager = _manager(components[c])
        if manager is not None and adapter_name in manager.peft_config:
            raise AdapterNameError(f"{c} already has an adapter {adapter_name!r}; unload it or pick another name.")
    done: list[str] = []
    try:
        for c, modules in fitted.items():
            _attach(components[c], modules, adapter_name)
            done.append(c)
    except Exception:
        for c in done:
            _detach(components[c], adapter_name)
        raise
    for c in done:
        manager = _manager(components[c])
        _apply_scale(components[c], manager, adapter_name, scale, c)
        manager.set_adapter([*(n for n in manager.active_adapters if n != adapter_name), adapter_name])
    return done


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
    for c, component in _components(pipe).items():
        manager = _manager(component)
        if manager is None:
            continue
        here = [n for n in names if n in manager.peft_config]
        for name in here:
            _apply_scale(component, manager, name, by_name.get(name), c)
        manager.set_adapter(here if here else [])


def _apply_scale(component: nn.Module, manager: PeftModel, name: str, weight: Any, c: str) -> None:
    if name in merged_names(component):
        raise MergeError(f"Adapter {name!r} is fused; unfuse_lora() before changing its scale.")
    weight = 1.0 if weight is None else weight
    if isinstance(weight, dict):
        bad = sorted(set(weight) - set(COMPONENTS))
        if bad:
            raise ConfigError(f"Scale keys {choices(bad)} name no component; use {choices(COMPONENTS)}.")
        weight = weight.get(c, 1.0)
    config = manager.peft_config[name]
    for path, layer in adapter_layers(component):
        if name in getattr(layer, "scaling", {}):
            r, alpha = config.rank_for(path), config.alpha_for(path)
            base = alpha / r**0.5 if config.use_rslora else alpha / r
            layer.scaling[name] = base * _block_scale(weight, path)


def _block_scale(weight: Any, path: str) -> float:
    if not isinstance(weight, dict):
        return float(weight)
    bad = sorted(set(weight) - {"down", "mid", "up"})
    if bad:
        raise ConfigError(f"UNet scale keys {choices(bad)} are not blocks; use 'down', 'mid', 'up'.")
    m = re.match(r"(down|up)_blocks\.(\d+)\.(attentions|resnets|downsamplers|upsamplers)\.(\d+)\.|mid_block\.", path)
    if m is None:
        return 1.0
    part = m.group(1) or "mid"
    value = weight.get(part, 1.0)
    if isinstance(value, dict):
        value = value.get(f"block_{m.group(2)}", 1.0)
    if isinstance(value, (list, tuple)):  # one value per layer; a block's down/up-sampler takes the last one
        j = int(m.group(4)) if m.group(3) in ("attentions", "resnets") else len(value) - 1
        if j >= len(value):
            raise ConfigError(f"Per-layer scales {value!r} for {part} block {m.group(2)} lack layer {j} ({path!r}).")
        value = value[j]
    return float(value)


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
