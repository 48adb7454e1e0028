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

LyCORIS files are read as weight deltas (KohakuBlueleaf et al. 2023, "Navigating Text-To-Image
Customization: From LyCORIS Fine-Tuning to Model Evaluation", sections 3.2-3.3), with s = alpha / r:

    LoHa:  ΔW = s * (w1_a @ w1_b) ⊙ (w2_a @ w2_b)       r = hada_w1_b.shape[0]
           with tucker cores hada_t1/t2 (convs): w_i = einsum("ijkl,jr,ip->prkl", t_i, w_i_b, w_i_a)
    LoKr:  ΔW = s * kron(w1, w2),  w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b,  w2 likewise (or via lokr_t2);
           r = rank of the factorised part (lokr_w2_b, else lokr_w1_b); both factors full: s = 1
    full:  ΔW = diff

Each delta is then stored as an exact LoRA of rank min(out, n) (n = in * kh * kw): B = ΔW, A = I when n <= out,
else B = I, A = ΔW, with alpha = r (scale 1). Merging adds exactly ΔW, scales and unfusing work as for any LoRA;
the cost is one weight-sized tensor per module (LoHa / LoKr files are small, the loaded adapter is not).
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from peftkit.core.config import atomic_write_bytes
from peftkit.errors import CheckpointError, choices

# kohya stem prefix -> pipeline component
PREFIXES = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
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


@dataclass
class ModuleLora:
    """One module's update as LoRA factors: ΔW = (alpha / r) * up @ down, r = down.shape[0].

    ``down`` is (r, in) or (r, in, kh, kw) or flat (r, in * kh * kw); ``up`` is (out, r) or (out, r, 1, 1)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


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
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); the file is corrupt.") from err


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
    """A kohya / LyCORIS state dict -> {component: {module path (diffusers spelling): ModuleLora}}."""
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        component, stem, suffix = split_key(key)
        if suffix in UNSUPPORTED:
            raise CheckpointError(
                f"{key!r}: {UNSUPPORTED[suffix]} files are not supported; peftkit reads LoRA / LoCon "
                "(lora_down, lora_up, alpha), LoHa (hada_*), LoKr (lokr_*) and full deltas (diff)."
            )
        if suffix not in KNOWN_SUFFIXES:
            raise CheckpointError(f"{key!r} has an unknown suffix {suffix!r}; known: {choices(KNOWN_SUFFIXES)}.")
        grouped.setdefault((component, stem), {})[suffix] = value
    out: dict[str, dict[str, ModuleLora]] = {}
    for (component, stem), parts in grouped.items():
        path = stem_to_path(stem)
        if component == "unet":
            path = ldm_to_diffusers_path(path, layers_per_block)
        out.setdefault(component, {})[path] = module_lora(f"{component}:{stem}", parts)
    return out


def module_lora(name: str, parts: dict[str, torch.Tensor]) -> ModuleLora:
    """One module's tensors (suffix -> tensor) as LoRA factors; LyCORIS deltas become exact full-rank factors."""
    alpha = float(parts["alpha"].item()) if "alpha" in parts else None
    if "lora_down.weight" in parts or "lora_up.weight" in parts:
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down is None or up is None:
            raise CheckpointError(f"Module {name!r} has only one of lora_down / lora_up; the file is incomplete.")
        if down.shape[0] != up.shape[1]:
            raise CheckpointError(
                f"Module {name!r}: rank mismatch, lora_down {tuple(down.shape)} has rank {down.shape[0]} but "
                f"lora_up {tuple(up.shape)} has rank {up.shape[1]}; the file is corrupt."
            )
        return ModuleLora(down.float(), up.float(), alpha if alpha is not None else float(down.shape[0]))
    if any(s in parts for s in LOHA_SUFFIXES):
        delta = loha_delta(name, parts, alpha)
    elif any(s in parts for s in LOKR_SUFFIXES):
        delta = lokr_delta(name, parts, alpha)
    elif "diff" in parts:
        delta = parts["diff"].float().flatten(1)
    else:
        raise CheckpointError(f"Module {name!r} has only {choices(parts)}; no weights to apply.")
    return exact_factors(delta)


def _need(name: str, parts: dict[str, torch.Tensor], *keys: str) -> list[torch.Tensor]:
    missing = [k for k in keys if k not in parts]
    if missing:
        raise CheckpointError(
            f"Module {name!r} lacks {choices(missing)} (has {choices(parts)}); the file is incomplete."
        )
    return [parts[k].float() for k in keys]


def _rebuild(t: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b flattened to (out, n); with a tucker core t (r, r, kh, kw): einsum("ijkl,jr,ip->prkl", t, b, a)."""
    if t is None:
        return a @ b
    return torch.einsum("ijkl,jr,ip->prkl", t.float(), b, a).flatten(1)  # (out, in * kh * kw)


def loha_delta(name: str, parts: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """LoHa: ΔW = (alpha / r) (w1_a w1_b) ⊙ (w2_a w2_b), flattened to (out, n)."""
    w1a, w1b, w2a, w2b = _need(name, parts, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    w1, w2 = _rebuild(parts.get("hada_t1"), w1a, w1b.flatten(1)), _rebuild(parts.get("hada_t2"), w2a, w2b.flatten(1))
    if w1.shape != w2.shape:
        raise CheckpointError(f"Module {name!r}: LoHa factors give {tuple(w1.shape)} and {tuple(w2.shape)}; corrupt.")
    rank = w1b.shape[0]
    return w1 * w2 * ((alpha if alpha is not None else rank) / rank)


def _lokr_factor(name: str, parts: dict[str, torch.Tensor], i: int) -> tuple[torch.Tensor, int | None]:
    if f"lokr_w{i}" in parts:
        return parts[f"lokr_w{i}"].float(), None
    a, b = _need(name, parts, f"lokr_w{i}_a", f"lokr_w{i}_b")
    t = parts.get(f"lokr_t{i}")
    w = torch.einsum("ijkl,ip,jr->prkl", t.float(), a, b) if t is not None else a @ b.flatten(1)
    return w, b.shape[0]


def lokr_delta(name: str, parts: dict[str, torch.Tensor], alpha: float | None) -> torch.Tensor:
    """LoKr: ΔW = s kron(w1, w2) flattened to (out, n); s = alpha / r when a factor is decomposed, else 1."""
    w1, r1 = _lokr_factor(name, parts, 1)
    w2, r2 = _lokr_factor(name, parts, 2)
    rank = r2 if r2 is not None else r1
    scale = 1.0 if rank is None or alpha is None else alpha / rank
    # kron((a, b), (c, d, kh, kw)) flattened = kron((a, b), (c, d * kh * kw)): the column order agrees.
    return torch.kron(w1.flatten(1), w2.flatten(1)) * scale


def exact_factors(delta: torch.Tensor) -> ModuleLora:
    """ΔW (out, n) as LoRA factors with up @ down == ΔW exactly and scale 1."""
    out, n = delta.shape
    if n <= out:
        return ModuleLora(torch.eye(n), delta.clone(), float(n))
    return ModuleLora(delta.clone(), torch.eye(out), float(out))


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
