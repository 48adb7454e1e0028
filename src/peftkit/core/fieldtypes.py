"""Type checks for config fields, driven by the dataclass annotations (``typing.get_type_hints``).

A value is checked against its field's annotation as written: ``bool`` takes only True / False (never the string
"false", which Python would read as true), ``int`` an integer (not a bool), ``float`` a real number (ints accepted),
``str`` a string, ``Literal[...]`` one of its values, ``list[X]`` a list (tuple or set) of X, ``dict[K, V]`` a dict of
K -> V, and ``X | Y | None`` any of its members. Nothing is coerced: a wrong type is reported, not converted.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

_SCALARS: dict[Any, Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
    float: lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
    type(None): lambda v: v is None,
    Any: lambda v: True,
}
_SEQUENCES = (list, tuple, set, frozenset)


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotation of each dataclass field of ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` describes (see the module docstring)."""
    if hint in _SCALARS:
        return _SCALARS[hint](value)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in _SEQUENCES:
        item = args[0] if args else Any
        return isinstance(value, _SEQUENCES) and all(matches(v, item) for v in value)
    if origin is dict:
        key, val = args or (Any, Any)
        return isinstance(value, dict) and all(matches(k, key) and matches(v, val) for k, v in value.items())
    return isinstance(value, hint) if isinstance(hint, type) else True


def describe(hint: Any) -> str:
    """A type as a reader writes it: ``int``, ``list[str] | str | None``, ``one of 'a', 'b'``."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return " | ".join(describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and origin is None:
        return hint.__name__
    return str(hint).replace("typing.", "")


def _quoted(value: Any) -> bool:
    """A string that holds a JSON literal or a number (``"false"``, ``"16"``): written with quotes by mistake."""
    if not isinstance(value, str):
        return False
    if value.strip().lower() in ("true", "false", "null", "none"):
        return True
    try:
        float(value)
    except ValueError:
        return False
    return True


def type_problems(config: Any) -> list[str]:
    """One message per field of the dataclass ``config`` whose value does not have the annotated type."""
    problems = []
    for name, hint in field_hints(type(config)).items():
        value = getattr(config, name)
        if matches(value, hint):
            continue
        message = f"{name}={value!r} has type {type(value).__name__}; expected {describe(hint)}."
        if _quoted(value):
            message += " Write the value without quotes (true / false / a number), not as a string."
        problems.append(message)
    return problems
