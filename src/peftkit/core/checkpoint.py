"""Saving and loading a PeftModel's adapters: peft's folder layout (adapter_config.json + adapter_model.safetensors,
the default adapter at the root, every other one in a sub-folder named after it) and the checks that keep a bad
checkpoint from being half-applied. :class:`peftkit.PeftModel` keeps thin methods that call these functions."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from peftkit.core import io
from peftkit.core.compose import COMPOSITION_FILE, Composition, composition_from_dict
from peftkit.core.config import CONFIG_NAME, PeftConfig
from peftkit.core.files import atomic_write_bytes, atomic_writes
from peftkit.core.merge import adapter_layers
from peftkit.core.registry import config_from_dict
from peftkit.errors import AdapterNameError, CheckpointError, TargetNotFoundError

if TYPE_CHECKING:
    from peftkit.core.model import PeftModel


# ---- writing ------------------------------------------------------------------------------------------------
def adapter_state_dict(host: PeftModel, adapter_name: str, for_file: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors under model-relative names (no adapter name); with ``for_file``, in the layout
    save_pretrained writes (``AdapterLayer.file_state_dict``: the same tensors for most methods)."""
    host.check_exists(adapter_name)
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(host.model):
        state = layer.file_state_dict(adapter_name) if for_file else layer.adapter_state_dict(adapter_name)
        out.update({k if k in layer.root_state_keys else f"{path}.{k}": v for k, v in state.items()})
    out.update(host._extra.get(adapter_name, {}))
    return out


@atomic_writes()
def save_pretrained(host: PeftModel, save_directory: str | os.PathLike, selected_adapters: list[str] | None) -> None:
    """Write each adapter as adapter_config.json + adapter_model.safetensors (peft's layout and keys).

    Every file is written to a temporary name and all are renamed once all are written, so a crash leaves the
    old checkpoint whole and never a half-written adapter.
    """
    names = list(selected_adapters) if selected_adapters is not None else list(host.peft_config)
    for name in names:
        host.check_exists(name)
    for name in names:
        folder = io.adapter_dir(save_directory, name)
        io.save_tensors(io.to_file_keys(host.adapter_state_dict(name, for_file=True)), folder)
        host.peft_config[name].replace(inference_mode=True).save_pretrained(folder)
    block_path = Path(save_directory) / COMPOSITION_FILE
    composition = host._composition
    if composition is not None and set(composition.adapters()) <= set(names):
        text = json.dumps({"active": composition.to_dict()}, indent=2) + "\n"
        atomic_write_bytes(block_path, text.encode())
    elif block_path.is_file():  # a block saved earlier in this folder no longer describes it
        block_path.unlink()


# ---- reading ------------------------------------------------------------------------------------------------
def load_adapter(host: PeftModel, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool) -> None:
    """Load a saved adapter under ``adapter_name``. On any problem the model is left as it was."""
    io.check_adapter_name(adapter_name)
    if adapter_name in host.peft_config:
        raise AdapterNameError(f"An adapter named {adapter_name!r} already exists; pick another name.")
    config, tensors = read_checkpoint(model_id, is_trainable)
    try:
        host.add_adapter(adapter_name, config)
    except TargetNotFoundError as err:
        raise CheckpointError(f"The adapter in {str(model_id)!r} does not fit this model: {err}") from err
    try:
        load_state(host, adapter_name, tensors, model_id)
    except Exception:
        host.delete_adapter(adapter_name)
        raise


def base_copies(host: PeftModel, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """File tensors ``<layer>.base_layer.<param>`` that are copies of a base weight this adapter wraps (peft
    writes them with ``save_embedding_layers``, e.g. for a targeted, possibly resized, embedding) mapped to
    that base parameter. Loaded into the base layer as peft does; layers holding merged adapters are left out."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(host.model):
        if adapter_name not in layer.adapter_names or layer.merged_adapters:
            continue
        for key in tensors:
            if key.startswith(f"{path}.base_layer."):
                try:
                    out[key] = layer.get_parameter(key[len(path) + 1 :])
                except AttributeError:
                    continue
    return out


def from_file_layout(host: PeftModel, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> the live layout, layer by layer (``AdapterLayer.load_file_state``); each key goes
    to the innermost layer holding this adapter whose path prefixes it."""
    layers = {path: layer for path, layer in adapter_layers(host.model) if adapter_name in layer.adapter_names}
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        owner = max((p for p in layers if key.startswith(p + ".")), key=len, default=None)
        if owner is None:
            out[key] = value
        else:
            groups.setdefault(owner, {})[key[len(owner) + 1 :]] = value
    for path, group in groups.items():
        out.update({f"{path}.{k}": v for k, v in layers[path].load_file_state(adapter_name, group).items()})
    return out


def load_state(host: PeftModel, adapter_name: str, tensors: dict[str, torch.Tensor], source: Any) -> None:
    """Check the file's tensors against the adapter (names and shapes, all problems at once), then copy them in."""
    tensors = from_file_layout(host, adapter_name, tensors)
    own = host.adapter_state_dict(adapter_name)
    expected = {**base_copies(host, adapter_name, tensors), **own}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
            for items, what in ((missing, "missing"), (unexpected, "unexpected"), (wrong, "with a wrong shape"))
            if items
        ]
        raise CheckpointError(
            f"The checkpoint {str(source)!r} does not fit this model: tensors " + "; ".join(parts) + ". "
            "It was probably saved for another base model or config; load it onto the model it was trained on."
        )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(tensors[key].to(dtype=param.dtype, device=param.device))


def from_pretrained(
    cls: type[PeftModel],
    model: nn.Module,
    model_id: str | os.PathLike,
    adapter_name: str,
    is_trainable: bool,
    config: PeftConfig | None,
) -> PeftModel:
    """Wrap ``model`` with the adapter saved in ``model_id``; on failure ``model`` is left untouched."""
    io.check_adapter_name(adapter_name)
    root = model_id
    model_id, adapter_name = composition_entry(model_id, adapter_name)
    file_config, tensors = read_checkpoint(model_id, is_trainable)
    config = config or file_config
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        try:
            peft_model = cls(model, config, adapter_name)
        except TargetNotFoundError as err:
            raise CheckpointError(f"The adapter in {str(model_id)!r} does not fit this model: {err}") from err
        try:
            load_state(peft_model, adapter_name, tensors, model_id)
            restore_composition(peft_model, root, is_trainable)
        except Exception:
            peft_model.unload()
            raise
    except Exception:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
        raise
    return peft_model


def restore_composition(host: PeftModel, model_id: str | os.PathLike, is_trainable: bool) -> None:
    """Load the adapters a saved composition names (each from its sub-folder) and activate it."""
    block = read_composition(model_id)
    if block is None:
        return
    for name in block.adapters():
        if name not in host.peft_config:
            host.load_adapter(io.adapter_dir(model_id, name), name, is_trainable=is_trainable)
    host.set_adapter(block)


def read_composition(model_id: str | os.PathLike) -> Composition | None:
    """The composition block saved in a checkpoint folder, or None."""
    path = Path(model_id) / COMPOSITION_FILE
    if not path.is_file():
        return None
    try:
        return composition_from_dict(json.loads(path.read_text())["active"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is not a valid composition file ({err!r}); it is corrupt.") from err


def composition_entry(model_id: str | os.PathLike, adapter_name: str) -> tuple[str | os.PathLike, str]:
    """A checkpoint whose root holds a composition but no adapter of its own starts from the block's first adapter."""
    block = None if (Path(model_id) / CONFIG_NAME).is_file() else read_composition(model_id)
    if block is None:
        return model_id, adapter_name
    first = block.adapters()[0]
    return io.adapter_dir(model_id, first), first


def read_checkpoint(model_id: str | os.PathLike, is_trainable: bool) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """The config and the tensors (model-relative names) of the adapter saved in folder ``model_id``."""
    folder = Path(model_id)
    if not folder.is_dir():
        raise CheckpointError(
            f"{str(model_id)!r} is not a folder. peftkit loads adapters from local folders written by "
            "save_pretrained (adapter_config.json + adapter_model.safetensors)."
        )
    config = config_from_dict(PeftConfig.read_dict(folder))
    config.inference_mode = not is_trainable
    return config, io.from_file_keys(io.load_tensors(folder))
