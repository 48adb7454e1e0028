"""AdaLoRA: adaptive budget allocation for parameter-efficient fine-tuning (Zhang, Chen, Bukharin, Karampatziakis,
He, Cheng, Chen & Zhao 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR).

Each adapted matrix learns its update in SVD form (section 3.1, eq. 3), kept near-orthogonal by a regulariser
(eq. 4) that the training loop adds to the loss:

    h = W x + P Λ Q x · alpha / init_r          P (out, r), Λ = diag(λ) (r,), Q (r, in); λ = 0 at init
    R = ||PᵀP - I||_F + ||QQᵀ - I||_F           averaged over the matrices, times ``orth_reg_weight``

and a global rank budget moves from ``init_r`` per matrix to ``target_r`` on average over training: after each
optimizer step the triplets (P_:i, λ_i, Q_i:) with the lowest smoothed importance get λ_i = 0 (sections 3.2-3.3,
:mod:`peftkit.methods.adalora.allocation`). ``peftkit train`` runs that step through ``Method.training.after_step``
and prints the final rank of each layer; in your own loop call ``peft_model.update_and_allocate(step)`` after
``optimizer.step()`` and before ``optimizer.zero_grad()``, and add ``peft_model.auxiliary_loss()`` to the loss.

Merging adds ΔW to W and unmerging subtracts it; per-row routing adds each row group's own ΔW x. The checkpoint is
peft 0.21's: ``<module>.lora_A`` / ``lora_B`` / ``lora_E`` holding only the kept triplets, and the kept mask per
matrix in the config's ``rank_pattern`` (``{"<module>.lora_E": [true, false, ...]}``), from which the layers are
rebuilt at their kept rank on load.
"""

from __future__ import annotations

from torch import nn

from peftkit.core.inject import Injection, add_modules_to_save, own_layer_path, trainable_biases
from peftkit.core.method import Method, Training
from peftkit.core.targeting import base_of, find_targets, is_conv1d_gpt2, resolve_targets
from peftkit.methods.adalora.allocation import after_step, rank_report, update_and_allocate
from peftkit.methods.adalora.config import AdaLoraConfig
from peftkit.methods.adalora.layers import SUPPORTED, SVDLayer, supported

__all__ = ["METHOD", "AdaLoraConfig", "SVDLayer", "inject", "rank_report", "update_and_allocate"]


def inject(model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
    """Resolve peft's default targets into the (copied) config, wrap every target, share the regulariser's weight."""
    config.target_modules = resolve_targets(model, config)
    targets = find_targets(model, config, supported, supported_label=SUPPORTED)
    config.fan_in_fan_out = any(is_conv1d_gpt2(base_of(model.get_submodule(n))) for n in targets)  # as peft saves
    with Injection(model, adapter_name) as inj:
        layers = [inj.wrap(own_layer_path(model, name, SVDLayer), SVDLayer, config) for name in targets]
        for layer in layers:
            layer.orth_weight[adapter_name] = config.orth_reg_weight / (2 * len(layers))
        add_modules_to_save(model, config, inj)


def extra_trainable(model: nn.Module, config: AdaLoraConfig) -> dict[str, nn.Parameter]:
    """``bias="all"``: every bias of the base model; ``"lora_only"``: those of the layers AdaLoRA wraps."""
    return {} if config.bias == "none" else trainable_biases(model, config.bias == "all", SVDLayer)


METHOD = Method(
    name="adalora",
    config_class=AdaLoraConfig,
    inject=inject,
    can_merge=True,
    extra_trainable=extra_trainable,
    # 1e-2: on MiniLM + SST-2 (4,000 rows, one epoch; docs/benchmarks.md) 2e-3 left the model at the majority class,
    # 1e-2 reached 75.7 %: Λ starts at 0 and the regulariser first pulls P and Q to orthonormal
    training=Training(learning_rate=1e-2, after_step=after_step, report=rank_report),
    functions={"update_and_allocate": update_and_allocate},
)
