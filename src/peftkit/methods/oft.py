"""OFT: orthogonal fine-tuning (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning",
sections 3-4).

The frozen weight W (out, in) is turned by a learned orthogonal matrix, which keeps the angles between its neurons
(the "hyperspherical energy", section 3.1). The rotation is block-diagonal (section 3.3: k blocks of size b, k b =
in) and each block is the Cayley transform of a skew-symmetric Q (section 3.2):

    R_i = (I + Q_i)(I - Q_i)⁻¹          Q_iᵀ = -Q_i, so R_i R_iᵀ = I;  Q = 0 at init, so R = I (h = W x)
    h   = W Rᵀ x + bias                 R = diag(R_1, ..., R_k) (in, in): Hugging Face peft's convention, which
                                         rotates the input side (x ↦ Rᵀ x); merged, W' = W Rᵀ

Each adapter trains only the strict upper triangles of its blocks, packed row by row into a vector of
b (b - 1) / 2 numbers per block (peft's ``oft_R.weight``, (k, b (b - 1) / 2)); ``block_share`` trains one block used
k times. ``use_cayley_neumann`` (peft's default) replaces the inverse by the truncated Neumann series
(I - Q)⁻¹ ≈ I + Q + Q² + ..., as peft 0.21 evaluates it: R ≈ I + 2Q + 2Q² + ... + 2Qⁿ⁻² + Qⁿ⁻¹ (n the number of
terms, at least up to Q³); that R is only close to orthogonal. With the exact inverse peft 0.21 evaluates
(I - Q)(I + Q)⁻¹, the Cayley transform of -Q; peftkit does the same, so both give one output for one file.

COFT (section 3.4, constrained OFT) keeps each block's Q in a Frobenius ball of radius eps / sqrt(k):
Q ↦ Q · min(1, eps' / ‖Q‖_F), applied to the stored vector before each training forward (projected gradient
descent, as peft does) and to the value used in every forward. ``module_dropout`` (training only) sets a random
share of the blocks to the identity (peft 0.21 builds this layer but never applies it; peftkit applies it).

Several active adapters rotate the input in turn (the first one first); merging folds them into W in reverse order
(W Rₙᵀ ... R₁ᵀ); a merged adapter acts after every unmerged one (see ``OFTLinear.merge_order``). Unmerging solves
W' = W Rᵀ for W (exact even where the Neumann R is not quite orthogonal). Per-row routing (``adapter_names=``)
rotates each row group's inputs with its adapter. The checkpoint is peft's: ``<module>.oft_R.weight``.
Layers: nn.Linear and 1x1 nn.Conv2d (each pixel's channels rotated). peft 0.21 also takes larger kernels, rotating
unfolded patches and summing them back, which its own merge (W Rᵀ on the flattened kernel) does not reproduce; peftkit
refuses those, and Embedding, with an error naming the module.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.factorised import DEFAULT_TARGETS
from peftkit.core.inject import inject_layers, own_layer_path, trainable_biases
from peftkit.core.layer import WrapsInPlace
from peftkit.core.method import Method, Training
from peftkit.core.targeting import TargetingConfig, find_targets, resolve_targets

BIASES = ("none", "all", "oft_only")
SUPPORTED = (
    "nn.Linear and 1x1 nn.Conv2d (groups=1). On larger kernels peft 0.21's OFT rotates overlapping patches and sums "
    "them, so its merged weights disagree with its own forward; Embedding is not supported yet: use LoRA or LoHa there"
)


@dataclass(kw_only=True)
class OFTConfig(TargetingConfig):
    """OFT's settings, with Hugging Face peft's names and defaults: give ``oft_block_size`` (b) or ``r`` (the number
    of blocks k), not both; the other follows from each layer's in_features (k b = in)."""

    peft_type: ClassVar[str] = "OFT"
    default_target_modules: ClassVar[dict[str, list[str]]] = DEFAULT_TARGETS

    r: int = field(default=0, metadata={"help": "Number of blocks per layer (0: use oft_block_size)."})
    oft_block_size: int = field(default=32, metadata={"help": "Block size b (0: use r); should divide in_features."})
    module_dropout: float = field(
        default=0.0, metadata={"help": "Share of blocks set to the identity at each training step."}
    )
    fan_in_fan_out: bool = field(default=False, metadata={"help": "peft's field; nn.Linear stores (out, in)."})
    bias: str = field(default="none", metadata={"help": "Biases that also train: 'none', 'all' or 'oft_only'."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: Q = 0 (R = I, identity at init); False: Q ~ N(0, 0.1²)."}
    )
    coft: bool = field(default=False, metadata={"help": "Constrained OFT: keep each block's Q within eps."})
    eps: float = field(default=6e-5, metadata={"help": "COFT's radius (the freedom of rotation)."})
    block_share: bool = field(default=False, metadata={"help": "One block shared by all the blocks of a layer."})
    use_cayley_neumann: bool = field(
        default=True, metadata={"help": "Neumann series instead of the exact inverse (faster, near-orthogonal)."}
    )
    num_cayley_neumann_terms: int = field(default=5, metadata={"help": "Terms of the Neumann series."})

    def problems(self) -> list[str]:
        problems = super().problems()
        sizes = {"r": self.r, "oft_block_size": self.oft_block_size}
        problems += [f"{k}={v!r} must be a non-negative integer." for k, v in sizes.items() if v < 0]
        if (self.r != 0) == (self.oft_block_size != 0):
            problems.append(
                f"r={self.r!r} and oft_block_size={self.oft_block_size!r}: set exactly one of them (k b = in_features),"
                " e.g. oft_block_size=32, r=0."
            )
        if not 0 <= self.module_dropout < 1:
            problems.append(f"module_dropout={self.module_dropout!r} must be in [0, 1).")
        if self.bias not in BIASES:
            problems.append(f"bias={self.bias!r} must be one of {list(BIASES)}.")
        if not self.eps > 0:
            problems.append(f"eps={self.eps!r} must be positive (COFT's radius).")
        if self.num_cayley_neumann_terms < 1:
            problems.append(f"num_cayley_neumann_terms={self.num_cayley_neumann_terms!r} must be at least 1.")
        if self.layers_pattern and self.layers_to_transform is None:
            problems.append("layers_pattern is set but layers_to_transform is not; give both or neither.")
        return problems


# ---- the maths ------------------------------------------------------------------------------------------------
def skew(vec: torch.Tensor, block_size: int) -> torch.Tensor:
    """(k, b (b - 1) / 2) strict upper triangles, row by row -> Q (k, b, b) with Qᵀ = -Q."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=vec.device)
    q = vec.new_zeros(vec.shape[0], block_size, block_size)
    q[:, rows, cols] = vec
    return q - q.transpose(-2, -1)


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """peft 0.21's series for (I + Q)(I - Q)⁻¹: I + 2Q + 2Q² + ... + 2Qⁿ⁻² + Qⁿ⁻¹ (n = terms; from n = 3 the last
    power is at least Q³), (k, b, b)."""
    out = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q).clone()
    if terms <= 1:
        return out
    out = out + 2 * q
    if terms == 2:
        return out
    power = q
    for _ in range(2, max(3, terms - 1)):
        power = power @ q
        out = out + 2 * power
    return out + power @ q


def cayley(q: torch.Tensor) -> torch.Tensor:
    """The exact Cayley transform (I + Q)(I - Q)⁻¹, (k, b, b), solved rather than inverted."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).expand_as(q)
    return torch.linalg.solve(eye - q, eye + q, left=False)  # X (I - Q) = I + Q


def coft_project(vec: torch.Tensor, block_size: int, eps: float) -> torch.Tensor:
    """COFT's projection (section 3.4): each block's Q scaled into the Frobenius ball of radius eps / sqrt(k)."""
    radius = eps / vec.shape[0] ** 0.5
    norm = skew(vec, block_size).norm(dim=(1, 2), keepdim=True)[:, :, 0]  # (k, 1)
    return torch.where(norm <= radius, vec, vec * (radius / norm))


def nearest_divisor(n: int, wanted: int) -> int:
    """The divisor of n nearest to ``wanted`` (ties: the smaller; n when wanted >= n), as peft adjusts sizes."""
    if wanted >= n:
        return n
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - wanted), d))


def block_size(config: OFTConfig, in_features: int) -> int:
    """b for a layer: ``oft_block_size``, or in / ``r``; a size that does not divide in_features becomes the nearest
    divisor, with a warning (as peft adjusts it)."""
    wanted = config.oft_block_size or config.r
    fitted = nearest_divisor(in_features, wanted)
    if fitted != wanted:
        field_name = "oft_block_size" if config.oft_block_size else "r"
        message = f"OFT: {field_name}={wanted} does not divide in_features={in_features}; using {fitted}."
        warnings.warn(message, stacklevel=3)
    return fitted if config.oft_block_size else in_features // fitted


class OFTRotation(nn.Module):
    """One adapter's rotation on one layer: ``weight`` (blocks, b (b - 1) / 2), the packed Q of each block."""

    def __init__(self, config: OFTConfig, in_features: int, device: torch.device) -> None:
        super().__init__()
        block = block_size(config, in_features)
        self.block_size, self.count = block, in_features // block
        self.coft, self.eps, self.dropout = config.coft, config.eps, config.module_dropout
        self.neumann, self.terms = config.use_cayley_neumann, config.num_cayley_neumann_terms
        shape = (1 if config.block_share else self.count, block * (block - 1) // 2)
        weight = torch.zeros(shape, device=device)
        if not config.init_weights:
            nn.init.normal_(weight, std=0.1)
        self.weight = nn.Parameter(weight)

    def q(self) -> torch.Tensor:
        """The packed Q used now: COFT's projection (straight-through in the gradient) or the stored one."""
        if not self.coft:
            return self.weight
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():  # projected gradient descent: the stored vector stays in the ball
                self.weight.copy_(coft_project(self.weight, self.block_size, self.eps))
        projected = coft_project(self.weight.detach(), self.block_size, self.eps)
        return self.weight + (projected - self.weight.detach())

    def blocks(self) -> torch.Tensor:
        """R_1 ... R_k, (k, b, b) in float32 at least."""
        vec = self.q()
        vec = vec if vec.dtype in (torch.float32, torch.float64) else vec.float()
        q = skew(vec, self.block_size)
        r = cayley_neumann(q, self.terms) if self.neumann else cayley(-q)  # peft 0.21's two conventions
        return r.expand(self.count, -1, -1)

    def dropped(self, r: torch.Tensor) -> torch.Tensor:
        """module_dropout: int(p k) random blocks set to the identity, in training."""
        if not (self.training and self.dropout > 0 and self.count > 1):
            return r
        drop = torch.zeros(self.count, 1, 1, device=r.device)
        drop[torch.randperm(self.count, device=r.device)[: int(self.dropout * self.count)]] = 1
        return (1 - drop) * r + drop * torch.eye(self.block_size, device=r.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> Rᵀ x, as rows: each block x_i (..., b) ↦ x_i R_i."""
        r = self.dropped(self.blocks())
        xb = x.to(r.dtype).reshape(*x.shape[:-1], self.count, self.block_size)  # (..., k, b)
        return torch.einsum("...kb,kbc->...kc", xb, r).reshape(x.shape).to(x.dtype)


# ---- layer ----------------------------------------------------------------------------------------------------
class OFTLinear(WrapsInPlace):
    """OFT on nn.Linear: per adapter one :class:`OFTRotation` of the input, h = W Rᵀ x + bias."""

    adapter_param_names = ("oft_R",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.oft_R = nn.ModuleDict()  # peft's name: the checkpoint key is <module>.oft_R.weight

    def update_layer(self, adapter_name: str, config: OFTConfig, module_name: str) -> None:
        base = self.get_base_layer()
        self.oft_R[adapter_name] = OFTRotation(config, base.weight.shape[1], base.weight.device)  # in (channels)

    def rotate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Rᵀ x for the input x (..., in)."""
        return self.oft_R[name](x)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.routing is not None and not self.disabled:
            groups = self.routed_groups(x.shape[0])
            if groups:
                x = x.clone()
            for name, rows in groups:
                x[rows] = self.rotate(name, x[rows])
            return self.base_layer(x, *args, **kwargs)
        for name in self.live_adapters():
            if name in self.oft_R:
                x = self.rotate(name, x)  # (B, T, in), rotated
        return self.base_layer(x, *args, **kwargs)  # (B, T, out)

    # ---- merging: W ↦ W Rᵀ, and its inverse (solve X Rᵀ = W') ----------------------------------------------
    def merge_order(self, adapter_names: list[str]) -> list[str]:
        """The adapters to fold, the last-applied active one first, so W' = W Rₙᵀ ... R₁ᵀ equals the unmerged chain.

        Merged adapters act nearest to W, after every unmerged one: merging a subset of several active adapters
        equals the unmerged output only when the subset is the last of them (rotations of different adapters do not
        commute); merge_and_unload(adapter_names=...) drops the others, so any subset is exact there."""
        live = [n for n in self.live_adapters() if n in self.oft_R]
        active = [n for n in live if n in adapter_names]
        return [*reversed(active), *(n for n in adapter_names if n not in active)]

    def _blocks(self, name: str) -> torch.Tensor:
        rotation = self.oft_R[name]
        return rotation.blocks().detach().double()  # (k, b, b)

    @torch.no_grad()
    def merge(self, adapter_names: list[str]) -> None:
        weight = self.get_base_layer().weight  # (out, in)
        for name in self.merge_order(adapter_names):
            r = self._blocks(name)
            w = weight.double().reshape(weight.shape[0], r.shape[0], -1)  # (out, k, b)
            weight.copy_(torch.einsum("okb,kcb->okc", w, r).reshape(weight.shape))  # W_i R_iᵀ
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            r = self._blocks(self.merged_adapters.pop())
            w = weight.double().reshape(weight.shape[0], r.shape[0], -1).transpose(0, 1)  # (k, out, b)
            restored = torch.linalg.solve(r.transpose(1, 2), w, left=False)  # X_i R_iᵀ = W'_i
            weight.copy_(restored.transpose(0, 1).reshape(weight.shape))


class OFTConv2d(OFTLinear):
    """OFT on a 1x1 nn.Conv2d: the channels of every pixel rotated, h = conv(Rᵀ x); merged, W' = W Rᵀ on
    W (out, in, 1, 1), where peft 0.21's forward and merge agree."""

    def rotate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> each pixel's channels rotated."""
        return self.oft_R[name](x.movedim(1, -1)).movedim(-1, 1)


# ---- attaching ----------------------------------------------------------------------------------------------
def layer_class(module: nn.Module) -> type[OFTLinear] | None:
    """OFT's layer for this module, or None where it does not apply (first match wins)."""
    if isinstance(module, nn.Linear):
        return OFTLinear
    if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1:
        return OFTConv2d
    return None


def supported(module: nn.Module) -> bool:
    return layer_class(module) is not None


def inject(model: nn.Module, config: OFTConfig, adapter_name: str) -> None:
    """Resolve peft's default targets into the (copied) config, so it is saved explicit, then wrap."""
    config.target_modules = resolve_targets(model, config)
    targets = find_targets(model, config, supported, supported_label=SUPPORTED)
    targets = [own_layer_path(model, n, OFTLinear) for n in targets]
    inject_layers(model, config, adapter_name, targets, layer_class)


def extra_trainable(model: nn.Module, config: OFTConfig) -> dict[str, nn.Parameter]:
    """``bias="all"``: every bias of the base model; ``"oft_only"``: those of the layers OFT wraps (peft's keys)."""
    return {} if config.bias == "none" else trainable_biases(model, config.bias == "all", OFTLinear)


METHOD = Method(
    name="oft",
    config_class=OFTConfig,
    inject=inject,
    can_merge=True,
    extra_trainable=extra_trainable,
    training=Training(learning_rate=1e-3),
)
