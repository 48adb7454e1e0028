"""Hot-swapping: overwrite a loaded adapter's tensors in place from a checkpoint, without re-injecting.

A server that holds a (compiled) model keeps the same modules and parameter objects; only their values change.
After :func:`prepare_model_for_compiled_hotswap` (ranks padded to one size, scales held as tensors) the shapes and
the Python attributes torch.compile guards on stay the same too, so a swap does not recompile. Nothing here knows a
method: each one's ``Method.hotswap`` / ``prepare_hotswap`` does its part; tensors no method handles are copied
as they are, and must have the loaded shapes.
"""

from __future__ import annotations

import os

import torch

from peftkit.core.merge import merged_names
from peftkit.core.method import AdapterHost
from peftkit.core.model import read_checkpoint
from peftkit.core.registry import method_of
from peftkit.errors import CheckpointError, ConfigError, MergeError, choices


def hotswap_adapter(
    peft_model: AdapterHost, model_name_or_path: str | os.PathLike, adapter_name: str = "default"
) -> None:
    """Replace the values of loaded adapter ``adapter_name`` by the adapter saved in ``model_name_or_path``.

    The checkpoint must be of the same method and adapt the same modules. Everything is checked before anything is
    written, so a bad checkpoint leaves the adapter as it was.
    """
    peft_model.check_exists(adapter_name)
    if adapter_name in merged_names(peft_model.model):
        raise MergeError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before hot-swapping it.")
    current = peft_model.peft_config[adapter_name]
    config, tensors = read_checkpoint(model_name_or_path, is_trainable=not current.inference_mode)
    source = str(model_name_or_path)
    if config.peft_type != current.peft_type:
        raise CheckpointError(
            f"{source!r} holds a {config.peft_type} adapter but {adapter_name!r} is {current.peft_type}; hot-swap "
            "replaces values only. Load it as a new adapter with load_adapter() instead."
        )
    expected = peft_model.adapter_state_dict(adapter_name)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source!r} does not adapt the same modules as {adapter_name!r}: missing {choices(missing[:3]) or '-'}, "
            f"unexpected {choices(unexpected[:3]) or '-'}. Hot-swap needs the same target_modules; use "
            "load_adapter() for a different one."
        )
    method = method_of(current)
    handled, commit = set(), None
    if method.hotswap is not None:
        handled, commit, config = method.hotswap(peft_model, adapter_name, config, tensors)
    rest = {k: v for k, v in expected.items() if k not in handled}
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs loaded {tuple(v.shape)}"
        for k, v in rest.items()
        if tensors[k].shape != v.shape
    ]
    if wrong:
        raise CheckpointError(f"{source!r} has tensors of other shapes than {adapter_name!r}: {'; '.join(wrong[:3])}.")
    with torch.no_grad():
        if commit is not None:
            commit()
        for key, param in rest.items():
            param.copy_(tensors[key].to(dtype=param.dtype, device=param.device))
    peft_model.peft_config[adapter_name] = config.replace(inference_mode=current.inference_mode)


def prepare_model_for_compiled_hotswap(peft_model: AdapterHost, *, target_rank: int | None = None) -> None:
    """Make later hot-swaps recompilation-free: call once, before ``torch.compile``.

    ``target_rank``: pad every adapter to this rank (zero rows / columns, which leave the output unchanged) so a
    checkpoint of any rank up to it fits; default: the largest rank loaded.
    """
    if hasattr(peft_model, "_orig_mod") or hasattr(peft_model.model, "_orig_mod"):
        raise ConfigError("The model is already compiled; call prepare_model_for_compiled_hotswap before compile.")
    if target_rank is not None and (not isinstance(target_rank, int) or target_rank <= 0):
        raise ConfigError(f"target_rank={target_rank!r} must be a positive integer (the largest rank to swap in).")
    for name, config in peft_model.peft_config.items():
        method = method_of(config)
        if method.prepare_hotswap is not None:
            method.prepare_hotswap(peft_model, name, target_rank)
