"""Composition blocks: how several adapters act together (after adapter-hub/adapters' vocabulary).

    Stack("a", "b")                  a's output feeds b (at every adapted module)
    Parallel("a", "b")               the batch runs once per adapter: n outputs for one batch (multi-task inference)
    Average("a", "b", weights=...)   weighted average of the adapters' outputs
    Fusion("a", "b")                 AdapterFusion (Pfeiffer et al. 2021): attention over the adapters' outputs,
                                     whose trainable parameters are an adapter of their own, named ``name``

``pm.set_adapter(Stack("a", "b"))`` activates a composition; the layers receive it through ``set_adapter``.
Parallel needs nothing from the layers: PeftModel repeats the batch and routes copy k to adapter k with per-row
routing. The other blocks are run by layers whose class sets ``composable = True``. A composition is saved next to
the checkpoint (``composition.json``) and restored by ``PeftModel.from_pretrained``. Nothing here knows any method.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from peftkit.errors import ConfigError, choices

COMPOSITION_FILE = "composition.json"


class Composition:
    """A block over adapter names (and, for Stack and Average, over nested blocks)."""

    nestable: ClassVar[tuple[type, ...]] = ()  # block types allowed as children
    layer_level: ClassVar[bool] = True  # False: PeftModel runs it (Parallel), layers see plain names

    def __init__(self, *children: str | Composition) -> None:
        problems = []
        if len(children) < 1:
            problems.append(f"{type(self).__name__}() needs at least one adapter name.")
        for child in children:
            if isinstance(child, Composition) and not isinstance(child, self.nestable):
                allowed = ", ".join(t.__name__ for t in self.nestable) or "none"
                problems.append(
                    f"{type(self).__name__} cannot contain {type(child).__name__} (nested blocks allowed: {allowed})."
                )
            elif not isinstance(child, (str, Composition)):
                problems.append(f"{child!r} is neither an adapter name nor a composition block.")
        names = [c for c in children if isinstance(c, str)]
        if len(set(names)) != len(names):
            problems.append(f"{type(self).__name__}{tuple(children)!r} names an adapter twice.")
        if problems:
            raise ConfigError("Invalid composition:\n" + "\n".join(f"  - {p}" for p in problems))
        self.children: tuple[str | Composition, ...] = tuple(children)

    def adapters(self) -> list[str]:
        """Every adapter the block uses, inner ones first, each once."""
        out: dict[str, None] = {}
        for child in self.children:
            out.update(dict.fromkeys(child.adapters() if isinstance(child, Composition) else [child]))
        return list(out)

    def trainable(self) -> list[str]:
        """The adapters whose parameters train while the block is active."""
        out: dict[str, None] = {}
        for child in self.children:
            out.update(dict.fromkeys(child.trainable() if isinstance(child, Composition) else [child]))
        return list(out)

    def __iter__(self) -> Iterator[str]:
        return iter(self.adapters())

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(c) for c in self.children)})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "children": [c.to_dict() if isinstance(c, Composition) else c for c in self.children],
        }


class Average(Composition):
    """out = sum_i w_i * adapter_i(h); ``weights`` default to 1/n each (they are used as given, not normalised)."""

    def __init__(self, *children: str | Composition, weights: list[float] | None = None) -> None:
        super().__init__(*children)
        weights = [1.0 / len(children)] * len(children) if weights is None else [float(w) for w in weights]
        if len(weights) != len(children):
            raise ConfigError(
                f"Average{tuple(children)!r} got {len(weights)} weights for {len(children)} adapters; give one each."
            )
        self.weights = weights

    def __repr__(self) -> str:
        return f"Average({', '.join(repr(c) for c in self.children)}, weights={self.weights!r})"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "weights": self.weights}


class Fusion(Composition):
    """AdapterFusion over trained adapters; its own parameters are the adapter ``name`` (default "a,b").

    Only the fusion adapter trains while the block is active; the fused adapters stay frozen.
    """

    def __init__(self, *adapters: str, name: str | None = None) -> None:
        super().__init__(*adapters)
        self.name = name or ",".join(adapters)

    def adapters(self) -> list[str]:
        return [*self.children, self.name]

    def trainable(self) -> list[str]:
        return [self.name]

    def __repr__(self) -> str:
        return f"Fusion({', '.join(repr(c) for c in self.children)}, name={self.name!r})"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "name": self.name}


class Stack(Composition):
    """Adapters applied one after the other at every adapted module: out = b(a(h)); blocks may nest."""


Stack.nestable = (Stack, Average, Fusion)


class Parallel(Composition):
    """Run one batch through each adapter: the output holds n * batch rows, adapter k's in rows k*B .. (k+1)*B - 1.

    PeftModel repeats every batch-sized input n times and routes copy k to adapter k (per-row routing), so any
    method that supports ``adapter_names=`` supports Parallel; it is for inference (``model.eval()``).
    """

    layer_level = False

    def replicate(self, args: tuple, kwargs: dict, batch: int) -> tuple[tuple, dict]:
        """Repeat every tensor whose first dimension is the batch, once per adapter, copies one after the other."""
        n = len(self.children)

        def rep(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                return value.repeat(n, *([1] * (value.dim() - 1)))
            return value

        return tuple(rep(a) for a in args), {k: rep(v) for k, v in kwargs.items()}

    def row_names(self, batch: int) -> list[str]:
        return [name for name in self.children for _ in range(batch)]


BLOCKS: dict[str, type[Composition]] = {c.__name__: c for c in (Stack, Parallel, Average, Fusion)}


def composition_from_dict(data: dict[str, Any]) -> Composition:
    """Rebuild a block from :meth:`Composition.to_dict` (composition.json)."""
    kind = data.get("type") if isinstance(data, dict) else None
    if kind not in BLOCKS:
        raise ConfigError(f"Unknown composition block {kind!r} in {data!r}; expected one of {choices(BLOCKS)}.")
    children = [composition_from_dict(c) if isinstance(c, dict) else c for c in data.get("children", [])]
    if kind == "Average":
        return Average(*children, weights=data.get("weights"))
    if kind == "Fusion":
        return Fusion(*children, name=data.get("name"))
    return BLOCKS[kind](*children)
