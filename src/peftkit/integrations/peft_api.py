"""Hugging Face peft's top-level helper functions, with peft's signatures and meaning, on peftkit's models.

Each function here is what ``from peft import <name>`` gives a peft user; with ``from peftkit import <name>`` the same
call works on a :class:`peftkit.PeftModel`. The state dicts use peft's key names (``base_model.model.<path>.lora_A
.weight``: no adapter name), so a state dict moves between the two libraries unchanged.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from peftkit.core import checkpoint, io
from peftkit.core.checkpoint import LoadResult
from peftkit.core.config import PeftConfig
from peftkit.core.merge import adapter_layers
from peftkit.core.model import PeftModel
from peftkit.core.registry import config_from_dict, method_of
from peftkit.errors import CheckpointError, ConfigError, PeftkitError, TargetNotFoundError

QUANTIZATION_METHODS = ("gptq", "aqlm", "eetq", "torchao", "hqq")  # peft skips the fp32 upcast for these
HALF = (torch.float16, torch.bfloat16)


def get_peft_config(config_dict: dict[str, Any]) -> PeftConfig:
    """The config object a dict describes (its ``peft_type`` picks the class), as peft's ``get_peft_config``."""
    data = dict(config_dict)
    data["peft_type"] = getattr(data.get("peft_type"), "value", data.get("peft_type"))  # peft's PeftType.LORA
    return config_from_dict(data)


def _peft_model(model: nn.Module, unwrap_compiled: bool = True) -> PeftModel:
    model = getattr(model, "_orig_mod", model) if unwrap_compiled else model  # torch.compile's wrapper
    if not isinstance(model, PeftModel):
        raise ConfigError(
            f"Expected a peftkit PeftModel, got {type(model).__name__}. Wrap the model with get_peft_model() or "
            "PeftModel.from_pretrained() first."
        )
    return model


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | Literal["auto"] = "auto",
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's file keys (what ``save_pretrained`` writes to adapter_model.safetensors).

    ``state_dict``: the whole model's state dict (e.g. gathered by accelerate from a sharded run); the adapter's
    values are taken from it, by the PeftModel's own parameter names. ``save_embedding_layers`` as in peft."""
    host = _peft_model(model, unwrap_compiled=True)
    tensors = host.adapter_state_dict(adapter_name, for_file=True)
    if state_dict is not None:
        tensors = _values_from(host, adapter_name, tensors, state_dict)
    tensors.update(checkpoint.embedding_copies(host, adapter_name, save_embedding_layers))
    return io.to_file_keys(tensors)


def _values_from(
    host: PeftModel, adapter_name: str, tensors: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The file-layout tensors with values from a whole-model state dict (matched by tensor identity -> name)."""
    names = {id(t): n for n, t in host.state_dict(keep_vars=True).items()}
    out = {}
    for key, tensor in tensors.items():
        name = names.get(id(tensor))
        if name is None or name not in state_dict:
            raise CheckpointError(
                f"get_peft_model_state_dict(state_dict=...): no value for {key!r} (model name {name!r}) in the given "
                f"state dict. Pass the state dict of this PeftModel (model.state_dict()), or state_dict=None."
            )
        out[key] = state_dict[name]
    return out


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: dict[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Copy a state dict in peft's key names into the loaded adapter ``adapter_name``.

    Stricter than peft, as everything peftkit loads: every key must belong to the adapter, none may be missing and
    shapes must agree, else a CheckpointError and nothing is copied; so the returned ``missing_keys`` and
    ``unexpected_keys`` are empty. ``ignore_mismatched_sizes=True`` is refused (it would load some tensors only)."""
    host = _peft_model(model)
    if ignore_mismatched_sizes:
        raise ConfigError(
            "ignore_mismatched_sizes=True would leave the mismatched tensors at their old values; peftkit loads all "
            "of an adapter or nothing. Build the adapter with the checkpoint's config (r, target_modules) instead."
        )
    host.check_exists(adapter_name)
    tensors = io.from_file_keys(dict(peft_model_state_dict))
    checkpoint.load_state(host, adapter_name, tensors, "the given state dict")
    return LoadResult([], [])


def load_peft_weights(
    model_id: str | os.PathLike,
    device: str | torch.device | None = None,
    key_mapping: dict[str, str] | None = None,
    **hf_hub_download_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """The tensors of adapter_model.safetensors in a folder (or a Hub repository, through huggingface_hub's cache),
    on ``device`` (default cpu). ``key_mapping``: regex -> replacement, applied to the keys after the
    ``base_model.model.`` prefix (as peft). adapter_model.bin (a pickle) is refused."""
    subfolder = hf_hub_download_kwargs.get("subfolder")
    folder = Path(model_id) / subfolder if subfolder else Path(model_id)
    if (folder / io.WEIGHTS_NAME).is_file() or folder.is_dir():
        tensors = io.load_tensors(folder)
    else:
        tensors = _hub_tensors(str(model_id), hf_hub_download_kwargs)
    if device is not None:
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return _remap(tensors, key_mapping) if key_mapping else tensors


def _hub_tensors(repo_id: str, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    try:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(repo_id, io.WEIGHTS_NAME, **kwargs))
    except Exception as err:  # not installed, offline without a cached copy, no such repository...
        raise CheckpointError(
            f"No {io.WEIGHTS_NAME} at {repo_id!r}: not a local folder, and the Hugging Face Hub gave no copy "
            f"({type(err).__name__}: {err}). Pass the folder save_pretrained wrote."
        ) from err
    return io.load_tensors(path.parent)


def _remap(tensors: dict[str, torch.Tensor], key_mapping: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tensors.items():
        prefix = next((p for p in (io.PREFIX, "base_model.") if key.startswith(p)), "")
        name = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            name = re.sub(pattern, replacement, name)
        out[prefix + name] = value
    return out


def inject_adapter_in_model(
    peft_config: PeftConfig,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Add the adapter's layers to ``model`` in place, with no PeftModel around it (peft's low-level API): the
    adapter is active, its tensors train, every other parameter is frozen. Methods that rewrite the inputs
    (prompt / prefix tuning) need the PeftModel's forward and are refused, as peft refuses them."""
    method = method_of(peft_config)
    if method.prepare_inputs is not None:
        raise ConfigError(
            f"inject_adapter_in_model cannot attach {peft_config.peft_type}: it rewrites the model's inputs, which "
            "only a PeftModel's forward does. Use get_peft_model(model, config) instead."
        )
    if state_dict is not None:
        raise ConfigError(
            "inject_adapter_in_model(state_dict=...) (targets read from a state dict) is not implemented by peftkit; "
            "give target_modules in the config, then load the values with set_peft_model_state_dict on a PeftModel."
        )
    adapter_name = io.check_adapter_name(adapter_name)
    for p in model.parameters():
        p.requires_grad_(False)
    method.inject(model, peft_config, adapter_name)
    for _, layer in adapter_layers(model):
        if adapter_name in layer.adapter_names:
            layer.set_adapter([adapter_name])
            for p in layer.adapter_parameters(adapter_name):
                p.requires_grad_(not peft_config.inference_mode)
    return model


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """peft's preparation of a (quantized) transformers model for adapter training, step for step: freeze every
    parameter; unless the model uses a quantization method with its own dtypes (GPTQ, AQLM, EETQ, torchao, HQQ),
    upcast float16 / bfloat16 parameters (norms, embeddings, head) to float32; on a quantized model with
    ``use_gradient_checkpointing``, make the inputs require grad and turn gradient checkpointing on. On a model
    that is not quantized, peft (and so peftkit) does not enable gradient checkpointing."""
    quant = getattr(model, "quantization_method", None)
    own_dtypes = str(getattr(quant, "value", quant)).lower() in QUANTIZATION_METHODS
    own_dtypes = own_dtypes or bool(getattr(model, "hqq_quantized", False))
    kbit = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))
    for p in model.parameters():
        p.requires_grad_(False)
    if not own_dtypes:
        for p in model.parameters():
            if p.dtype in HALF and type(p).__name__ != "Params4bit":
                p.data = p.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    if (kbit or own_dtypes) and use_gradient_checkpointing:
        _enable_checkpointing(model, gradient_checkpointing_kwargs or {})
    return model


def _enable_checkpointing(model: nn.Module, kwargs: dict[str, Any]) -> None:
    if kwargs.get("use_reentrant", True):  # reentrant checkpointing needs an input that requires grad
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
        else:
            model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "config") and hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # the cache and checkpointing do not mix (transformers warns otherwise)


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Mixed-precision storage as peft's: frozen parameters to ``dtype`` (float16 / bfloat16), trainable ones to
    float32, so the optimizer updates full-precision values while the frozen base takes half the memory."""
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)


# peft's exception names for the same errors: ``except PeftError`` catches every peftkit error; a config whose
# target_modules match nothing raises TargetNotFoundError, peft's NoMatchingPeftModuleError (both ValueErrors).
PeftError = PeftkitError
NoMatchingPeftModuleError = TargetNotFoundError
