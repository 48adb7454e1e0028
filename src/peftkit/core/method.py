"""What a method declares about itself; the core reads this and never branches on a method's name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from peftkit.core.config import PeftConfig

Strategy = Literal["wrap", "select", "hook"]


@dataclass(frozen=True)
class Method:
    """A PEFT method as the core sees it.

    name:          the registry key in lower case, the file name and the parameter prefix (``lora``).
    config_class:  its :class:`PeftConfig` subclass.
    strategy:      "wrap" (wrap a module), "select" (choose existing tensors) or "hook" (inputs / attention).
    inject:        ``inject(model, config, adapter_name)`` attaches one adapter; it must leave the model
                   unchanged when it raises (use :func:`peftkit.core.inject.Injection`).
    can_merge:     whether the adapter can be folded into the base weights.
    merge_hint:    why it cannot, for the error message, when ``can_merge`` is False.
    extra_trainable: optional ``f(model, config) -> {name: Parameter}``: base tensors the method also trains
                   and saves (LoRA's ``bias="all"``); names are relative to the base model.
    """

    name: str
    config_class: type[PeftConfig]
    strategy: Strategy
    inject: Callable[[nn.Module, PeftConfig, str], None]
    can_merge: bool = True
    merge_hint: str = ""
    extra_trainable: Callable[[nn.Module, PeftConfig], dict[str, nn.Parameter]] | None = None
