"""PeftModel: a base model with named adapters that can be trained, switched, merged, saved and loaded.

The API and the checkpoint layout follow Hugging Face peft, so code written for peft runs with
``from peftkit import ...``. Nothing here knows any particular method: methods attach themselves through
their :class:`peftkit.core.method.Method` entry in the registry.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.core import combine, io
from peftkit.core.compose import COMPOSITION_FILE, Composition, Parallel, composition_from_dict
from peftkit.core.config import CONFIG_NAME, PeftConfig, atomic_write_bytes, atomic_writes
from peftkit.core.inject import replace_module
from peftkit.core.layer import BASE, AdapterLayer, Routing
from peftkit.core.merge import adapter_layers, merge_layers, merged_names, unload_layers, unmerge_layers
from peftkit.core.method import Call
from peftkit.core.registry import config_from_dict, method_of
from peftkit.errors import (
    AdapterNameError,
    AdapterNotFoundError,
    CheckpointError,
    ConfigError,
    MergeError,
    RoutingError,
    TargetNotFoundError,
    choices,
)


class TunerModel(nn.Module):
    """Holds the user's model at ``.model`` so parameter names read ``base_model.model.<path>`` as in peft."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class PeftModel(nn.Module):
    """A model with adapters. Build it with :func:`peftkit.get_peft_model` or :meth:`from_pretrained`."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **_: Any) -> None:
        super().__init__()
        self.base_model = TunerModel(model)
        self.peft_config: dict[str, PeftConfig] = {}
        self._active: list[str] = []
        self._composition: Composition | None = None  # set_adapter(Stack(...)) etc.; None: effects add
        self._extra: dict[str, dict[str, nn.Parameter]] = {}
        self._disabled = False
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            self.add_adapter(adapter_name, peft_config)
        except Exception:  # nothing half-applied: the model keeps its requires_grad flags
            for p, flag in flags:
                p.requires_grad_(flag)
            raise
        self.set_adapter(adapter_name)
        checkpointing = getattr(model, "is_activation_checkpointing", None)
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if checkpointing and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    # ---- attribute access ------------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "peft_config", "_active", "_extra", "_composition"):
                raise
            for config in self.__dict__.get("peft_config", {}).values():  # a method's own operations
                function = method_of(config).functions.get(name)
                if function is not None:
                    return functools.partial(function, self)
            return getattr(self.base_model.model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    @property
    def model(self) -> nn.Module:
        return self.base_model.model

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if self._active else ""

    # ---- adapters --------------------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, peft_config: PeftConfig, low_cpu_mem_usage: bool = False) -> None:
        """Attach a new adapter (not made active: call :meth:`set_adapter`). Nothing changes on failure."""
        io.check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterNameError(
                f"An adapter named {adapter_name!r} already exists; delete_adapter({adapter_name!r}) first "
                "or choose another name."
            )
        method = method_of(peft_config)
        config = copy.deepcopy(peft_config)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        method.inject(self.model, config, adapter_name)
        extra = method.extra_trainable(self.model, config) if method.extra_trainable else {}
        self._extra[adapter_name] = extra
        self.peft_config[adapter_name] = config
        self._refresh()

    def set_adapter(self, adapter_name: str | list[str] | Composition) -> None:
        """Make these adapters active (their effects add), or a composition of them (``Stack("a", "b")``,
        ``Parallel``, ``Average``, ``Fusion``: see core/compose.py), which the layers receive. Only active
        adapters train (under a Fusion only the fusion layer)."""
        composition = adapter_name if isinstance(adapter_name, Composition) else None
        if composition is not None:
            names = composition.adapters()
        else:
            names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self.check_exists(name)
        if composition is not None and composition.layer_level:
            self._check_composable(composition)
        self._active = names
        self._composition = composition
        self._refresh()

    def _check_composable(self, composition: Composition) -> None:
        names = set(composition.adapters())
        for path, layer in adapter_layers(self.model):
            if names & set(layer.adapter_names) and not getattr(layer, "composable", False):
                raise ConfigError(
                    f"{composition!r} cannot run: the layer at {path!r} ({type(layer).__name__}) does not support "
                    "composition blocks. Use set_adapter([...]) to add the adapters' effects, or Parallel(...)."
                )

    def delete_adapter(self, adapter_name: str) -> None:
        self.check_exists(adapter_name)
        if adapter_name in merged_names(self.model):
            raise MergeError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it.")
        for name, layer in adapter_layers(self.model):
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
                if not layer.adapter_names:
                    replace_module(self.model, name, layer.base_layer)
        del self.peft_config[adapter_name]
        self._extra.pop(adapter_name, None)
        self._active = [n for n in self._active if n != adapter_name] or list(self.peft_config)[:1]
        if self._composition is not None and adapter_name in self._composition.adapters():
            self._composition = None
        self._refresh()

    def check_exists(self, name: str) -> None:
        """Raise AdapterNotFoundError, listing the loaded adapters, unless ``name`` is loaded."""
        if name not in self.peft_config:
            raise AdapterNotFoundError(
                f"No adapter named {name!r}. Loaded adapters: {choices(self.peft_config) or '(none)'}. "
                "Add it with add_adapter() or load_adapter() first."
            )

    def _refresh(self) -> None:
        """Push the active adapters into every layer and set requires_grad: only active, trainable adapters."""
        training = self._composition.trainable() if self._composition is not None else self._active
        trainable = {n for n in training if not self.peft_config[n].inference_mode}
        for _, layer in adapter_layers(self.model):
            layer.set_adapter(self._composition if self._composition is not None else self._active)
            for name in layer.adapter_names:
                for p in layer.adapter_parameters(name):
                    p.requires_grad_(name in trainable)
        extra_on = {id(p) for n in trainable for p in self._extra.get(n, {}).values()}
        for params in self._extra.values():
            for p in params.values():
                p.requires_grad_(id(p) in extra_on)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model: every adapter off (merged ones are unmerged for the duration)."""
        merged = merged_names(self.model)
        unmerge_layers(self.model)
        layers = [layer for _, layer in adapter_layers(self.model)]
        self._disabled = True
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            self._disabled = False
            for layer in layers:
                layer.disabled = False
            if merged:
                merge_layers(self.model, merged)

    # ---- forward / generate ------------------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        args, kwargs, adapter_names = self._replicate_for_parallel(args, kwargs, adapter_names)
        with self._routing(adapter_names, args, kwargs), self._prepared(args, kwargs, False) as call:
            return call.finish(self.model(*call.args, **call.kwargs))

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if not hasattr(self.model, "generate"):
            raise AttributeError(f"{type(self.model).__name__} has no generate(); use a causal LM or seq2seq model.")
        args, kwargs, adapter_names = self._replicate_for_parallel(args, kwargs, adapter_names)
        with self._routing(adapter_names, args, kwargs), self._prepared(args, kwargs, True) as call:
            return call.finish(self.model.generate(*call.args, **call.kwargs))

    @contextmanager
    def _prepared(self, args: tuple, kwargs: dict, for_generate: bool) -> Iterator[Call]:
        """Let "hook" methods (Method.prepare_inputs) rewrite the call's inputs; drop their per-call state after."""
        with ExitStack() as stack:
            call = Call(args, dict(kwargs), for_generate, stack)
            methods = {m.name: m for m in map(method_of, self.peft_config.values()) if m.prepare_inputs is not None}
            for method in methods.values():
                method.prepare_inputs(self.model, call)
            yield call

    def _replicate_for_parallel(self, args: tuple, kwargs: dict, adapter_names: list[str] | None) -> tuple:
        """Under a Parallel block: the batch once per adapter, routed copy by copy (see core/compose.py)."""
        block = self._composition
        if not isinstance(block, Parallel) or adapter_names is not None or self._disabled:
            return args, kwargs, adapter_names
        batch = _batch_size(args, kwargs)
        if batch is None:
            raise RoutingError(f"{block!r} needs a batch tensor (input_ids, inputs_embeds, ...) to repeat per adapter.")
        args, kwargs = block.replicate(args, kwargs, batch)
        return args, kwargs, block.row_names(batch)

    @contextmanager
    def _routing(self, adapter_names: list[str] | None, args: tuple, kwargs: dict) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        routing = self._make_routing(list(adapter_names), _batch_size(args, kwargs))
        layers = [layer for _, layer in adapter_layers(self.model)]
        for layer in layers:
            layer.routing = routing
        try:
            yield
        finally:
            for layer in layers:
                layer.routing = None

    def _make_routing(self, names: list[str], batch: int | None) -> Routing:
        if self.training:
            raise RoutingError("adapter_names= routes rows for inference only; call model.eval() first.")
        unknown = sorted(set(names) - set(self.peft_config) - {BASE})
        if unknown:
            raise RoutingError(
                f"adapter_names has unknown adapters {choices(unknown)}; loaded: {choices(self.peft_config)} "
                f"(or {BASE!r} for the base model)."
            )
        if batch is not None and len(names) != batch:
            raise RoutingError(f"adapter_names has {len(names)} entries for a batch of {batch} rows; give one per row.")
        if merged_names(self.model):
            raise RoutingError("adapter_names= cannot route while adapters are merged; call unmerge_adapter() first.")
        unique = tuple(dict.fromkeys(names))
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        index = torch.tensor([unique.index(n) for n in names], dtype=torch.long, device=device)
        return Routing(unique, index)

    # ---- merging ----------------------------------------------------------------------------------------
    def _check_mergeable(self, names: list[str]) -> None:
        for name in names:
            self.check_exists(name)
            method = method_of(self.peft_config[name])
            if not method.can_merge:
                raise MergeError(
                    f"Adapter {name!r} ({method.name}) cannot be merged into the base weights: {method.merge_hint} "
                    "Keep it unmerged (or use unload() to remove it)."
                )

    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        self._check_mergeable(names)
        merge_layers(self.model, names)

    def unmerge_adapter(self) -> None:
        unmerge_layers(self.model)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        """Fold the active adapters into the weights and return the plain base model (zero overhead)."""
        names = list(adapter_names) if adapter_names is not None else self.active_adapters
        self._check_mergeable(names)
        merge_layers(self.model, names)
        return unload_layers(self.model, merge=True)

    def unload(self) -> nn.Module:
        """Remove every adapter and return the base model with its original weights."""
        unmerge_layers(self.model)
        return unload_layers(self.model, merge=False)

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        **options: Any,
    ) -> None:
        """Add ``adapter_name``: a weighted combination of loaded adapters of one method (not made active).

        LoRA: ``linear``, ``cat``, ``svd`` (rank ``svd_rank``), ``ties``, ``dare_linear``, ``dare_ties`` and
        ``magnitude_prune`` (``density``, ``majority_sign_method``); the formulas are in :mod:`peftkit.core.combine`.
        """
        combine.add_weighted_adapter(
            self,
            adapters,
            weights,
            adapter_name,
            combination_type,
            svd_rank=svd_rank,
            density=density,
            majority_sign_method=majority_sign_method,
            **options,
        )

    def auxiliary_loss(self) -> torch.Tensor | float:
        """Sum of the active adapters' regularisers (0.0 when no method defines one); add it to the loss."""
        losses = [loss for _, layer in adapter_layers(self.model) if (loss := layer.auxiliary_loss()) is not None]
        return torch.stack(losses).sum() if losses else 0.0

    # ---- parameters -------------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.model.gradient_checkpointing_enable(**kwargs)
        if hasattr(self.model, "enable_input_require_grads"):
            self.model.enable_input_require_grads()

    # ---- checkpoints ------------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str, for_file: bool = False) -> dict[str, torch.Tensor]:
        """The adapter's tensors under model-relative names (no adapter name); with ``for_file``, in the layout
        save_pretrained writes (``AdapterLayer.file_state_dict``: the same tensors for most methods)."""
        self.check_exists(adapter_name)
        out: dict[str, torch.Tensor] = {}
        for path, layer in adapter_layers(self.model):
            state = layer.file_state_dict(adapter_name) if for_file else layer.adapter_state_dict(adapter_name)
            out.update({k if k in layer.root_state_keys else f"{path}.{k}": v for k, v in state.items()})
        out.update(self._extra.get(adapter_name, {}))
        return out

    @atomic_writes()
    def save_pretrained(
        self, save_directory: str | os.PathLike, selected_adapters: list[str] | None = None, **_: Any
    ) -> None:
        """Write each adapter as adapter_config.json + adapter_model.safetensors (peft's layout and keys).

        Every file is written to a temporary name and all are renamed once all are written, so a crash leaves the
        old checkpoint whole and never a half-written adapter.
        """
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        for name in names:
            self.check_exists(name)
        for name in names:
            folder = io.adapter_dir(save_directory, name)
            io.save_tensors(io.to_file_keys(self.adapter_state_dict(name, for_file=True)), folder)
            self.peft_config[name].replace(inference_mode=True).save_pretrained(folder)
        block_path = Path(save_directory) / COMPOSITION_FILE
        if self._composition is not None and set(self._composition.adapters()) <= set(names):
            text = json.dumps({"active": self._composition.to_dict()}, indent=2) + "\n"
            atomic_write_bytes(block_path, text.encode())
        elif block_path.is_file():  # a block saved earlier in this folder no longer describes it
            block_path.unlink()

    def load_adapter(
        self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **_: Any
    ) -> None:
        """Load a saved adapter under ``adapter_name``. On any problem the model is left as it was."""
        io.check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise AdapterNameError(f"An adapter named {adapter_name!r} already exists; pick another name.")
        config, tensors = read_checkpoint(model_id, is_trainable)
        try:
            self.add_adapter(adapter_name, config)
        except TargetNotFoundError as err:
            raise CheckpointError(f"The adapter in {str(model_id)!r} does not fit this model: {err}") from err
        try:
            self._load_state(adapter_name, tensors, model_id)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def _base_copies(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """File tensors ``<layer>.base_layer.<param>`` that are copies of a base weight this adapter wraps (peft
        writes them with ``save_embedding_layers``, e.g. for a targeted, possibly resized, embedding) mapped to
        that base parameter. Loaded into the base layer as peft does; layers holding merged adapters are left out."""
        out: dict[str, torch.Tensor] = {}
        for path, layer in adapter_layers(self.model):
            if adapter_name not in layer.adapter_names or layer.merged_adapters:
                continue
            for key in tensors:
                if key.startswith(f"{path}.base_layer."):
                    try:
                        out[key] = layer.get_parameter(key[len(path) + 1 :])
                    except AttributeError:
                        continue
        return out

    def _from_file_layout(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors -> the live layout, layer by layer (``AdapterLayer.load_file_state``); each key goes
        to the innermost layer holding this adapter whose path prefixes it."""
        layers = {path: layer for path, layer in adapter_layers(self.model) if adapter_name in layer.adapter_names}
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

    def _load_state(self, adapter_name: str, tensors: dict[str, torch.Tensor], source: Any) -> None:
        tensors = self._from_file_layout(adapter_name, tensors)
        own = self.adapter_state_dict(adapter_name)
        expected = {**self._base_copies(adapter_name, tensors), **own}
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

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        **_: Any,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved in ``model_id``; on failure ``model`` is left untouched."""
        io.check_adapter_name(adapter_name)
        root = model_id
        model_id, adapter_name = _composition_entry(model_id, adapter_name)
        file_config, tensors = read_checkpoint(model_id, is_trainable)
        config = config or file_config
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        try:
            try:
                peft_model = cls(model, config, adapter_name)
            except TargetNotFoundError as err:
                raise CheckpointError(f"The adapter in {str(model_id)!r} does not fit this model: {err}") from err
            try:
                peft_model._load_state(adapter_name, tensors, model_id)
                peft_model._restore_composition(root, is_trainable)
            except Exception:
                peft_model.unload()
                raise
        except Exception:
            for name, p in model.named_parameters():
                p.requires_grad_(flags.get(name, p.requires_grad))
            raise
        return peft_model

    def _restore_composition(self, model_id: str | os.PathLike, is_trainable: bool) -> None:
        """Load the adapters a saved composition names (each from its sub-folder) and activate it."""
        block = read_composition(model_id)
        if block is None:
            return
        for name in block.adapters():
            if name not in self.peft_config:
                self.load_adapter(io.adapter_dir(model_id, name), name, is_trainable=is_trainable)
        self.set_adapter(block)


def read_composition(model_id: str | os.PathLike) -> Composition | None:
    """The composition block saved in a checkpoint folder, or None."""
    path = Path(model_id) / COMPOSITION_FILE
    if not path.is_file():
        return None
    try:
        return composition_from_dict(json.loads(path.read_text())["active"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is not a valid composition file ({err!r}); it is corrupt.") from err


def _composition_entry(model_id: str | os.PathLike, adapter_name: str) -> tuple[str | os.PathLike, str]:
    """A checkpoint whose root holds a composition but no adapter of its own starts from the block's first adapter."""
    block = None if (Path(model_id) / CONFIG_NAME).is_file() else read_composition(model_id)
    if block is None:
        return model_id, adapter_name
    first = block.adapters()[0]
    return io.adapter_dir(model_id, first), first


def read_checkpoint(model_id: str | os.PathLike, is_trainable: bool) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    folder = Path(model_id)
    if not folder.is_dir():
        raise CheckpointError(
            f"{str(model_id)!r} is not a folder. peftkit loads adapters from local folders written by "
            "save_pretrained (adapter_config.json + adapter_model.safetensors)."
        )
    config = config_from_dict(PeftConfig.read_dict(folder))
    config.inference_mode = not is_trainable
    return config, io.from_file_keys(io.load_tensors(folder))


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_features", "sample", "x"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    first = args[0] if args else None
    return first.shape[0] if isinstance(first, torch.Tensor) else None


def get_peft_model(
    model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", **kwargs: Any
) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config`` (the only trainable parameters)."""
    return PeftModel(model, peft_config, adapter_name, **kwargs)


__all__ = ["AdapterLayer", "PeftModel", "TunerModel", "get_peft_model"]
