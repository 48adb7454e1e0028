"""k-bit bases for QLoRA (Dettmers et al. 2023): quantize a loaded model's Linear layers, and export a merged model
without the rounding a merge into 4 bits adds.

- :func:`quantize_model` turns the ``nn.Linear`` layers of a loaded model (not its heads) into bitsandbytes
  ``Linear4bit`` (nf4 / fp4, double quantization) or ``Linear8bitLt``, or torchao int8 weight-only layers: what
  transformers' ``BitsAndBytesConfig`` / ``TorchAoConfig`` give at load time, for a model already in memory
  (``peftkit train --quantize``). Models loaded with those configs need none of this: LoRA wraps their layers as they
  are.
- :func:`fake_quantize` replaces each such weight W by dequant(quant(W)) in place: the weights a quantized run trained
  against, in float (``peftkit merge --dtype`` on an adapter trained with ``--quantize``).
- :func:`dequantize_model` replaces every quantized Linear (inside adapter wrappers too) by an ``nn.Linear`` holding
  its dequantized weight; :func:`merge_dequantized` then merges exactly in float32 and casts: W' = dequant(W) + s B A,
  with no requantization error, in the dtype asked for.

``prepare_model_for_kbit_training`` (peft's name and meaning) lives with peft's other helpers in
``integrations/peft_api.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from peftkit.core import quantized as Q
from peftkit.core.layer import AdapterLayer
from peftkit.errors import ConfigError, choices

HEADS = ("lm_head", "classifier", "score", "qa_outputs")  # kept in float: they train (modules_to_save) or tie


def _targets(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every plain nn.Linear outside the heads and the output embeddings."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    adapters = {  # an adapter's own Linear layers (LoRA's A and B) are never base weights
        id(sub)
        for layer in model.modules()
        if isinstance(layer, AdapterLayer)
        for attr in layer.adapter_param_names
        for sub in getattr(layer, attr).modules()
    }
    found = []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            name = f"{parent_name}.{attr}" if parent_name else attr
            if type(child) is not nn.Linear or id(child) in adapters or child is out_emb:
                continue
            if not any(p in HEADS for p in name.split(".")):
                found.append((parent, attr, child))
    return found


def _check(quant: str) -> None:
    if quant not in Q.QUANT_CHOICES:
        raise ConfigError(f"quantize={quant!r} is not one of {choices(Q.QUANT_CHOICES)}; nf4 is QLoRA's choice.")


def _quantized_linear(layer: nn.Linear, quant: str, compute_dtype: torch.dtype, double_quant: bool) -> nn.Module:
    """One bitsandbytes layer holding ``layer``'s weight and bias, quantized on its device."""
    import bitsandbytes as bnb

    bias = layer.bias is not None
    if quant == "int8":
        new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias, has_fp16_weights=False)
        new.weight = bnb.nn.Int8Params(layer.weight.data.cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(
            layer.in_features, layer.out_features, bias=bias, compute_dtype=compute_dtype, quant_type=quant,
            compress_statistics=double_quant,
        )  # fmt: skip
        new.weight = bnb.nn.Params4bit(
            layer.weight.data.cpu(), requires_grad=False, quant_type=quant, compress_statistics=double_quant, module=new
        )
        # bitsandbytes repacks a 4-bit weight for AVX512-BF16 CPUs on its first eval forward, for good: bf16 scales,
        # and later training steps through that layout fail on trainable biases (and it raises for in_features < 64)
        new.support_avx512bf16_for_cpu = False
    if bias:
        new.bias = nn.Parameter(layer.bias.data.clone(), requires_grad=False)
    return new.to(layer.weight.device)  # quantizes


@torch.no_grad()
def quantize_model(
    model: nn.Module, quant: str = "nf4", compute_dtype: torch.dtype | None = None, double_quant: bool = True
) -> nn.Module:
    """Quantize ``model``'s Linear layers in place (heads and output embeddings stay float) and return it.

    ``quant``: 'nf4' / 'fp4' (bitsandbytes 4-bit, ``double_quant`` quantizes the block scales too: QLoRA's 4.127
    bits per weight), 'int8' (LLM.int8()) or 'torchao-int8' (torchao int8 weight-only). ``compute_dtype``: what the
    4-bit kernel multiplies in (default: the weights' dtype). The model is flagged as transformers flags a model it
    loaded in 4 / 8 bits, so ``prepare_model_for_kbit_training`` treats it the same way."""
    _check(quant)
    targets = _targets(model)
    if quant == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        chosen = {id(layer) for _, _, layer in targets}
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, _name: id(m) in chosen)
        model.quantization_method = "torchao"
        return model
    for parent, attr, layer in targets:
        setattr(parent, attr, _quantized_linear(layer, quant, compute_dtype or layer.weight.dtype, double_quant))
    flag = "is_loaded_in_8bit" if quant == "int8" else "is_loaded_in_4bit"
    setattr(model, flag, True)
    return model


@torch.no_grad()
def fake_quantize(model: nn.Module, quant: str, double_quant: bool = True) -> nn.Module:
    """W <- dequant(quant(W)) for the layers :func:`quantize_model` would quantize (inside adapter wrappers too)."""
    _check(quant)
    for _, _, layer in _targets(model):
        layer.weight.copy_(Q.roundtrip(layer.weight, quant, double_quant).to(layer.weight.dtype))
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every quantized Linear (an adapter's base layer included) by an nn.Linear holding dequant(W) in
    ``dtype``, in place; returns the model."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if Q.is_quantized(child) and not isinstance(child, AdapterLayer):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                plain.weight = nn.Parameter(Q.dequantize(child).to(dtype), requires_grad=False)
                if child.bias is not None:
                    plain.bias = nn.Parameter(child.bias.detach().to(dtype).clone(), requires_grad=False)
                setattr(parent, attr, plain)
    return model


def merge_dequantized(peft_model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """``peft_model``'s active adapters merged exactly into dequantized base weights, the model cast to ``dtype``:
    W' = dequant(W) + s B A computed in float32, then one cast (no requantization error)."""
    dequantize_model(peft_model.model, torch.float32)
    merged = peft_model.merge_and_unload()
    for p in merged.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return forget_quantization(merged)


def forget_quantization(model: nn.Module) -> nn.Module:
    """Drop transformers' record that ``model`` was loaded quantized (its flags, its quantizer and the
    ``quantization_config`` that save_pretrained would write), once no layer of it is quantized any more."""
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            setattr(model, attr, None)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    return model


EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def recorded_quantization(adapter_folder: str | Path) -> str | None:
    """The ``--quantize`` a ``peftkit train`` run recorded in train_config.yaml next to the adapter, or None."""
    for folder in (Path(adapter_folder), Path(adapter_folder).parent):
        settings = folder / "train_config.yaml"
        if settings.is_file():
            import yaml

            return (yaml.safe_load(settings.read_text()) or {}).get("quantize")
    return None


def export_merged(peft_model: nn.Module, dtype: str, quantize: str | None = None) -> nn.Module:
    """A plain model in ``dtype`` ('bf16', 'fp16', 'fp32') with the adapter merged exactly: W' = dequant(Q(W)) + s B A
    when the adapter was trained on a ``quantize`` base (the weights it saw, rebuilt from the float base), else
    W + s B A; the merge runs in float32 and the result is cast once (``peftkit merge --dtype``)."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not one of {choices(EXPORT_DTYPES)}; bf16 halves the file size.")
    if quantize:
        fake_quantize(peft_model.model, quantize)
    return merge_dequantized(peft_model, EXPORT_DTYPES[dtype])
