"""LoRA initialisations from the base weight: PiSSA and OLoRA (``init_lora_weights="pissa" | "pissa_niter_<n>" |
"olora"``). Both put the weight's main directions in A and B and leave the residual in the base weight, so the adapted
model still equals the base model at initialisation: W = (W - s B A) + s B A.

PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation", section 3): with
W = U S V^T (W as (out, in)), A = sqrt(S_r / s) V_r^T, B = U_r sqrt(S_r / s), W <- W - s B A. ``pissa_niter_<n>``
uses a randomised SVD (``torch.svd_lowrank`` with n subspace iterations: Halko et al. 2011), much faster on large
weights.

OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models"): W = Q R (QR
decomposition), A = R_r (the first r rows), B = Q_r (the first r columns), W <- W - s B A.

CorDA (``init_lora_weights="corda"``, methods/lora/corda.py) fills A and B from a decomposition of W oriented by the
inputs' covariance, computed beforehand by ``preprocess_corda``; the residual is left in W the same way.

As in peft, the base weight changes: an adapter trained this way applies to the residual model, so loading it runs
the same initialisation on the original base first (peft does too); ``unload()`` returns the residual model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from peftkit.errors import ConfigError
from peftkit.methods.lora import corda

if TYPE_CHECKING:
    from peftkit.methods.lora.layers import LoraLinear


def is_weight_init(init: object) -> bool:
    return isinstance(init, str) and (init in ("pissa", "olora", "corda") or init.startswith("pissa_niter_"))


@torch.no_grad()
def init_from_weight(layer: LoraLinear, name: str, init: str) -> None:
    """Set A, B of adapter ``name`` from the base weight and subtract s B A from it (in place, same tensor)."""
    if torch.empty(()).device.type == "meta":  # a size probe built under torch.device("meta"): leave W alone
        return
    weight = layer.get_base_layer().weight
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(
            f"init_lora_weights={init!r} needs a float32, float16 or bfloat16 base weight, not {weight.dtype}; "
            "initialise before quantizing (as peft asks)."
        )
    w = weight.float()
    w = w.T if layer.fan_in_fan_out else w  # (out, in)
    r, s = layer.r[name], float(layer.scaling[name])
    if r > min(w.shape):
        raise ConfigError(
            f"init_lora_weights={init!r} takes r={r} directions from a {tuple(w.shape)} weight, which has only "
            f"{min(w.shape)}; lower r (rank_pattern for this module) or use init_lora_weights=True."
        )
    if init == "corda":  # from preprocess_corda's decomposition (methods/lora/corda.py)
        a, b = corda.factors(layer.get_base_layer(), s)
    else:
        a, b = _olora(w, r) if init == "olora" else _pissa(w, r, s, init)
    layer.lora_A[name].weight.copy_(a)
    layer.lora_B[name].weight.copy_(b)
    if layer.lora_B[name].bias is not None:  # lora_bias: zero, so the start is still the base model
        layer.lora_B[name].bias.zero_()
    residual = w - s * (b @ a)  # (out, in)
    weight.copy_((residual.T if layer.fan_in_fan_out else residual).to(weight.dtype))


def _pissa(w: torch.Tensor, r: int, s: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A = sqrt(S_r / s) V_r^T (r, in), B = U_r sqrt(S_r / s) (out, r)."""
    if init == "pissa":
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)
        u, sv, vh = u[:, :r], sv[:r], vh[:r]
    else:
        u, sv, v = torch.svd_lowrank(w, q=r, niter=int(init.removeprefix("pissa_niter_")))
        vh = v.T
    root = torch.sqrt(sv / s)
    return root[:, None] * vh, u * root


def _olora(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = R[:r] (r, in), B = Q[:, :r] (out, r) from W = Q R."""
    q, rr = torch.linalg.qr(w)
    return rr[:r], q[:, :r]
