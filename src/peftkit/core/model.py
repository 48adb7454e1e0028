"""PeftModel: a base model with named adapters that can be trained, switched, merged, saved and loaded.

The API and the checkpoint layout follow Hugging Face peft, so code written for peft runs with
``from peftkit import ...``. Nothing here knows any particular method: methods attach themselves through
their :class:`peftkit.core.method.Method` entry in the registry.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from peftkit.core import checkpoint, combine, hub, io, lifecycle
from peftkit.core.checkpoint import read_checkpoint, read_composition  # noqa: F401  (moved; re-exported)
from peftkit.core.compose import Composition, Parallel
from peftkit.core.config import PeftConfig
from peftkit.core.inject import replace_module
from peftkit.core.kwargs import strict_kwargs
from peftkit.core.layer import BASE, AdapterLayer, Routing, routed
from peftkit.core.lifecycle import TunerModel
from peftkit.core.merge import adapter_layers, merged_names, unload_layers, unmerge_layers
from peftkit.core.method import Call
from peftkit.core.registry import method_of
from peftkit.core.signature import SignatureFromModel
from peftkit.errors import AdapterNameError, AdapterNotFoundError, MergeError, RoutingError, choices


class PeftModel(nn.Module):
    """A model with adapters. Build it with :func:`peftkit.get_peft_model` or :meth:`from_pretrained`."""

    @strict_kwargs
    def __init__(
        self,
        model: nn.Module,
        peft_config: PeftConfig,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
    ) -> None:
        super().__init__()
        lifecycle.refuse_wrapped(model)
        self.base_model = TunerModel(model)
        self.peft_config: dict[str, PeftConfig] = self.base_model.peft_config
        self._composition: Composition | None = None  # set_adapter(Stack(...)) etc.; None: effects add
        self._extra: dict[str, dict[str, nn.Parameter]] = {}
        self._disable_depth, self._remerge = 0, []  # nested disable_adapter() blocks; merged before the outermost
        self._base_grad = lifecycle.grad_flags(model)  # restored by unload() / merge_and_unload()
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            self.add_adapter(adapter_name, peft_config, low_cpu_mem_usage, autocast_adapter_dtype)
        except Exception:  # nothing half-applied: the model keeps its requires_grad flags
            lifecycle.restore_grad_flags(model, self._base_grad)
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
    def _active(self) -> list[str]:
        return self.base_model.active_names

    @_active.setter
    def _active(self, names: list[str]) -> None:
        self.base_model.active_names = list(names)

    @property
    def _disabled(self) -> bool:
        return self._disable_depth > 0

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if self._active else ""

    # ---- adapters --------------------------------------------------------------------------------------
    @strict_kwargs
    def add_adapter(
        self,
        adapter_name: str,
        peft_config: PeftConfig,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Attach a new adapter (not made active: call :meth:`set_adapter`). Nothing changes on failure.
        ``autocast_adapter_dtype`` (peft's rule): float16 / bfloat16 adapter tensors become float32; False: they take
        the wrapped module's dtype. ``low_cpu_mem_usage`` is accepted for peft's API: adapters are always allocated
        once, on the base layer's device."""
        adapter_name = io.check_adapter_name(adapter_name)  # NFC form
        if adapter_name in self.peft_config:
            raise AdapterNameError(
                f"An adapter named {adapter_name!r} already exists; delete_adapter({adapter_name!r}) first "
                "or choose another name."
            )
        method = method_of(peft_config)
        config = copy.deepcopy(peft_config)
        if config.base_model_name_or_path is None:
            named = getattr(getattr(self.model, "config", None), "_name_or_path", None)
            config.base_model_name_or_path = hub.recorded_name(named)  # a local folder: its absolute path
        method.inject(self.model, config, adapter_name)
        lifecycle.cast_adapter(self.model, adapter_name, autocast_adapter_dtype)
        extra = method.extra_trainable(self.model, config) if method.extra_trainable else {}
        self._extra[adapter_name] = extra
        self.peft_config[adapter_name] = config
        self._refresh()

    def set_adapter(self, adapter_name: str | list[str] | Composition) -> None:
        """Make these adapters active (their effects add), or a composition of them (``Stack("a", "b")``,
        ``Parallel``, ``Average``, ``Fusion``: see core/compose.py), which the layers receive. Only active
        adapters train (under a Fusion only the fusion layer). Merged adapters left out are unmerged first (a warning).
        """
        names, composition = lifecycle.selection(self, adapter_name)
        lifecycle.unmerge_stale(self.model, names)
        self._remerge = [n for n in self._remerge if n in names]
        self._active = names
        self._composition = composition
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        self.check_exists(lifecycle.single_name(adapter_name, "delete_adapter", self.peft_config))
        if adapter_name in merged_names(self.model):
            raise MergeError(f"Adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it.")
        checkpoint.restore_base_copies(self, adapter_name)  # base weights its embedding copy replaced
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
            layer.disabled = self._disabled
            for name in layer.adapter_names:
                for p in layer.adapter_parameters(name):
                    p.requires_grad_(name in trainable)
        extra_on = {id(p) for n in trainable for p in self._extra.get(n, {}).values()}
        for params in self._extra.values():
            for p in params.values():
                p.requires_grad_(id(p) in extra_on)

    def disable_adapter(self) -> AbstractContextManager[None]:
        """Run the base model: every adapter off (merged ones unmerged for the duration); blocks nest."""
        return lifecycle.adapters_off(self)

    # ---- forward / generate ------------------------------------------------------------------------------
    @SignatureFromModel  # inspect.signature shows the wrapped model's parameters (transformers' Trainer reads it)
    def forward(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        args, kwargs, adapter_names = self._replicate_for_parallel(args, kwargs, adapter_names)
        with self._routing(adapter_names, args, kwargs), self._prepared(args, kwargs, False) as call:
            return call.finish(self.model(*call.args, **call.kwargs))

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        if not hasattr(self.model, "generate"):
            raise AttributeError(f"{type(self.model).__name__} has no generate(); use a causal LM or seq2seq model.")
        args, kwargs, adapter_names = self._replicate_for_parallel(args, kwargs, adapter_names)
        with self._routing(adapter_names, args, kwargs, True), self._prepared(args, kwargs, True) as call:
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
    def _routing(
        self, adapter_names: list[str] | None, args: tuple, kwargs: dict, for_generate: bool = False
    ) -> Iterator[None]:
        """The call's per-row routing, held in a ContextVar (core/layer.py ``routed``), not on the shared layers:
        concurrent calls on one model (threads, asyncio tasks) each see their own."""
        if isinstance(adapter_names, str):  # never its letters
            raise TypeError(
                f"adapter_names={adapter_names!r} is one string; give one adapter name per row, e.g. adapter_names="
                f"[{adapter_names!r}] * batch_size (or set_adapter({adapter_names!r}) for the whole batch)."
            )
        names = None if adapter_names is None else list(adapter_names)
        routing = None if names is None else self._make_routing(names, _batch_size(args, kwargs), for_generate)
        with routed(routing):
            yield

    def _make_routing(self, names: list[str], batch: int | None, for_generate: bool = False) -> Routing:
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
        unique = tuple(dict.fromkeys(names))
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        index = torch.tensor([unique.index(n) for n in names], dtype=torch.long, device=device)
        return Routing(unique, index, repeats=for_generate)  # generate: beams / sequences repeat rows

    # ---- merging ----------------------------------------------------------------------------------------
    @strict_kwargs
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold ``adapter_names`` (default: the active adapters) into the base weights; one already merged is skipped
        with a warning. ``safe_merge``: on a NaN / inf result raise MergeError, the weights left unchanged."""
        lifecycle.merge(self.model, lifecycle.merge_names(self, adapter_names), safe_merge)

    def unmerge_adapter(self) -> None:
        unmerge_layers(self.model)

    @strict_kwargs
    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Fold exactly ``adapter_names`` (default: the active adapters) into the weights, drop every other adapter
        unmerged, and return the plain base model (zero overhead) with its parameters' requires_grad as before
        wrapping."""
        names = lifecycle.merge_names(self, adapter_names)
        lifecycle.merge(self.model, names, safe_merge)
        return lifecycle.restore_grad_flags(unload_layers(self.model, names, progressbar), self._base_grad)

    def unload(self) -> nn.Module:
        """Remove every adapter and return the base model with its original weights and requires_grad flags."""
        unmerge_layers(self.model)
        checkpoint.restore_base_copies(self)  # base weights replaced by adapters' embedding copies
        return lifecycle.restore_grad_flags(unload_layers(self.model), self._base_grad)

    @strict_kwargs
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        generator: torch.Generator | None = None,
    ) -> None:
        """Add ``adapter_name``: a weighted combination of loaded adapters of one method (not made active).

        LoRA: ``linear``, ``cat``, ``svd`` (rank ``svd_rank``), ``ties``, ``dare_linear``, ``dare_ties`` and
        ``magnitude_prune`` (``density``, ``majority_sign_method``; ``generator`` seeds dare's random drop); the
        formulas are in :mod:`peftkit.core.combine`.
        """
        combine.add_weighted_adapter(
            self,
            lifecycle.name_list(adapters, "adapters"),
            weights,
            adapter_name,
            combination_type,
            svd_rank=svd_rank,
            density=density,
            majority_sign_method=majority_sign_method,
            **({"generator": generator} if generator is not None else {}),
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

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None) -> None:
        # transformers' signature: TRL passes the kwargs dict positionally
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if hasattr(self.model, "enable_input_require_grads"):
            self.model.enable_input_require_grads()

    # ---- checkpoints (core/checkpoint.py: signatures and docs there) ------------------------------------------
    adapter_state_dict = checkpoint.adapter_state_dict
    save_pretrained = strict_kwargs(checkpoint.save_pretrained)  # peft's options; all or nothing
    push_to_hub = strict_kwargs(hub.push_to_hub)  # save_pretrained's files, one Hub commit
    load_adapter = strict_kwargs(checkpoint.load_adapter)  # -> LoadResult(missing_keys, unexpected_keys)
    _load_state = checkpoint.load_state

    @classmethod
    @strict_kwargs
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        allow_non_finite: bool = False,
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved in ``model_id``; on failure ``model`` is left untouched. As in peft,
        unless ``is_trainable`` the result is for inference: in eval mode (dropout off), the adapter frozen (also with
        a given ``config``). A model that already holds adapters is refused (use its PeftModel's load_adapter)."""
        lifecycle.refuse_wrapped(model)
        config = config.replace(inference_mode=not is_trainable) if config is not None else None
        peft_model = checkpoint.from_pretrained(
            cls, model, model_id, adapter_name, is_trainable, config, allow_non_finite
        )
        for name in peft_model.peft_config:
            lifecycle.cast_adapter(peft_model.model, name, autocast_adapter_dtype)
        return peft_model if is_trainable else peft_model.eval()


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for key in ("input_ids", "inputs_embeds", "pixel_values", "input_features", "sample", "x"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    first = args[0] if args else None
    return first.shape[0] if isinstance(first, torch.Tensor) else None


@strict_kwargs
def get_peft_model(
    model: nn.Module,
    peft_config: PeftConfig,
    adapter_name: str = "default",
    mixed: bool = False,
    autocast_adapter_dtype: bool = True,
    revision: str | None = None,
    low_cpu_mem_usage: bool = False,
) -> PeftModel:
    """Wrap ``model`` with a new adapter described by ``peft_config`` (the only trainable parameters). peft's
    signature: ``revision`` (the base model's) is recorded in the adapter's config; ``mixed`` is accepted and changes
    nothing (a PeftModel holds adapters of different methods at once); ``autocast_adapter_dtype`` and
    ``low_cpu_mem_usage`` as in :meth:`PeftModel.add_adapter`. A model another PeftModel wraps is refused."""
    config = lifecycle.with_revision(peft_config, revision)
    return PeftModel(model, config, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage)


__all__ = ["AdapterLayer", "PeftModel", "TunerModel", "get_peft_model"]
