"""``PeftModel.forward`` as callers see it: the wrapped model's parameters, plus ``adapter_names``.

Tools decide what to pass by reading ``inspect.signature(model.forward)``: transformers' Trainer drops every data set
column the signature does not name (``remove_unused_columns=True``, its default) and TRL does the same. A bare
``forward(*args, **kwargs)`` would make them drop ``input_ids`` and ``labels``. :class:`SignatureFromModel` is a
descriptor: looked up on an instance it returns the bound method with a ``__signature__`` computed from that
instance's wrapped model (``self.model.forward``), so every PeftModel shows its own base model's parameters.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

ADAPTER_NAMES = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)


class BoundForward:
    """``peft_model.forward``: calls the bound method; ``inspect.signature`` reads ``__signature__``, computed only
    when asked (a forward call never pays for it)."""

    def __init__(self, method: types.MethodType) -> None:
        self.__func__, self.__self__ = method.__func__, method.__self__
        self.__name__, self.__doc__ = method.__name__, method.__doc__
        self._method = method

    @property
    def __signature__(self) -> inspect.Signature:
        instance = self.__self__
        wrapped = instance.__dict__.get("base_model") or instance._modules.get("base_model")
        return model_signature(getattr(wrapped, "model", None)) or inspect.signature(self._method)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._method(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<bound forward of {type(self.__self__).__name__}{self.__signature__}>"


class SignatureFromModel:
    """Wrap a ``forward(self, *args, adapter_names=None, **kwargs)`` so ``inspect.signature(instance.forward)`` lists
    ``instance.model.forward``'s parameters (and ``adapter_names``). On the class it is the plain function."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        functools.update_wrapper(self, function)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self.function
        return BoundForward(types.MethodType(self.function, instance))


def model_signature(model: Any) -> inspect.Signature | None:
    """The wrapped model's forward signature with ``adapter_names`` added (keyword-only), or None when unknown."""
    forward = getattr(model, "forward", None)
    function = getattr(forward, "__func__", None)
    if function is not None:  # a method: cache per class function, drop ``self``
        return _method_signature(function)
    return None if forward is None else _with_adapter_names(forward, skip=0)


@functools.lru_cache(maxsize=64)
def _method_signature(function: Callable[..., Any]) -> inspect.Signature | None:
    return _with_adapter_names(function, skip=1)


def _with_adapter_names(function: Callable[..., Any], skip: int) -> inspect.Signature | None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without one
        return None
    params = list(signature.parameters.values())[skip:]
    if any(p.name == ADAPTER_NAMES.name for p in params):
        return signature.replace(parameters=params)
    keyword = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=[*rest, ADAPTER_NAMES, *keyword])
