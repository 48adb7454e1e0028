"""One adapted module's update as LoRA factors, the in-memory form every Stable Diffusion file format maps to.

:class:`ModuleLora` holds ``down`` / ``up`` / ``alpha`` with ΔW = (alpha / r) up @ down. A full weight delta
(LyCORIS LoHa / LoKr / diff) is a :class:`DeltaLora`: an exact LoRA of rank min(out, n) whose shapes are known from
the file's factor shapes, while ΔW itself is computed only when ``down`` or ``up`` is first read, so a file is checked
against the model's layer shapes before any weight-sized tensor is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from peftkit.errors import CheckpointError

# The largest ΔW one module may ask for: 2**28 values = 1 GiB of float32. SDXL's largest adapted layer (a 3x3
# conv, 1280 -> 2560) has 29.5M weights; a file whose factors multiply out beyond this is crafted or corrupt.
MAX_DELTA_VALUES = 2**28


@dataclass
class ModuleLora:
    """One module's update as LoRA factors: ΔW = (alpha / r) * up @ down, r = down.shape[0].

    ``down`` is (r, in) or (r, in, kh, kw) or flat (r, in * kh * kw); ``up`` is (out, r) or (out, r, 1, 1)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(down shape, up shape), without computing anything."""
        return tuple(self.down.shape), tuple(self.up.shape)


class DeltaLora(ModuleLora):
    """A full ΔW of shape (out, n) as exact LoRA factors, computed on first use of ``down`` / ``up``.

    n <= out: down = I_n, up = ΔW; else down = ΔW, up = I_out; alpha = r = min(out, n), so the scale is 1 and
    up @ down == ΔW exactly. ``compute`` returns ΔW as an (out, n) tensor.
    """

    def __init__(self, name: str, shape: tuple[int, int], compute: Callable[[], torch.Tensor]) -> None:
        out, n = shape
        if out * n > MAX_DELTA_VALUES:
            raise CheckpointError(
                f"Module {name!r}: its factors multiply out to a ({out}, {n}) weight delta ({out * n:,d} values, "
                f"more than {MAX_DELTA_VALUES:,d}); no Stable Diffusion layer is that large. The file is crafted or "
                "corrupt; load a LyCORIS file made for this model."
            )
        self.name, self.shape, self._compute = name, (out, n), compute
        self.alpha = float(min(out, n))
        self._factors: ModuleLora | None = None

    @property
    def rank(self) -> int:
        return min(self.shape)

    def factor_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out, n = self.shape
        return ((n, n), (out, n)) if n <= out else ((out, n), (out, out))

    @property
    def down(self) -> torch.Tensor:
        return self._materialise().down

    @property
    def up(self) -> torch.Tensor:
        return self._materialise().up

    def _materialise(self) -> ModuleLora:
        if self._factors is None:
            delta = self._compute()
            if tuple(delta.shape) != self.shape:  # the shape rules in lycoris.py and the formulas disagree: a bug
                raise RuntimeError(f"Module {self.name!r}: computed ΔW {tuple(delta.shape)}, expected {self.shape}.")
            self._factors = exact_factors(delta)
        return self._factors


def exact_factors(delta: torch.Tensor) -> ModuleLora:
    """ΔW (out, n) as LoRA factors with up @ down == ΔW exactly and scale 1."""
    out, n = delta.shape
    if n <= out:
        return ModuleLora(torch.eye(n), delta.clone(), float(n))
    return ModuleLora(delta.clone(), torch.eye(out), float(out))
