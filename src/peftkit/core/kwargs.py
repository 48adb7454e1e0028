"""Refuse unknown keyword arguments at the public entry points, naming the closest valid one.

A misspelt option (``is_trainble=True``) that a ``**kwargs`` swallows silently changes nothing, and the mistake
shows up much later (here: an adapter loaded frozen). :func:`strict_kwargs` turns it into an immediate
``TypeError: from_pretrained() got an unexpected keyword argument 'is_trainble'; did you mean 'is_trainable'?``.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def check_kwargs(function: str, given: Iterable[str], valid: Iterable[str]) -> None:
    """Raise TypeError for the first name in ``given`` that is not in ``valid``, suggesting the closest valid one
    (``difflib.get_close_matches``) and listing them all."""
    valid = sorted(valid)
    unknown = [name for name in given if name not in valid]
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    raise TypeError(
        f"{function}() got an unexpected keyword argument {name!r}{hint} "
        f"Valid keyword arguments: {', '.join(repr(v) for v in valid)}."
    )


def strict_kwargs(function: F) -> F:
    """Decorate a function whose signature lists every option it takes: an unknown keyword argument raises
    TypeError naming the closest valid one (see :func:`check_kwargs`) instead of Python's bare message."""
    signature = inspect.signature(function)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    valid = [p.name for p in signature.parameters.values() if p.kind in kinds and p.name not in ("self", "cls")]
    label = function.__qualname__.removesuffix(".__init__")

    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        check_kwargs(label, kwargs, valid)
        return function(*args, **kwargs)

    return checked  # type: ignore[return-value]
