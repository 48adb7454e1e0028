"""LyCORIS LoHa / LoKr / full-delta modules of a kohya-style file, read as weight deltas.

KohakuBlueleaf et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation", sections 3.2-3.3, with s = alpha / r:

    LoHa:  ΔW = s * (w1_a @ w1_b) ⊙ (w2_a @ w2_b)       r = hada_w1_b.shape[0]
           with tucker cores hada_t1/t2 (convs): w_i = einsum("ijkl,jr,ip->prkl", t_i, w_i_b, w_i_a)
    LoKr:  ΔW = s * kron(w1, w2),  w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b,  w2 likewise (or via lokr_t2);
           r = rank of the factorised part (lokr_w2_b, else lokr_w1_b); both factors full: s = 1
    full:  ΔW = diff

Each ΔW is flattened to (out, n) (n = in * kh * kw) and returned as a :class:`DeltaLora`: its shape is worked out
from the factor shapes first (every dimension checked, so a corrupt file raises CheckpointError, not a torch
error), and the product is only computed once the caller has checked that shape against the model's layer.
It is then an exact LoRA of rank min(out, n) (B = ΔW, A = I when n <= out, else B = I, A = ΔW; scale 1): merging
adds exactly ΔW, scales and unfusing work as for any LoRA; the cost is one weight-sized tensor per module (LoHa /
LoKr files are small, the loaded adapter is not).

Writing (:func:`write_lycoris`): a pipeline's trained LoHa / LoKr adapters (methods/loha.py, methods/lokr.py, whose
tensors already carry LyCORIS' names) as one kohya-layout file: ``lora_unet_<stem>.hada_w1_a`` ...,
``lora_te_<stem>...`` and ``<stem>.alpha``, with alpha chosen so that the reader's alpha / r is the layer's scale
(a LoKr with both factors full, which readers scale by 1, gets the scale folded into ``lokr_w1``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.core.factorised import FactorisedLayer, tucker
from peftkit.core.merge import adapter_layers
from peftkit.errors import CheckpointError, choices
from peftkit.integrations.factors import DeltaLora

LOHA_SUFFIXES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
Factor = Callable[[], torch.Tensor]


def _need(name: str, parts: dict[str, torch.Tensor], *keys: str) -> list[torch.Tensor]:
    missing = [k for k in keys if k not in parts]
    if missing:
        raise CheckpointError(
            f"Module {name!r} lacks {choices(missing)} (has {choices(parts)}); the file is incomplete."
        )
    return [parts[k] for k in keys]


def _corrupt(name: str, what: str) -> CheckpointError:
    return CheckpointError(f"Module {name!r}: {what}; the file is corrupt (re-export it from kohya / LyCORIS).")


def matrix_shape(name: str, key: str, t: torch.Tensor, dims: tuple[int, ...] = (2, 4)) -> tuple[int, int]:
    """A weight-like factor (2-D, or 4-D for a conv) flattened to (rows, columns); no empty dimension."""
    if t.dim() not in dims or 0 in t.shape:
        want = " or ".join(f"{d}-D" for d in dims)
        raise _corrupt(name, f"{key} has shape {tuple(t.shape)}, but it must be {want} with no empty dimension")
    return t.shape[0], math.prod(t.shape[1:])


def product_shape(
    name: str, keys: tuple[str, str, str], a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None
) -> tuple[int, int]:
    """Shape of a @ b.flatten(1) (a: (out, r)), or with a tucker core t (r1, r2, kh, kw) of
    einsum("ijkl,ip,jr->prkl", t, a, b) flattened (a: (r1, out), b: (r2, in)) -> (out, in * kh * kw)."""
    a_rows, a_cols = matrix_shape(name, keys[0], a, dims=(2,))
    b_rows, b_cols = matrix_shape(name, keys[1], b)
    if t is None:
        if a_cols != b_rows:
            raise _corrupt(name, f"{keys[0]} {tuple(a.shape)} @ {keys[1]} {tuple(b.shape)}: the ranks differ")
        return a_rows, b_cols
    if t.dim() != 4 or 0 in t.shape or (t.shape[0], t.shape[1]) != (a_rows, b_rows):
        raise _corrupt(
            name, f"tucker core {keys[2]} {tuple(t.shape)} must be ({a_rows}, {b_rows}, kh, kw) to join "
            f"{keys[0]} {tuple(a.shape)} and {keys[1]} {tuple(b.shape)}"
        )  # fmt: skip
    return a_cols, b_cols * t.shape[2] * t.shape[3]


def product(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """The (out, n) matrix whose shape :func:`product_shape` gives."""
    if t is None:
        return a.float() @ b.float().flatten(1)
    return tucker(t.float(), a.float(), b.float().flatten(1)).flatten(1)


def loha(name: str, parts: dict[str, torch.Tensor], alpha: float | None) -> DeltaLora:
    """LoHa: ΔW = (alpha / r) (w1_a w1_b) ⊙ (w2_a w2_b), flattened to (out, n)."""
    w1a, w1b, w2a, w2b = _need(name, parts, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    t1, t2 = parts.get("hada_t1"), parts.get("hada_t2")
    shape1 = product_shape(name, ("hada_w1_a", "hada_w1_b", "hada_t1"), w1a, w1b, t1)
    shape2 = product_shape(name, ("hada_w2_a", "hada_w2_b", "hada_t2"), w2a, w2b, t2)
    if shape1 != shape2:
        raise _corrupt(name, f"LoHa factors give {shape1} and {shape2}, which cannot be multiplied elementwise")
    rank = w1b.shape[0]
    scale = (alpha if alpha is not None else rank) / rank
    return DeltaLora(name, shape1, lambda: product(w1a, w1b, t1) * product(w2a, w2b, t2) * scale)


def _lokr_factor(name: str, parts: dict[str, torch.Tensor], i: int) -> tuple[tuple[int, int], int | None, Factor]:
    """(shape, rank or None when stored full, a function computing the factor) of LoKr's w1 or w2."""
    if f"lokr_w{i}" in parts:
        w = parts[f"lokr_w{i}"]
        return matrix_shape(name, f"lokr_w{i}", w), None, lambda: w.float().flatten(1)
    keys = (f"lokr_w{i}_a", f"lokr_w{i}_b", f"lokr_t{i}")
    a, b = _need(name, parts, *keys[:2])
    t = parts.get(keys[2])
    return product_shape(name, keys, a, b, t), b.shape[0], lambda: product(a, b, t)


def lokr(name: str, parts: dict[str, torch.Tensor], alpha: float | None) -> DeltaLora:
    """LoKr: ΔW = s kron(w1, w2) flattened to (out, n); s = alpha / r when a factor is decomposed, else 1.

    kron((a, b), (c, d)) has shape (a c, b d): known before anything is multiplied."""
    (a, b), r1, w1 = _lokr_factor(name, parts, 1)
    (c, d), r2, w2 = _lokr_factor(name, parts, 2)
    rank = r2 if r2 is not None else r1
    scale = 1.0 if rank is None or alpha is None else alpha / rank
    # kron((a, b), (c, d, kh, kw)) flattened = kron((a, b), (c, d * kh * kw)): the column order agrees.
    return DeltaLora(name, (a * c, b * d), lambda: torch.kron(w1(), w2()) * scale)


def full(name: str, diff: torch.Tensor) -> DeltaLora:
    """A stored full delta (``diff``), flattened to (out, n)."""
    shape = matrix_shape(name, "diff", diff)
    return DeltaLora(name, shape, lambda: diff.float().flatten(1))


# ---- writing -------------------------------------------------------------------------------------------------
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def module_tensors(layer: FactorisedLayer, adapter_name: str) -> tuple[str, dict[str, torch.Tensor]]:
    """(algo, {suffix: tensor}) of one LoHa / LoKr layer's adapter, alpha included, as LyCORIS readers scale it."""
    parts = {k: v.detach().float().cpu() for k, v in layer.adapter_state_dict(adapter_name).items()}
    scale = layer.scaling[adapter_name]
    if "hada_w1_b" in parts:
        return "loha", {**parts, "alpha": torch.tensor(scale * parts["hada_w1_b"].shape[0])}
    rank_of = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))
    if rank_of is None:  # both factors full: readers use scale 1, so the scale goes into w1
        return "lokr", {**parts, "lokr_w1": parts["lokr_w1"] * scale}
    return "lokr", {**parts, "alpha": torch.tensor(scale * rank_of.shape[0])}


def component_modules(component: nn.Module, adapter_name: str) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """{module path: (algo, tensors)} of every LoHa / LoKr layer of a UNet / text encoder holding the adapter."""
    out = {}
    for path, layer in adapter_layers(component):
        if isinstance(layer, FactorisedLayer) and adapter_name in layer.adapter_names:
            out[path] = module_tensors(layer, adapter_name)
    return out


def write_lycoris(pipe: Any, path: str | Path, adapter_name: str = "default", title: str = "lycoris") -> None:
    """Write the LoHa / LoKr adapter ``adapter_name`` of a pipeline's UNet and text encoder(s) (``pipe.unet``...,
    PeftModels or models with peftkit layers) as one kohya / LyCORIS .safetensors file, which
    :func:`peftkit.integrations.diffusers.load_lora` and kohya's tools read."""
    from peftkit.integrations import kohya  # kohya imports this module for reading

    tensors, algos = {}, set()
    components = {c: getattr(pipe, c) for c in COMPONENTS if isinstance(getattr(pipe, c, None), nn.Module)}
    sdxl = "text_encoder_2" in components
    for c, component in components.items():
        model = getattr(component, "model", component)  # a PeftModel's wrapped model
        modules = component_modules(model, adapter_name)
        names = _unet_names(model, list(modules)) if c == "unet" and sdxl else {}
        for module_path, (algo, parts) in modules.items():
            algos.add(algo)
            stem = _stem(c, names.get(module_path, module_path), sdxl, kohya.path_to_stem)
            tensors.update({f"{stem}.{suffix}": t for suffix, t in parts.items()})
    if not tensors:
        raise CheckpointError(
            f"No LoHa / LoKr adapter {adapter_name!r} in the pipeline's {choices(components)}; train one with "
            "LoHaConfig / LoKrConfig (LoRA adapters are written by diffusers.save_lora(format='kohya'))."
        )
    kohya.write_file(tensors, path, _metadata(tensors, sorted(algos), title, sdxl))


def _stem(component: str, module_path: str, sdxl: bool, to_stem: Callable[[str], str]) -> str:
    if component == "unet":
        return f"lora_unet_{to_stem(module_path)}"
    if not module_path.startswith("text_model."):
        module_path = "text_model." + module_path  # transformers 5 CLIPTextModel drops it; kohya keys keep it
    prefix = {"text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}[component]
    return f"{prefix}_{to_stem(module_path)}"


def _unet_names(unet: nn.Module, paths: list[str]) -> dict[str, str]:
    """SDXL: kohya spells UNet paths as LDM / SGM (see kohya.ldm_unet_names)."""
    from peftkit.integrations import kohya

    up_attn = {i: hasattr(b, "attentions") for i, b in enumerate(unet.up_blocks)}
    return kohya.ldm_unet_names(paths, unet.config.layers_per_block, up_attn)


def _metadata(tensors: dict[str, torch.Tensor], algos: list[str], title: str, sdxl: bool) -> dict[str, str]:
    """kohya's ss_* fields as LyCORIS writes them (network module lycoris.kohya, the algorithm in the args)."""
    ranks = [t.shape[0] for k, t in tensors.items() if k.endswith(("hada_w1_b", "lokr_w2_b", "lokr_w1_b"))]
    alphas = [float(t) for k, t in tensors.items() if k.endswith(".alpha")]
    return {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps({"algo": algos[0] if len(algos) == 1 else algos}),
        "ss_network_dim": str(ranks[0] if ranks else "full"),
        "ss_network_alpha": str(alphas[0] if alphas else 1.0),
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        "ss_output_name": title,
        "modelspec.title": title,
    }
