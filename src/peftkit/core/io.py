"""Checkpoint I/O: peft-compatible tensor key names and safetensors files (never pickle)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from peftkit.core.files import atomic_write_bytes
from peftkit.errors import AdapterNameError, CheckpointError

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # peft's key prefix: PeftModel.base_model (tuner) .model (the user's model)
DEFAULT_ADAPTER = "default"


def check_adapter_name(name: object) -> str:
    """Adapter names become folder names: refuse ones that are empty or could escape the folder."""
    bad = (
        not isinstance(name, str)
        or not name.strip()
        or name in (".", "..", "__base__")
        or any(sep in name for sep in ("/", "\\", "\x00"))
        or os.path.isabs(name)
    )
    if bad:
        raise AdapterNameError(
            f"Invalid adapter name {name!r}: it must be a non-empty string without '/', '\\\\' or NUL, "
            "not '.', '..' or '__base__' (it names a sub-folder of the checkpoint). Use e.g. 'sst2' or 'task_a'."
        )
    return name


def adapter_dir(root: str | os.PathLike, adapter_name: str) -> Path:
    """peft's layout: the default adapter at the root, every other one in a sub-folder named after it."""
    return Path(root) if adapter_name == DEFAULT_ADAPTER else Path(root) / check_adapter_name(adapter_name)


def save_tensors(tensors: dict[str, torch.Tensor], directory: str | os.PathLike, metadata: dict | None = None) -> None:
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(Path(directory) / WEIGHTS_NAME, save(data, metadata={"format": "pt", **(metadata or {})}))


def load_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        if (Path(directory) / "adapter_model.bin").is_file():
            raise CheckpointError(
                f"{directory} holds only adapter_model.bin (a pickle). peftkit never unpickles checkpoints; "
                "re-save it with safetensors (peft: save_pretrained(..., safe_serialization=True))."
            )
        raise CheckpointError(f"No {WEIGHTS_NAME} in {str(directory)!r}; pass the folder save_pretrained wrote.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); the checkpoint is corrupt.") from err


def to_file_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model-relative names -> peft's file keys. A name without a module path is a model-level tensor
    (AdapterLayer.root_state_keys, e.g. peft's 'prompt_embeddings') and is written as it is."""
    return {(PREFIX + k if "." in k else k): v for k, v in tensors.items()}


def from_file_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's file keys -> model-relative names (keys saved without the prefix are accepted as they are)."""
    return {k.removeprefix(PREFIX): v for k, v in tensors.items()}
