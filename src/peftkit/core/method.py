"""What a method declares about itself; the core reads this and never branches on a method's name."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from peftkit.core.config import PeftConfig

if TYPE_CHECKING:
    from peftkit.core.compose import Composition


class AdapterHost(Protocol):
    """What a method's hooks receive: the public operations of a :class:`peftkit.PeftModel` they may use.

    Hooks never touch a PeftModel's private state; anything a hook needs that is not listed here belongs on
    PeftModel as a public operation first.
    """

    peft_config: dict[str, PeftConfig]

    @property
    def model(self) -> nn.Module: ...  # the user's model, with the adapter layers in it

    @property
    def active_adapters(self) -> list[str]: ...

    @property
    def active_adapter(self) -> str: ...

    def check_exists(self, adapter_name: str) -> None: ...  # AdapterNotFoundError when not loaded

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None: ...

    def delete_adapter(self, adapter_name: str) -> None: ...

    def set_adapter(self, adapter_name: str | list[str] | Composition) -> None: ...

    def adapter_state_dict(self, adapter_name: str, for_file: bool = False) -> dict[str, torch.Tensor]: ...

    def modules(self) -> Iterator[nn.Module]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


@dataclass(frozen=True)
class Training:
    """How `peftkit train` (and other loops that ask) trains a method's adapters.

    learning_rate:  the peak AdamW rate used when no ``lr`` is given: one that works at small budgets (few
                    parameters train at high rates, whole blocks at low ones).
    param_groups:   optional ``f(host, lr, weight_decay) -> optimizer groups`` when some tensors train at their own
                    rate (diff pruning's gates); None: every trainable tensor at ``lr``.
    after_training: optional ``f(host)`` the loop runs once, after ``after_training_at`` of its steps (by default
                    after the last one, before the final evaluation and save), e.g. diff pruning's finalize.
    after_training_at: the share of the run's optimizer steps after which ``after_training`` runs: 1.0 (the default)
                    after the last step; below 1 (diff pruning: 0.75) part-way, as a stage change: the loop then
                    builds a new optimizer over what trains now (``param_groups`` again), continues the lr schedule
                    where it was (no second warmup) and trains to the end. A resumable checkpoint written after the
                    change restores the adapter from its own files (``load_adapter``), so the method's saved files
                    must describe the changed adapter fully.
    after_step:     optional ``f(host, step, total_steps)`` the loop runs after each optimizer step (``step`` counts
                    them from 1), before the gradients are cleared: AdaLoRA's budget allocation reads them.
    report:         optional ``f(host) -> str`` the loop prints at the end of a run (AdaLoRA's rank per layer).
    before_training: optional ``f(host, batches)`` the loop runs once before building the optimizer, with a few
                    training batches (dicts of tensors on the model's device), built only as the hook iterates
                    them: data-driven inits (LoRA's EVA).
    """

    learning_rate: float = 5e-4
    param_groups: Callable[[AdapterHost, float, float], list[dict[str, Any]]] | None = None
    after_training: Callable[[AdapterHost], Any] | None = None
    after_training_at: float = 1.0
    after_step: Callable[[AdapterHost, int, int], Any] | None = None
    report: Callable[[AdapterHost], str] | None = None
    before_training: Callable[[AdapterHost, Iterable[dict[str, torch.Tensor]]], Any] | None = None


@dataclass(frozen=True)
class Method:
    """A PEFT method as the core sees it.

    name:          the registry key in lower case, the file name and the parameter prefix (``lora``).
    config_class:  its :class:`PeftConfig` subclass.
    inject:        ``inject(model, config, adapter_name)`` attaches one adapter; it must leave the model
                   unchanged when it raises (use :func:`peftkit.core.inject.Injection`).
    can_merge:     whether the adapter can be folded into the base weights.
    merge_hint:    why it cannot, for the error message, when ``can_merge`` is False.
    extra_trainable: optional ``f(model, config) -> {name: Parameter}``: base tensors the method also trains
                   and saves (LoRA's ``bias="all"``); names are relative to the base model.
    prepare_inputs: optional ``f(model, call)`` for methods that hook the inputs, run before every PeftModel.forward
                   and generate while any adapter of this method is loaded: it may rewrite ``call.args`` /
                   ``call.kwargs`` (prepend soft prompts, extend the attention mask), register cleanups on
                   ``call.cleanup`` and output transforms in ``call.outputs``. It reads which adapters are live
                   (active, disabled, per-row routing) from its own AdapterLayers, as their forward does.
    combine:       optional ``f(host, adapters, weights, new_name, combination_type, **options)``: add adapter
                   ``new_name`` as a weighted combination of loaded ones (PeftModel.add_weighted_adapter; the tensor
                   arithmetic lives in :mod:`peftkit.core.combine`); None: the method cannot combine.
    hotswap:       optional ``f(host, adapter_name, config, tensors) -> (keys, commit, config)``: check a checkpoint's
                   tensors (model-relative keys) against a loaded adapter, return the keys it handles, a
                   ``commit()`` that writes them in place and the config to record (peftkit.core.hotswap); None:
                   the core copies tensors of identical shapes.
    prepare_hotswap: optional ``f(host, adapter_name, target_rank)``: make later hot-swaps shape- and value-stable
                   under torch.compile (pad ranks, turn Python scalars into tensors).
    weight_conversion: optional ``f(config, trained_tensors, initial_tensors) -> (tensors, config)`` for methods whose
                   initialisation changes the base weights (LoRA's PiSSA / OLoRA): an equivalent adapter for the
                   original base weights, from the trained one and the one saved right after initialisation
                   (``save_pretrained(path_initial_model_for_weight_conversion=...)``, peft's name).
    training:      the training-loop settings (:class:`Training`).
    functions:     extra operations ``{name: f(host, *args, **kwargs)}`` that PeftModel exposes as
                   ``peft_model.<name>(...)`` while an adapter of this method is loaded (diff pruning's ``finalize``).
    """

    name: str
    config_class: type[PeftConfig]
    inject: Callable[[nn.Module, PeftConfig, str], None]
    can_merge: bool = True
    merge_hint: str = ""
    extra_trainable: Callable[[nn.Module, PeftConfig], dict[str, nn.Parameter]] | None = None
    prepare_inputs: Callable[[nn.Module, Call], None] | None = None
    combine: Callable[..., None] | None = None
    hotswap: Callable[..., tuple[set[str], Callable[[], None], PeftConfig]] | None = None
    prepare_hotswap: Callable[[AdapterHost, str, int | None], None] | None = None
    weight_conversion: Callable[..., tuple[dict[str, torch.Tensor], PeftConfig]] | None = None
    training: Training = Training()
    functions: Mapping[str, Callable[..., Any]] = field(default_factory=dict, hash=False, compare=False)


@dataclass
class Call:
    """One PeftModel.forward or generate call, as the methods' ``prepare_inputs`` see and change it."""

    args: tuple
    kwargs: dict[str, Any]
    for_generate: bool
    cleanup: ExitStack  # callbacks run when the call returns (e.g. drop per-call state from layers)
    outputs: list[Callable[[Any], Any]] = field(default_factory=list)  # applied to the result, in order

    def finish(self, result: Any) -> Any:
        for transform in self.outputs:
            result = transform(result)
        return result
