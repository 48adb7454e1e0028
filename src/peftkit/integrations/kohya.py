"""The kohya / A1111 single-file LoRA format, and LyCORIS LoHa / LoKr files, for Stable Diffusion.

One ``.safetensors`` file holds every adapted module of the UNet and the text encoder(s). A module's
tensors share a stem: ``lora_unet_`` / ``lora_te_`` (SD 1.x/2.x) / ``lora_te1_`` + ``lora_te2_`` (SDXL),
then the module path with ``.`` replaced by ``_``. For plain LoRA (and LyCORIS LoCon, the same keys):

    <stem>.lora_down.weight   (r, in[, kh, kw])   = peftkit's lora_A
    <stem>.lora_up.weight     (out, r[, 1, 1])    = peftkit's lora_B
    <stem>.alpha              scalar; the update is (alpha / r) * up @ down (alpha missing: alpha = r)

UNet paths come in two spellings: diffusers' (``down_blocks_0_attentions_0_...``, which kohya writes for
SD 1.x/2.x) and the original LDM/SGM one (``input_blocks_1_1_...``, which kohya writes for SDXL). Both are
read; :func:`ldm_unet_names` maps between them given ``layers_per_block``.

LyCORIS LoHa / LoKr files and full deltas (``diff``) are read by :mod:`peftkit.integrations.lycoris` as exact
full-rank LoRA factors whose shapes are checked before they are computed.

Every tensor must be a finite floating-point number (a scalar ``alpha`` may also be an integer, as older kohya
files store it); each module may appear once, in one spelling.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from peftkit.core.files import atomic_write_bytes
from peftkit.errors import CheckpointError, choices
from peftkit.integrations import lycoris
from peftkit.integrations.factors import ModuleLora
from peftkit.integrations.lycoris import LOHA_SUFFIXES, LOKR_SUFFIXES

# kohya stem prefix -> pipeline component
PREFIXES = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
KNOWN_SUFFIXES = (*LORA_SUFFIXES, *LOHA_SUFFIXES, *LOKR_SUFFIXES, "diff")
UNSUPPORTED = {"dora_scale": "DoRA", "lora_mid.weight": "LoCon with a tucker core", "hada_w1": "LoHa (old keys)"}

# Words of module paths that themselves hold an underscore: "_" -> "." must not split them.
_COMPOUNDS = sorted(
    {
        "time_emb_proj", "final_layer_norm", "conv_norm_out", "down_blocks", "up_blocks", "mid_block",
        "input_blocks", "output_blocks", "middle_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "proj_in", "proj_out", "conv_shortcut", "conv_in", "conv_out", "time_embedding", "time_embed",
        "label_emb", "add_embedding", "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj",
        "v_proj", "out_proj", "in_layers", "out_layers", "emb_layers", "skip_connection", "text_projection",
        "add_k_proj", "add_v_proj",
    },
    key=lambda w: -w.count("_"),
)  # fmt: skip


# ---- names ----------------------------------------------------------------------------------------------
def stem_to_path(stem: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in`` (no model needed)."""
    out, rest = [], stem
    while rest:
        word = next((w for w in _COMPOUNDS if rest == w or rest.startswith(w + "_")), None)
        word = word or rest.split("_", 1)[0]
        out.append(word)
        rest = rest[len(word) + 1 :]
    return ".".join(out)


def path_to_stem(path: str) -> str:
    return path.replace(".", "_")


_RESNET_LDM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
_RESNET_LDM.update(conv_shortcut="skip_connection")
_TOP_LDM = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def ldm_unet_names(paths: list[str], layers_per_block: int, up_has_attention: dict[int, bool]) -> dict[str, str]:
    """diffusers UNet module path -> LDM/SGM path (the spelling kohya uses for SDXL), for the paths given.

    ``down_blocks.i.resnets.j`` = ``input_blocks.(1 + i (L+1) + j).0``, ``attentions.j`` = ``... .1``,
    ``downsamplers.0.conv`` = ``input_blocks.((i+1)(L+1)).0.op``; mid: resnets.0 / attentions.0 / resnets.1 =
    ``middle_block.0/1/2``; ``up_blocks.i.resnets.j`` = ``output_blocks.(i (L+1) + j).0``, attentions ``.1``,
    ``upsamplers.0.conv`` = ``output_blocks.(i (L+1) + L).(2 if the block has attentions else 1).conv``.
    """
    size = layers_per_block + 1
    out = {}
    for path in paths:
        if path in _TOP_LDM:
            out[path] = _TOP_LDM[path]
            continue
        m = re.fullmatch(r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)"
                         r"\.(\d+)\.(.+)", path)  # fmt: skip
        if m is None:
            continue
        part, block, kind, j, rest = m.group(1), int(m.group(2) or 0), m.group(3), int(m.group(4)), m.group(5)
        if kind == "resnets":
            rest = _RESNET_LDM.get(rest, rest)
        if part == "mid_block":
            out[path] = f"middle_block.{1 if kind == 'attentions' else 2 * j}.{rest}"
        elif part == "down_blocks":
            if kind == "downsamplers":
                out[path] = f"input_blocks.{(block + 1) * size}.0.op"
            else:
                out[path] = f"input_blocks.{1 + block * size + j}.{int(kind == 'attentions')}.{rest}"
        elif kind == "upsamplers":
            out[path] = f"output_blocks.{block * size + layers_per_block}.{2 if up_has_attention[block] else 1}.conv"
        else:
            out[path] = f"output_blocks.{block * size + j}.{int(kind == 'attentions')}.{rest}"
    return out


def ldm_to_diffusers_path(path: str, layers_per_block: int) -> str:
    """The inverse of :func:`ldm_unet_names` for one path (paths already in diffusers' spelling pass through)."""
    for dif, ldm in _TOP_LDM.items():
        if path == ldm:
            return dif
    size = layers_per_block + 1
    resnet = {v: k for k, v in _RESNET_LDM.items()}
    m = re.fullmatch(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.(\d+)\.(.+)", path)
    if m is None:
        m = re.fullmatch(r"(middle_block)\.(\d+)\.(.+)", path)
        if m is None:
            return path
        n, rest = int(m.group(2)), m.group(3)
        return f"mid_block.attentions.0.{rest}" if n == 1 else f"mid_block.resnets.{n // 2}.{resnet.get(rest, rest)}"
    part, n, k, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if part == "input_blocks":
        block, j = divmod(n - 1, size)
        if j == layers_per_block:
            return f"down_blocks.{block}.downsamplers.0.conv"
        kind = "attentions" if k == 1 else "resnets"
    else:
        block, j = divmod(n, size)
        if k == 2 or (k == 1 and rest == "conv"):
            return f"up_blocks.{block}.upsamplers.0.conv"
        kind = "attentions" if k == 1 else "resnets"
    rest = resnet.get(rest, rest) if kind == "resnets" else rest
    return f"{'down_blocks' if part == 'input_blocks' else 'up_blocks'}.{block}.{kind}.{j}.{rest}"


def split_key(key: str) -> tuple[str, str, str]:
    """``lora_unet_<stem>.<suffix>`` -> (component, stem, suffix); CheckpointError on anything else."""
    head, _, suffix = key.partition(".")
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if head.startswith(prefix + "_"):
            return PREFIXES[prefix], head[len(prefix) + 1 :], suffix
    raise CheckpointError(
        f"Tensor {key!r} is not a kohya / LyCORIS key: names start with {choices(PREFIXES)} + '_'. "
        "Pass a Stable Diffusion LoRA file (kohya, A1111, LyCORIS or diffusers layout)."
    )


# ---- files ----------------------------------------------------------------------------------------------
def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file; CheckpointError when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No LoRA file at {str(path)!r}; pass the path of a .safetensors file.")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); the file is corrupt.") from err
    check_values(tensors, str(path))
    return tensors, meta


def check_values(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Every tensor is floating point and finite (NaN / inf would poison the weights it is added to).
    A one-value ``alpha`` may be an integer: older kohya files store alpha = rank as int64."""
    for key, t in tensors.items():
        int_alpha = key.endswith("alpha") and t.numel() == 1 and t.dtype != torch.bool
        if not (t.is_floating_point() or int_alpha):
            raise CheckpointError(
                f"{where}: tensor {key!r} has dtype {t.dtype}; LoRA weights are floating point (float32, float16, "
                "bfloat16). The file is corrupt or not a LoRA file."
            )
        if t.is_floating_point() and not bool(torch.isfinite(t.float()).all()):
            raise CheckpointError(
                f"{where}: tensor {key!r} holds NaN or infinite values; loading it would make every output NaN. "
                "The file is corrupt (often a diverged training run): use an earlier checkpoint."
            )


def scalar(name: str, key: str, t: torch.Tensor) -> float:
    """A one-value tensor (kohya's ``alpha``) as a float."""
    if t.numel() != 1:
        raise CheckpointError(
            f"Module {name!r}: {key} has shape {tuple(t.shape)}, but alpha is one number; the file is corrupt."
        )
    return float(t.item())


def write_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(Path(path), save(data, metadata={k: str(v) for k, v in metadata.items()}))


def is_kohya(tensors: dict[str, torch.Tensor]) -> bool:
    return (
        bool(tensors)
        and all(k.split("_", 2)[0] == "lora" and "_" in k for k in tensors)
        and any(k.startswith(tuple(p + "_" for p in PREFIXES)) for k in tensors)
    )


# ---- kohya / LyCORIS -> per-module LoRA factors --------------------------------------------------------------
def parse(tensors: dict[str, torch.Tensor], layers_per_block: int = 2) -> dict[str, dict[str, ModuleLora]]:
    """A kohya / LyCORIS state dict -> {component: {module path (diffusers spelling): ModuleLora}}.

    One module spelled twice (diffusers' and LDM's UNet names, or 'lora_te_' and 'lora_te1_') is refused: the
    two would silently overwrite each other."""
    out: dict[str, dict[str, ModuleLora]] = {}
    first: dict[tuple[str, str], str] = {}  # (component, path) -> the file stem that named it first
    for head, (component, stem, parts) in _group(tensors).items():
        path = stem_to_path(stem)
        if component == "unet":
            path = ldm_to_diffusers_path(path, layers_per_block)
        if (component, path) in first:
            raise CheckpointError(
                f"Keys {first[component, path] + '.*'!r} and {head + '.*'!r} both name {component} module {path!r} "
                "(two spellings of one module); the file is ambiguous. Keep one of them."
            )
        first[component, path] = head
        out.setdefault(component, {})[path] = module_lora(f"{component}:{stem}", parts)
    return out


def _group(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, str, dict[str, torch.Tensor]]]:
    """File stem ('lora_unet_<stem>') -> (component, stem, {suffix: tensor}); unknown suffixes refused."""
    grouped: dict[str, tuple[str, str, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        component, stem, suffix = split_key(key)
        if suffix in UNSUPPORTED:
            raise CheckpointError(
                f"{key!r}: {UNSUPPORTED[suffix]} files are not supported; peftkit reads LoRA / LoCon "
                "(lora_down, lora_up, alpha), LoHa (hada_*), LoKr (lokr_*) and full deltas (diff)."
            )
        if suffix not in KNOWN_SUFFIXES:
            raise CheckpointError(f"{key!r} has an unknown suffix {suffix!r}; known: {choices(KNOWN_SUFFIXES)}.")
        grouped.setdefault(key.partition(".")[0], (component, stem, {}))[2][suffix] = value
    return grouped


def module_lora(name: str, parts: dict[str, torch.Tensor]) -> ModuleLora:
    """One module's tensors (suffix -> tensor) as LoRA factors; LyCORIS deltas become exact full-rank factors
    (computed lazily, after their shape is checked against the model)."""
    alpha = scalar(name, "alpha", parts["alpha"]) if "alpha" in parts else None
    if "lora_down.weight" in parts or "lora_up.weight" in parts:
        return lora_factors(name, parts.get("lora_down.weight"), parts.get("lora_up.weight"), alpha)
    if any(s in parts for s in LOHA_SUFFIXES):
        return lycoris.loha(name, parts, alpha)
    if any(s in parts for s in LOKR_SUFFIXES):
        return lycoris.lokr(name, parts, alpha)
    if "diff" in parts:
        return lycoris.full(name, parts["diff"])
    raise CheckpointError(f"Module {name!r} has only {choices(parts)}; no weights to apply.")


def lora_factors(name: str, down: torch.Tensor | None, up: torch.Tensor | None, alpha: float | None) -> ModuleLora:
    """lora_down (r, in[, kh, kw]) and lora_up (out, r[, 1, 1]) checked and paired; alpha missing: alpha = r."""
    if down is None or up is None:
        raise CheckpointError(f"Module {name!r} has only one of lora_down / lora_up; the file is incomplete.")
    lycoris.matrix_shape(name, "lora_down", down)
    lycoris.matrix_shape(name, "lora_up", up)
    if down.shape[0] != up.shape[1]:
        raise CheckpointError(
            f"Module {name!r}: rank mismatch, lora_down {tuple(down.shape)} has rank {down.shape[0]} but "
            f"lora_up {tuple(up.shape)} has rank {up.shape[1]}; the file is corrupt."
        )
    return ModuleLora(down.float(), up.float(), alpha if alpha is not None else float(down.shape[0]))


# ---- per-module LoRA factors -> kohya ------------------------------------------------------------------------
def build(
    parts: dict[str, dict[str, ModuleLora]],
    te_prefixes: dict[str, str],
    unet_names: dict[str, str],
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """{component: {path: ModuleLora}} -> kohya tensors. ``te_prefixes``: component -> 'lora_te' / 'lora_te1'...;
    ``unet_names``: optional diffusers -> LDM path renames for the UNet (SDXL's spelling)."""
    out: dict[str, torch.Tensor] = {}
    for component, modules in parts.items():
        prefix = "lora_unet" if component == "unet" else te_prefixes[component]
        for path, mod in modules.items():
            if component == "unet":
                path = unet_names.get(path, path)
            elif not path.startswith("text_model."):
                path = "text_model." + path  # transformers 5 CLIPTextModel drops it; kohya keys keep it
            stem = f"{prefix}_{path_to_stem(path)}"
            out[f"{stem}.lora_down.weight"] = mod.down.to(dtype)
            out[f"{stem}.lora_up.weight"] = mod.up.to(dtype)
            out[f"{stem}.alpha"] = torch.tensor(float(mod.alpha), dtype=dtype)
    return out


ARCHITECTURES = {  # kohya's ss_base_model_version -> SAI model spec architecture
    "sd_v1": "stable-diffusion-v1",
    "sd_v2": "stable-diffusion-v2-768-v",
    "sdxl_base_v1-0": "stable-diffusion-xl-v1-base",
}


def metadata(parts: dict[str, dict[str, ModuleLora]], base: str, title: str, extra: dict | None) -> dict[str, str]:
    """kohya's ss_* training metadata and the SAI model spec (modelspec.*) fields readers show.
    ``base``: 'sd_v1', 'sd_v2' or 'sdxl_base_v1-0' (kohya's ss_base_model_version)."""
    sdxl = base.startswith("sdxl")
    linear = [m for mods in parts.values() for m in mods.values() if m.down.dim() == 2 or m.down.shape[2:] == (1, 1)]
    conv = [m for mods in parts.values() for m in mods.values() if m.down.dim() == 4 and m.down.shape[2:] != (1, 1)]
    first = linear[0] if linear else conv[0]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(first.rank),
        "ss_network_alpha": str(first.alpha),
        "ss_base_model_version": base,
        "ss_v2": str(base == "sd_v2"),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{ARCHITECTURES.get(base, base)}/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers",
        "modelspec.title": title,
        "modelspec.date": datetime.date.today().isoformat(),
    }
    if conv:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv[0].rank), "conv_alpha": str(conv[0].alpha)})
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta
