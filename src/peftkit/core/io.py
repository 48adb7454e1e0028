"""Checkpoint I/O: peft-compatible tensor key names and safetensors files (never pickle)."""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from peftkit.core.config import PeftConfig
from peftkit.core.files import atomic_write_bytes
from peftkit.errors import AdapterNameError, CheckpointError

WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
PREFIX = "base_model.model."  # peft's key prefix: PeftModel.base_model (tuner) .model (the user's model)
TUNER_PREFIX = "base_model."  # a key under the tuner but not the model: a model-level tensor (see to_file_keys)
DEFAULT_ADAPTER = "default"


# Names an adapter may not have: they are attributes of the ModuleDicts that hold adapters per layer
# (``layer.lora_A.keys``) or of torch modules, so ``container[name]`` and ``container.name`` would disagree.
_MODULE_ATTRIBUTES = frozenset(dir(nn.ModuleDict)) | frozenset(vars(nn.ModuleDict()))
NAME_MAX = 255  # bytes in one file-system name (ext4, APFS, NTFS)


def check_adapter_name(name: object) -> str:
    """The adapter name in NFC form (so NFC and NFD spellings are one adapter), or AdapterNameError.

    Names become folder names and ModuleDict keys: refuse non-strings, empty names, names that could escape the
    folder or are longer than the file system allows, names with '.' (a parameter-path separator) and names of
    torch Module / ModuleDict attributes."""
    problem = _name_problem(name)
    if problem:
        raise AdapterNameError(
            f"Invalid adapter name {name!r}: {problem}. An adapter name must be a non-empty string without '/', "
            "'\\\\', '.' or NUL, at most 255 bytes, not '__base__' nor a torch Module attribute such as "
            "'training' or 'keys' (it names a sub-folder of the checkpoint and a ModuleDict key). "
            "Use e.g. 'sst2' or 'task_a'."
        )
    return unicodedata.normalize("NFC", name)


def _name_problem(name: object) -> str:
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not a str"
    name = unicodedata.normalize("NFC", name)
    if not name.strip() or name == "__base__":
        return "it is empty or reserved"
    if any(sep in name for sep in ("/", "\\", "\x00", ".")) or os.path.isabs(name):
        return "it holds a path separator, '.' or NUL"
    if len(name.encode("utf-8", "surrogatepass")) > NAME_MAX:
        return f"it is {len(name.encode('utf-8', 'surrogatepass'))} bytes long, more than a file name may be"
    if name in _MODULE_ATTRIBUTES:
        return "it is the name of a torch Module attribute"
    return ""


def adapter_dir(root: str | os.PathLike, adapter_name: str) -> Path:
    """peft's layout: the default adapter at the root, every other one in a sub-folder named after it."""
    return Path(root) if adapter_name == DEFAULT_ADAPTER else Path(root) / check_adapter_name(adapter_name)


def check_save_directory(path: str | os.PathLike) -> Path:
    """``path`` as a folder save_pretrained can write into (created if absent), or a CheckpointError that says why
    not: it is a file, lies under a file, or is not writable."""
    folder = Path(path)
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == folder else f"lies under {str(blocker)!r}, which is a file"
        raise CheckpointError(f"Cannot save into {str(path)!r}: it {where}. Pass a folder path (it is created).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"Cannot create {str(path)!r} ({err.strerror}). Pass a writable path.") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CheckpointError(f"Cannot save into {str(path)!r}: the folder is read-only. Pass a writable folder.")
    return folder


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
    """Model-relative names -> peft's file keys. Model-level tensors (AdapterLayer.root_state_keys) are written as
    they are: a name without a module path (peft's 'prompt_embeddings') or one already under peft's tuner
    (``base_model.vera_A``: VeRA's shared projections live on the tuner, not in the user's model)."""
    return {(k if "." not in k or k.startswith(TUNER_PREFIX) else PREFIX + k): v for k, v in tensors.items()}


def from_file_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's file keys -> model-relative names (keys saved without the prefix are accepted as they are).
    Two keys for one parameter (with and without the prefix) are refused: which one would win is arbitrary."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, str] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PREFIX)
        if name in seen:
            raise CheckpointError(
                f"The checkpoint holds two tensors for one parameter: {seen[name]!r} and {key!r}. "
                "Keep one of them (peft writes the 'base_model.model.' form) and save the file again."
            )
        seen[name] = key
        out[name] = value
    return out


def file_shapes(directory: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Model-relative tensor names -> shapes, read from the safetensors header only (no tensor is loaded)."""
    path = Path(directory) / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k.removeprefix(PREFIX): tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); the checkpoint is corrupt.") from err


def model_card(adapter_name: str, config: PeftConfig) -> str:
    """README.md beside the adapter: the Hugging Face Hub metadata peft writes (base_model, library_name) and what
    the adapter is."""
    base = config.base_model_name_or_path
    header = ["---", *([f"base_model: {json.dumps(base)}"] if base else []), "library_name: peft"]
    header += ["tags:", "- peftkit", f"- {config.peft_type.lower()}", "---", ""]
    body = [
        f"# {adapter_name}",
        "",
        f"A {config.peft_type} adapter{f' for `{base}`' if base else ''}, saved by peftkit in Hugging Face peft's "
        "format (adapter_config.json + adapter_model.safetensors).",
        "",
        "```python",
        "from peftkit import PeftModel",
        "",
        "model = PeftModel.from_pretrained(base_model, path)",
        "```",
        "",
    ]
    return "\n".join(header + body)
