"""Compacter (Karimi Mahabadi et al. 2021, "Compacter: Efficient Low-Rank Hypercomplex Adapter Layers").

Bottleneck adapters (methods/bottleneck.py) whose down- and up-projections are parameterised hypercomplex
multiplication (PHM) layers (section 3, eq. 3), y = x W + b with

    W = sum_{i=1..n} A_i ⊗ B_i          A_i: (n, n), B_i: (d_in / n, d_out / n), n = phm_dim

The "slow" matrices A_i are shared by every Compacter layer of the adapter (section 3.2); the "fast" matrices
are low-rank, B_i = s_i t_i^T with s_i: (d_in / n, r), t_i: (r, d_out / n), r = phm_rank (1 in the paper).
For L transformer layers with two adapters each (Houlsby placement) this makes (section 3.3, biases aside)

    n^3 + 4 L (k + d)  weights  (Compacter);   n^3 + 2 L (k + d)  with one adapter per layer (Compacter++)

Checkpoint layout: each layer saves ``compacter_down.phm_s``, ``compacter_down.phm_t``, ``compacter_down.bias`` and
the same for ``compacter_up``; the shared rule A (n, n, n) is saved once, under the first adapted module:
``base_model.model.<first module>.compacter_rule.phm_rule``. Loading points every layer at that one tensor.

This is the one method module that imports another (methods/bottleneck.py): a Compacter adapter *is* a bottleneck
adapter with other projections, so it extends BottleneckConfig, lives in BottleneckLayer (which runs both kinds, so
that they stack and fuse together) and uses bottleneck's placement. Moving that into core would make core name a
method; copying it would fork the placement and the composition logic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.method import Method, Training
from peftkit.errors import ConfigError
from peftkit.methods import bottleneck
from peftkit.methods.bottleneck import BottleneckConfig, BottleneckLayer

_COMMON = dict(parallel=False, reduction_factor=32, non_linearity="gelu")
PRESETS: dict[str, dict[str, Any]] = {
    "compacter": dict(mh_adapter=True, output_adapter=True, **_COMMON),  # Houlsby placement
    "compacter++": dict(mh_adapter=False, output_adapter=True, **_COMMON),  # Pfeiffer placement
}


def kron_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_i A_i ⊗ B_i for a: (n, p, q), b: (n, r, s) -> (p r, q s)."""
    _, p, q = a.shape
    _, r, s = b.shape
    return torch.einsum("ipq,irs->prqs", a, b).reshape(p * r, q * s)


class PHMRule(nn.Module):
    """The shared slow matrices A_1..A_n, one (n, n, n) tensor."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.phm_rule = nn.Parameter(torch.randn(n, n, n) / math.sqrt(n))


class PHMLinear(nn.Module):
    """y = x (sum_i A_i ⊗ s_i t_i) + b; A comes from the shared :class:`PHMRule` at call time."""

    def __init__(self, d_in: int, d_out: int, n: int, rank: int) -> None:
        super().__init__()
        std = (rank * d_in) ** -0.25  # so that Var(W) ~ 1 / d_in with Var(A) = 1 / n
        self.phm_s = nn.Parameter(torch.randn(n, d_in // n, rank) * std)
        self.phm_t = nn.Parameter(torch.randn(n, rank, d_out // n) * std)
        self.bias = nn.Parameter(torch.zeros(d_out))
        self._cached: tuple[tuple, torch.Tensor] | None = None  # (factor versions, W) for inference

    def weight(self, rule: torch.Tensor) -> torch.Tensor:
        """W = sum_i A_i ⊗ s_i t_i, (d_in, d_out). Without autograd (inference) it is built once and reused until
        a factor changes: every in-place write (an optimizer step, a load) bumps the tensor's version."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return kron_sum(rule, self.phm_s @ self.phm_t)
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in (rule, self.phm_s, self.phm_t))
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, kron_sum(rule, self.phm_s @ self.phm_t))
        return self._cached[1]

    def forward(self, x: torch.Tensor, rule: torch.Tensor) -> torch.Tensor:
        return x @ self.weight(rule) + self.bias  # (..., d_out)


@dataclass(kw_only=True)
class CompacterConfig(BottleneckConfig):
    """Compacter: bottleneck adapters with PHM projections. Presets "compacter" (after the attention and the
    feed-forward outputs) and "compacter++" (after the feed-forward output only); other fields as BottleneckConfig."""

    peft_type: ClassVar[str] = "COMPACTER"
    prefix: ClassVar[str] = "compacter"
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    preset: str = field(default="compacter", metadata={"help": f"Placement and defaults: {', '.join(PRESETS)}."})
    phm_dim: int = field(default=4, metadata={"help": "n: number of Kronecker terms; must divide d and k."})
    phm_rank: int = field(default=1, metadata={"help": "Rank r of the fast matrices B_i = s_i t_i^T."})

    def problems(self) -> list[str]:
        problems = super().problems()
        for name in ("phm_dim", "phm_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name}={value!r} must be a positive integer (paper: phm_dim=4, phm_rank=1).")
        if self.fusion_of is not None:
            problems.append("fusion_of belongs on a BottleneckConfig (it fuses Compacter adapters too); remove it.")
        if self.setting("parallel"):
            problems.append("parallel=True is not a Compacter placement; use BottleneckConfig(preset='parallel').")
        return problems

    def width(self, d: int, module_name: str) -> int:
        """k = d / reduction_factor rounded to a multiple of phm_dim (at least phm_dim); bottleneck_size as given."""
        k = super().width(d, module_name)
        return k if self.bottleneck_size is not None else max(self.phm_dim, self.phm_dim * round(k / self.phm_dim))

    def make_projections(self, d_in: int, k: int, d_out: int) -> tuple[nn.Module, nn.Module]:
        n = self.phm_dim
        bad = {name: v for name, v in (("d_in", d_in), ("k", k), ("d_out", d_out)) if v % n}
        if bad:
            raise ConfigError(
                f"phm_dim={n} must divide every width of the adapter, but {bad} are not multiples of {n}. "
                f"Choose phm_dim dividing them, or a bottleneck_size that is a multiple of {n}."
            )
        down, up = PHMLinear(d_in, k, n, self.phm_rank), PHMLinear(k, d_out, n, self.phm_rank)
        with torch.no_grad():
            if self.init_weights == "bert":
                for p in (down.phm_s, down.phm_t, up.phm_s, up.phm_t):
                    p.normal_(0.0, 0.02)
            else:
                up.phm_t.zero_()  # W_up = 0: the adapter starts as the identity
        return down, up


def inject(model: nn.Module, config: CompacterConfig, adapter_name: str) -> list[BottleneckLayer]:
    """Attach the adapter with bottleneck's placement, then give every layer the one shared rule."""
    layers = bottleneck.inject(model, config, adapter_name)
    adapted = [layer for layer in layers if adapter_name in layer.compacter_down]
    probe = adapted[0].adapter_parameters(adapter_name)[0]
    rule = PHMRule(config.phm_dim).to(device=probe.device, dtype=probe.dtype)
    for i, layer in enumerate(adapted):
        layer.compacter_rule[adapter_name] = rule
        layer.rule_owner[adapter_name] = i == 0
    return layers


def parameter_count(d: int, k: int, n: int, n_adapters: int, rank: int = 1, biases: bool = True) -> int:
    """n^3 + n_adapters * 2 r (d + k) weights (section 3.3), plus k + d biases per adapter."""
    return n**3 + n_adapters * (2 * rank * (d + k) + ((k + d) if biases else 0))


METHOD = Method(
    name="compacter",
    config_class=CompacterConfig,
    inject=inject,
    can_merge=False,
    merge_hint=(
        "Compacter adds bottleneck layers (PHM down-projection, non-linearity, PHM up-projection) after a "
        "module's output; a non-linear function cannot be folded into a weight matrix."
    ),
    training=Training(learning_rate=1e-2),
)
