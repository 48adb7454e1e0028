"""Quantized base layers: what a weight-changing adapter needs from a bitsandbytes or torchao Linear.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", section 3) keeps the base weight in
4 bits (NF4 / FP4, optionally with double-quantized scales) and trains adapters in the compute dtype on top of it.
Adapters then need three things from the frozen layer, and nothing else:

    dequantize(layer) -> W (out, in), float32       the weight the kernel multiplies by, as a plain tensor
    requantize(layer, W')                           W' stored back in the layer's own format (a merge)
    snapshot(layer) / restore(layer, s)             the stored weight kept and put back bit for bit (an unmerge)

Supported: bitsandbytes ``Linear4bit`` (nf4 / fp4, double quantization, any compute dtype, any quant storage),
``Linear8bitLt`` (LLM.int8(), int8 rows with one scale each), and an ``nn.Linear`` whose weight is a torchao
``Int8Tensor`` (int8 weight-only: ``quantize_(model, Int8WeightOnlyConfig())`` or transformers' ``TorchAoConfig``).
Other torchao tensors (int4...) run their own forward; they dequantize if the tensor can, and refuse to requantize.

Detection reads class names, so importing this module (and ``import peftkit``) never imports bitsandbytes or torchao.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from peftkit.errors import MergeError


class RoundingWarning(UserWarning):
    """A merge into a quantized weight rounded W + ΔW back to the stored format (the message gives the error)."""


def _has_class(obj: Any, name: str, package: str) -> bool:
    return any(c.__name__ == name and c.__module__.startswith(package) for c in type(obj).__mro__)


def kind(module: nn.Module) -> str | None:
    """'nf4' / 'fp4' (bitsandbytes Linear4bit), 'int8' (Linear8bitLt), 'torchao-<tensor>' or None (not quantized)."""
    if _has_class(module, "Linear4bit", "bitsandbytes"):
        return str(getattr(module.weight, "quant_type", "fp4"))
    if _has_class(module, "Linear8bitLt", "bitsandbytes"):
        return "int8"
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and type(weight).__module__.startswith("torchao"):
        return "torchao-" + type(weight).__name__
    return None


def is_quantized(module: nn.Module) -> bool:
    return kind(module) is not None


def features(module: nn.Module) -> tuple[int, int]:
    """(in, out): a packed 4-bit weight's own shape is (n / 2, 1), so the layer's declared sizes are read."""
    return int(module.in_features), int(module.out_features)


def compute_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype the base layer multiplies in: bitsandbytes 4-bit's ``compute_dtype`` (else the input's), the float
    dtype of a torchao weight, or the input's dtype for int8 (LLM.int8() returns the input's dtype)."""
    dtype = getattr(module, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    weight = module.weight
    if kind(module).startswith("torchao") and weight.dtype.is_floating_point:
        return weight.dtype
    return x.dtype if x.dtype.is_floating_point else torch.float32


def storage_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype the weight was quantized from (what dequantize gives back before the float32 cast)."""
    k = kind(module)
    if k in ("nf4", "fp4"):
        state = module.weight.quant_state
        return getattr(state, "original_dtype", None) or state.dtype
    if k == "int8":
        return torch.float16
    return module.weight.dtype


@torch.no_grad()
def dequantize(module: nn.Module) -> torch.Tensor:
    """W (out, in) in float32, exactly what the layer's kernel multiplies by (up to float rounding)."""
    k = kind(module)
    if k in ("nf4", "fp4"):
        import bitsandbytes.functional as bnbf

        data, state = module.weight.data, module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' CPU inference layout (bf16 scales)
            data, state = bnbf._convert_weight_packed_for_cpu_inverse(data, copy.deepcopy(state))
        return bnbf.dequantize_4bit(data, state).float()
    if k == "int8":
        weight = module.weight
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB  # (out,) row absmax
        return weight.data.float() * (scb.float()[:, None] / 127.0)
    if k is not None and hasattr(module.weight, "dequantize"):
        return module.weight.dequantize().float()
    raise MergeError(f"{type(module).__name__} with a {type(module.weight).__name__} weight cannot be dequantized.")


def snapshot(module: nn.Module) -> tuple:
    """The stored weight as it is (objects, not copies: a requantize replaces them, never writes into them)."""
    state = getattr(module, "state", None)
    return (
        module.weight,
        getattr(module, "quant_state", None),
        getattr(state, "CB", None),
        getattr(state, "SCB", None),
    )


def restore(module: nn.Module, saved: tuple) -> None:
    """Put a ``snapshot`` back: the layer is bit-identical to when it was taken."""
    weight, quant_state, cb, scb = saved
    module.weight = weight
    if hasattr(module, "quant_state"):
        module.quant_state = quant_state
    if kind(module) == "int8":
        module.state.CB, module.state.SCB = cb, scb


@torch.no_grad()
def requantize(module: nn.Module, weight: torch.Tensor) -> None:
    """Store ``weight`` (out, in) in the layer's own format, replacing (never mutating) its weight parameter."""
    k = kind(module)
    device = module.weight.device
    if k in ("nf4", "fp4"):
        import bitsandbytes as bnb

        old = module.weight
        new = bnb.nn.Params4bit(
            weight.to("cpu", storage_dtype(module)).contiguous(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=module,
        )
        module.weight = new.to(device)  # quantizes
        return
    if k == "int8":
        import bitsandbytes as bnb

        new = bnb.nn.Int8Params(weight.to("cpu", torch.float16).contiguous(), requires_grad=False)
        module.weight = new.to(device)  # quantizes: int8 rows + their scales in weight.CB / weight.SCB
        module.state.CB, module.state.SCB = None, None  # the next forward takes them from the new weight
        return
    module.weight = nn.Parameter(_torchao_int8(module.weight, weight), requires_grad=False)


def _torchao_int8(old: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A torchao Int8Tensor with the same block size (per row or per tensor) as ``old``, holding ``weight``."""
    if type(old).__name__ != "Int8Tensor" or getattr(old, "act_quant_kwargs", None) is not None:
        raise MergeError(
            f"Cannot requantize a torchao {type(old).__name__} weight: peftkit merges into int8 weight-only "
            "(Int8WeightOnlyConfig) torchao layers only. Keep the adapter unmerged, or export a dequantized merged "
            "model (peftkit merge --dtype bf16, or peftkit.integrations.kbit.dequantize_model)."
        )
    from torchao.quantization.granularity import PerRow, PerTensor

    granularity = PerRow() if list(old.block_size) == [1, weight.shape[1]] else PerTensor()
    return type(old).from_hp(weight.to(old.dtype).to(old.qdata.device), granularity)


def rounding_error(module: nn.Module, target: torch.Tensor) -> tuple[float, float]:
    """(max |dequant(stored) - target|, ||dequant(stored) - target||_F / ||target||_F) after a requantize."""
    diff = dequantize(module) - target.float()
    return float(diff.abs().max()), float(diff.norm() / target.float().norm().clamp_min(1e-30))


QUANT_CHOICES = ("nf4", "fp4", "int8", "torchao-int8")


@torch.no_grad()
def roundtrip(weight: torch.Tensor, quant: str, double_quant: bool = False, blocksize: int = 64) -> torch.Tensor:
    """dequant(quant(W)) (out, in) in float32: the weight a ``quant`` layer built from W multiplies by.

    nf4 / fp4: bitsandbytes blockwise 4-bit (``blocksize`` values share one absmax); int8: LLM.int8() rows (one
    absmax per output row, W cast to float16 first, as Linear8bitLt does); torchao-int8: torchao's per-row int8."""
    w = weight.detach()
    if quant in ("nf4", "fp4"):
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(
            w.contiguous(), blocksize=blocksize, quant_type=quant, compress_statistics=double_quant
        )
        return bnbf.dequantize_4bit(packed, state).float()
    if quant == "int8":
        import bitsandbytes.functional as bnbf

        rows, scales, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16).contiguous())
        return rows.float() * (scales.float()[:, None] / 127.0)
    if quant == "torchao-int8":
        from torchao.quantization import Int8Tensor
        from torchao.quantization.granularity import PerRow

        return Int8Tensor.from_hp(w, PerRow()).dequantize().float()
    raise MergeError(f"quantization {quant!r} is not one of {', '.join(QUANT_CHOICES)}.")
