"""transformers' Trainer (and TRL's trainers) on a peftkit model, with their default arguments.

How transformers treats a peft model, and what peftkit provides instead (transformers 5.x, ``trainer.py``):

- Which columns and labels: ``inspect.signature(model.forward)`` names the columns kept
  (``remove_unused_columns=True``); ``find_labels(unwrap_peft_model(model).__class__)`` the label names, which
  ``evaluate`` needs to report ``eval_loss`` and call ``compute_metrics``. peftkit: ``PeftModel.forward`` shows the
  base model's signature (core/signature.py) and ``unwrap_peft_model`` returns a peftkit model's base model.
- What a checkpoint holds: ``Trainer._save`` calls ``save_pretrained`` only on ``PreTrainedModel`` or peft's
  ``PeftModel`` (an ``isinstance`` check, and only when peft is installed); anything else has its whole state dict
  written. peftkit: for a peftkit model ``_save`` writes the adapter in peft's layout (adapter_config.json +
  adapter_model.safetensors), the tokenizer and training_args.bin, as Trainer does for a peft model.
- Resuming and ``load_best_model_at_end``: ``_load_from_checkpoint`` / ``_load_best_model`` call peft's
  ``load_adapter`` on the existing adapter name. peftkit: the checkpoint's tensors are copied into the loaded
  adapters (:func:`set_peft_model_state_dict`), all or nothing.
- TRL decides with accelerate's ``is_peft_model`` (an ``isinstance`` on peft's class) whether to disable the adapter
  for DPO's reference and where to add its fused LM head. peftkit answers True there for its models when peft is
  installed: those code paths also name peft's own classes (``BaseTunerLayer``, ``LoraConfig``, ``use_adapter``'s
  ``is_peft_available`` check), so without peft they cannot run (docs/peft_compat.md).

:func:`install` sets this up once; ``import peftkit`` calls it. Modules not imported yet are patched right after
their import (a finder on ``sys.meta_path``), so nothing here imports transformers or TRL itself. Every patch
calls the original for any model that is not a peftkit PeftModel.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from peftkit.core import io
from peftkit.core.model import PeftModel
from peftkit.errors import CheckpointError
from peftkit.integrations.peft_api import load_peft_weights, set_peft_model_state_dict

PATCHED = "_peftkit_patched"
TRL_PREFIX = "trl."


def peftkit_model(model: Any) -> PeftModel | None:
    """The peftkit PeftModel inside ``model`` (itself, or under DDP's / torch.compile's ``module`` / ``_orig_mod``)."""
    for _ in range(4):
        if isinstance(model, PeftModel):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
    return None


def load_checkpoint_adapters(model: PeftModel, folder: str | os.PathLike) -> list[str]:
    """Copy every adapter a Trainer checkpoint holds (``default`` at the root, others in sub-folders, as
    save_pretrained writes them) into the model's adapter of that name; returns the names loaded."""
    loaded = []
    for name in model.peft_config:
        path = io.adapter_dir(folder, name)
        if (path / io.WEIGHTS_NAME).is_file():
            set_peft_model_state_dict(model, load_peft_weights(path), adapter_name=name)
            loaded.append(name)
    if not loaded:
        raise CheckpointError(
            f"No adapter of this model ({', '.join(model.peft_config)}) in {str(folder)!r}: expected "
            f"{io.WEIGHTS_NAME} there (or in a sub-folder per adapter). Resume from a checkpoint this run wrote."
        )
    return loaded


# ---- transformers.trainer ----------------------------------------------------------------------------------------
def _unwrap(original: Callable[[Any], Any]) -> Callable[[Any], Any]:
    @functools.wraps(original)
    def unwrap_peft_model(model: Any) -> Any:
        return model.get_base_model() if isinstance(model, PeftModel) else original(model)

    return unwrap_peft_model


def _save(original: Callable[..., None], training_args_name: str) -> Callable[..., None]:
    @functools.wraps(original)
    def save(self: Any, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = peftkit_model(self.accelerator.unwrap_model(self.model))
        if model is None:
            return original(self, output_dir, state_dict)
        import torch

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model.save_pretrained(output_dir, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return None
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, training_args_name))
        return None

    return save


def _load_from_checkpoint(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def load(self: Any, resume_from_checkpoint: str, model: Any = None) -> None:
        found = peftkit_model(self.model if model is None else model)
        if found is None:
            return original(self, resume_from_checkpoint, model)
        load_checkpoint_adapters(found, resume_from_checkpoint)
        return None

    return load


def _load_best_model(original: Callable[[Any], None]) -> Callable[[Any], None]:
    @functools.wraps(original)
    def load_best(self: Any) -> None:
        found = peftkit_model(self.model)
        if found is None:
            return original(self)
        load_checkpoint_adapters(found, self.state.best_model_checkpoint)
        return None

    return load_best


def patch_trainer(module: ModuleType) -> None:
    """transformers.trainer: unwrap_peft_model, Trainer._save / _load_from_checkpoint / _load_best_model."""
    trainer = module.Trainer
    if getattr(trainer, PATCHED, False):
        return
    module.unwrap_peft_model = _unwrap(module.unwrap_peft_model)
    trainer._save = _save(trainer._save, getattr(module, "TRAINING_ARGS_NAME", "training_args.bin"))
    trainer._load_from_checkpoint = _load_from_checkpoint(trainer._load_from_checkpoint)
    trainer._load_best_model = _load_best_model(trainer._load_best_model)
    setattr(trainer, PATCHED, True)


# ---- TRL ---------------------------------------------------------------------------------------------------------
def _is_peft_model(original: Callable[[Any], bool]) -> Callable[[Any], bool]:
    @functools.wraps(original)
    def is_peft_model(model: Any) -> bool:
        return peftkit_model(model) is not None or original(model)

    setattr(is_peft_model, PATCHED, True)
    return is_peft_model


def patch_trl_module(module: ModuleType) -> None:
    """A TRL module that imported accelerate's ``is_peft_model``: it also answers True for peftkit models (only with
    peft installed: TRL's PEFT paths use peft's classes)."""
    original = module.__dict__.get("is_peft_model")
    if callable(original) and not getattr(original, PATCHED, False) and _peft_installed():
        module.is_peft_model = _is_peft_model(original)


@functools.lru_cache(maxsize=1)
def _peft_installed() -> bool:
    return importlib.util.find_spec("peft") is not None


def _patch_for(name: str) -> Callable[[ModuleType], None] | None:
    if name == "transformers.trainer":
        return patch_trainer
    return patch_trl_module if name.startswith(TRL_PREFIX) else None


# ---- patching modules once they are imported -----------------------------------------------------------------------
class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[ModuleType], None]) -> None:
        self.loader, self.patch = loader, patch

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.patch(module)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the modules peftkit patches, wraps the real loader so the patch runs after import."""

    def __init__(self) -> None:
        self.busy: set[str] = set()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        patch = _patch_for(name)
        if patch is None or name in self.busy:
            return None
        self.busy.add(name)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy.discard(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _PatchingLoader(spec.loader, patch)
        return spec


def install() -> None:
    """Patch what is imported already; patch the rest as it is imported. Safe to call more than once."""
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
    for name, module in list(sys.modules.items()):
        patch = _patch_for(name)
        if patch is not None and module is not None:
            patch(module)
