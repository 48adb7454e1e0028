"""AdaLoRA's SVD-form layer on nn.Linear, GPT-2's Conv1D and nn.Conv2d (Zhang et al. 2023, section 3.1, eq. 3).

    ΔW = P Λ Q · alpha / (init_r + 1e-5)      P = lora_B (out, r), Λ = diag(lora_E) (r, 1), Q = lora_A (r, in)
    h  = W x + ΔW x

A convolution flattens its kernel into Q's columns (in = in_channels · kh · kw) and runs ΔW as a convolution with
the base layer's stride, padding and dilation. The scale divides by the initial rank, not the kept one, so pruning
a triplet (zeroing its λ) leaves the others' contributions unchanged (peft's ``ranknum``, which it does not save).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.layer import AdditiveLayer, WrapsInPlace
from peftkit.core.targeting import is_conv1d_gpt2, is_linear_like
from peftkit.errors import ConfigError
from peftkit.methods.adalora.config import AdaLoraConfig

EPS = 1e-5  # peft adds it to the rank it divides by
SUPPORTED = "Linear, GPT-2 Conv1D, Conv2d (groups=1)"
TRIPLET = ("lora_A", "lora_B", "lora_E")


def supported(module: nn.Module) -> bool:
    return is_linear_like(module) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def pattern_entry(config: AdaLoraConfig, module_name: str, adapter_name: str) -> list[bool] | None:
    """The kept-triplet mask ``rank_pattern`` holds for this module (peft writes ``<module>.lora_E``, and keeps
    ``.<adapter>`` after it in memory), or None."""
    pattern = config.rank_pattern or {}
    path = module_name.replace(".base_layer", "")
    return pattern.get(f"{path}.lora_E", pattern.get(f"{path}.lora_E.{adapter_name}"))


class SVDLayer(AdditiveLayer, WrapsInPlace):
    """Per adapter the triplets (P, Λ, Q) of ΔW = P Λ Q; the allocation (methods/adalora/allocation.py) zeroes the
    λ of pruned triplets and records them in ``kept``; the checkpoint holds the kept triplets only, as peft's."""

    adapter_param_names = TRIPLET
    adapter_other_names = ("lora_dropout", "scaling", "ranknum", "kept", "sensitivity", "orth_weight")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()  # Q: right singular vectors (r, in)
        self.lora_B = nn.ParameterDict()  # P: left singular vectors (out, r)
        self.lora_E = nn.ParameterDict()  # Λ: singular values (r, 1)
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}  # lora_alpha
        self.ranknum: dict[str, float] = {}  # init_r: the rank the scale divides by
        self.kept: dict[str, torch.Tensor] = {}  # (r,) bool: the triplets the last allocation kept
        self.sensitivity: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}  # EMAs of I and U per tensor
        self.orth_weight: dict[str, float] = {}  # orth_reg_weight / (2 · number of layers), set by inject
        base = self.get_base_layer()
        self.fan_in_fan_out = is_conv1d_gpt2(base)
        self.is_conv = isinstance(base, nn.Conv2d)

    def features(self) -> tuple[int, int]:
        """(out, in) of ΔW as a matrix (a kernel flattened into the columns)."""
        weight = self.get_base_layer().weight
        if self.fan_in_fan_out:
            return weight.shape[1], weight.shape[0]
        return weight.shape[0], weight[0].numel()

    def update_layer(self, adapter_name: str, config: AdaLoraConfig, module_name: str) -> None:
        base = self.get_base_layer()
        if not supported(base):
            raise ConfigError(f"AdaLoRA cannot adapt {module_name!r} ({type(base).__name__}); supported: {SUPPORTED}.")
        entry = pattern_entry(config, module_name, adapter_name)
        r = config.init_r if entry is None else sum(bool(v) for v in entry)
        out_f, in_f = self.features()
        weight = base.weight
        like = {"device": weight.device, "dtype": weight.dtype if weight.dtype == torch.float64 else torch.float32}
        if config.init_lora_weights:  # Λ = 0: ΔW = 0 at init; P, Q ~ N(0, 0.02²) (peft's reset)
            a, e, b = (
                torch.randn(r, in_f, **like) * 0.02,
                torch.zeros(r, 1, **like),
                torch.randn(out_f, r, **like) * 0.02,
            )
        else:
            a, e, b = torch.randn(r, in_f, **like), torch.randn(r, 1, **like), torch.randn(out_f, r, **like)
        self.lora_A[adapter_name], self.lora_E[adapter_name] = nn.Parameter(a), nn.Parameter(e)
        self.lora_B[adapter_name] = nn.Parameter(b)
        self.scaling[adapter_name] = float(config.lora_alpha) if config.lora_alpha > 0 else float(r)
        self.ranknum[adapter_name] = float(config.init_r)
        p = config.lora_dropout
        self.lora_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()

    def scale(self, name: str) -> float:
        """alpha / (init_r + 1e-5)."""
        return self.scaling[name] / (self.ranknum[name] + EPS)

    def matrix(self, name: str) -> torch.Tensor:
        """P Λ Q · scale as an (out, in) matrix."""
        return self.lora_B[name] @ (self.lora_A[name] * self.lora_E[name]) * self.scale(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW in the base weight's layout: (out, in), transposed for GPT-2's Conv1D, a kernel for Conv2d."""
        delta = self.matrix(name)
        if self.fan_in_fan_out:
            return delta.T
        return delta.reshape(self.get_base_layer().weight.shape)

    def branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """ΔW x: (..., in) -> (..., out), or a convolution (B, C_in, H, W) -> (B, C_out, H', W')."""
        a = self.lora_A[name]
        x = self.lora_dropout[name](x.to(a.dtype))
        if self.is_conv:
            base = self.get_base_layer()
            kernel = self.delta_weight(name)  # (out, in, kh, kw)
            return F.conv2d(x, kernel, stride=base.stride, padding=base.padding, dilation=base.dilation)
        return (x @ (a * self.lora_E[name]).T @ self.lora_B[name].T) * self.scale(name)  # (..., r) -> (..., out)

    def skips(self, name: str) -> bool:
        return name not in self.lora_A

    # ---- the orthogonality regulariser (section 3.1, eq. 4) ----------------------------------------------------
    def auxiliary_loss(self) -> torch.Tensor | None:
        """R(P, Q) = ||PᵀP - I||_F + ||QQᵀ - I||_F for each live adapter that trains, times orth_reg_weight and
        divided by the number of matrices (2 per layer), as peft averages it over the model."""
        losses = []
        for name in self.live_adapters():
            if name not in self.lora_A or not self.lora_A[name].requires_grad or not self.orth_weight.get(name):
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
            penalty = torch.linalg.matrix_norm(a @ a.T - eye) + torch.linalg.matrix_norm(b.T @ b - eye)
            losses.append(self.orth_weight[name] * penalty)
        return torch.stack(losses).sum() if losses else None

    # ---- the checkpoint: peft keeps only the kept triplets -------------------------------------------------------
    def file_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        state = self.adapter_state_dict(adapter_name)
        keep = self.kept.get(adapter_name)
        if not state or keep is None or bool(keep.all()) or keep.numel() != state["lora_E"].shape[0]:
            return state
        keep = keep.to(state["lora_E"].device)
        return {"lora_A": state["lora_A"][keep], "lora_B": state["lora_B"][:, keep], "lora_E": state["lora_E"][keep]}
