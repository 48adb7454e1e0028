"""Stable Diffusion LoRA files: kohya / A1111 (and LyCORIS) single files, diffusers' layout, peftkit folders.

Every format is read into, and written from, one in-memory form: ``{component: {module path: ModuleLora}}``
(component: 'unet', 'text_encoder', 'text_encoder_2'; module path in diffusers' spelling; ModuleLora: the
factors ``down`` / ``up`` and ``alpha`` with ΔW = (alpha / r) up @ down). :func:`fit` checks such a dict
against a model's modules and shapes without touching the model. The kohya key spelling itself lives in
:mod:`peftkit.integrations.kohya`; the pipeline API (load_lora, set_adapters, fuse, save_lora) in
:mod:`peftkit.integrations.diffusers`, which re-exports everything here.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.core.merge import adapter_layers
from peftkit.core.targeting import base_of, iter_free_modules
from peftkit.errors import CheckpointError, ConfigError, choices
from peftkit.integrations import kohya, lycoris
from peftkit.integrations.kohya import ModuleLora
from peftkit.methods.lora import LoraConfig

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata key (LoraConfig fields per component)


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
    """Check every module exists once and the factor shapes fit; reshape (r, n) to conv shapes. Touches nothing.

    Shapes are checked from :meth:`ModuleLora.factor_shapes` for every module first, so a LyCORIS delta is only
    computed (by ``.down`` / ``.up``) once the whole file is known to fit."""
    found = {n: b for n, m in iter_free_modules(component) if isinstance(b := base_of(m), (nn.Linear, nn.Conv2d))}
    targets = _targets(component, modules, set(found), where)
    shapes = {target: _fit_shapes(found[target], modules[path], target, where) for target, path in targets.items()}
    out = {}
    for target, path in targets.items():
        mod, (want_down, want_up) = modules[path], shapes[target]
        out[target] = ModuleLora(mod.down.reshape(want_down), mod.up.reshape(want_up), mod.alpha)
    return out


def _targets(component: nn.Module, modules: dict[str, ModuleLora], names: set[str], where: str) -> dict[str, str]:
    """The model's module path for each file path (model path -> file path); unknown or doubled ones refused."""
    targets: dict[str, str] = {}
    unknown = []
    for path in modules:
        target = _resolve(component, path, names)
        if target is None:
            unknown.append(path)
        elif target in targets:
            raise CheckpointError(
                f"{where}: LoRA modules {targets[target]!r} and {path!r} both name module {target!r} (two spellings "
                "of one module); the file is ambiguous. Keep one of them."
            )
        else:
            targets[target] = path
    if unknown:
        examples = sorted(n for n in names if "." in n)[:4]
        raise CheckpointError(
            f"{where}: {len(unknown)} of {len(modules)} LoRA modules match no module of this "
            f"{type(component).__name__} (e.g. {choices(unknown[:3])}; the model has e.g. {choices(examples)}). "
            "The file was made for another architecture; load it into the model it was trained for."
        )
    return targets


def _fit_shapes(base: nn.Module, mod: ModuleLora, target: str, where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (down, up) shapes the layer needs: (r, in[, kh, kw]), (out, r[, 1, 1]); CheckpointError if the file's
    factors hold other sizes."""
    weight = base.weight
    out_f, in_f = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    want_down, want_up = (mod.rank, in_f, *kernel), (out_f, mod.rank, *(1,) * len(kernel))
    down, up = mod.factor_shapes()
    if _prod(down) != _prod(want_down) or _prod(up) != _prod(want_up):
        raise CheckpointError(
            f"{where}: module {target!r} ({type(base).__name__} {tuple(weight.shape)}) does not fit the file's "
            f"factors down {down} / up {up}; the LoRA was made for another model (or another rank of this one)."
        )
    return want_down, want_up


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
    ``<path>.alpha`` keys, else alpha = r. One module under two spellings is refused."""
    configs = _metadata_fields(meta, where)
    out: dict[str, dict[str, ModuleLora]] = {}
    first: dict[tuple[str, str], str] = {}  # (component, path) -> the key that named it first
    used = set()
    for key in tensors:
        pair = next(((a, b) for a, b in _DIFFUSERS_PAIRS if key.endswith(a)), None)
        if pair is None:
            continue
        component, path, mod, keys = _diffusers_module(tensors, key, pair, configs, where)
        if (component, path) in first:
            raise CheckpointError(
                f"{where}: keys {first[component, path]!r} and {key!r} both name {component} module {path!r} (two "
                "spellings of one module); the file is ambiguous. Keep one of them."
            )
        first[component, path] = key
        out.setdefault(component, {})[path] = mod
        used.update(keys)
    left = sorted(set(tensors) - used)
    if left:
        raise CheckpointError(
            f"{where}: {len(left)} tensors are neither kohya nor diffusers LoRA keys (e.g. {choices(left[:3])}). "
            "Pass a Stable Diffusion LoRA file (kohya / A1111 / LyCORIS, or diffusers' pytorch_lora_weights)."
        )
    return out


def _metadata_fields(meta: dict[str, str], where: str) -> dict[str, Any]:
    """The ``lora_adapter_metadata`` JSON object ('<component>.<LoraConfig field>' -> value), or {}."""
    try:
        fields = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{where}: metadata {METADATA_KEY!r} is not valid JSON ({err}); corrupt file.") from err
    if not isinstance(fields, dict):
        raise CheckpointError(f"{where}: metadata {METADATA_KEY!r} is not a JSON object; corrupt file.")
    return fields


def _diffusers_module(
    tensors: dict[str, torch.Tensor], key: str, pair: tuple[str, str], configs: dict[str, Any], where: str
) -> tuple[str, str, ModuleLora, tuple[str, ...]]:
    """One module of a diffusers file: (component, module path, factors, the keys it used)."""
    component, _, path = key.removesuffix(pair[0]).partition(".")
    if component not in COMPONENTS:
        raise CheckpointError(f"{where}: key {key!r} names no pipeline component ({choices(COMPONENTS)}).")
    up_key = key.removesuffix(pair[0]) + pair[1]
    if up_key not in tensors:
        raise CheckpointError(f"{where}: {key!r} has no matching {up_key!r}; the file is incomplete.")
    down, up = tensors[key], tensors[up_key]
    lycoris.matrix_shape(f"{where} [{component}] {path}", key, down)
    lycoris.matrix_shape(f"{where} [{component}] {path}", up_key, up)
    if down.shape[0] != up.shape[1]:
        raise CheckpointError(
            f"{where}: rank mismatch at {path!r}: down {tuple(down.shape)} vs up {tuple(up.shape)}; corrupt file."
        )
    path = path.replace(".processor.", ".")
    alpha_key = f"{component}.{path}.alpha"
    if alpha_key in tensors:
        alpha = kohya.scalar(f"{component}.{path}", alpha_key, tensors[alpha_key])
        return component, path, ModuleLora(down.float(), up.float(), alpha), (key, up_key, alpha_key)
    fields = {k.partition(".")[2]: v for k, v in configs.items() if k.startswith(component + ".")}
    alpha = _alpha_from_fields(fields, path, down.shape[0])
    return component, path, ModuleLora(down.float(), up.float(), alpha), (key, up_key)


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
