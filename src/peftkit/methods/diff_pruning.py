"""Diff pruning: a sparse, task-specific difference vector on the frozen pretrained weights (Guo, Rush & Kim 2021,
"Parameter-Efficient Transfer Learning with Diff Pruning", ACL, sections 3.1-3.3).

Every targeted tensor W gets a delta d, trained through a hard-concrete gate z per entry (Louizos, Welling &
Kingma 2018, "Learning Sparse Neural Networks through L0 Regularization", section 4):

    W' = W + d,    d = z ⊙ w                                           (paper eq. 2; w = 0 at init, so W' = W)
    u ~ U(0, 1),   s = σ((log u - log(1 - u) + log α) / β),   z = min(1, max(0, s (r - l) + l))   (training)
    z = min(1, max(0, σ(log α) (r - l) + l))                                                        (evaluation)
    E[||d||_0] = Σ_i P(z_i ≠ 0) = Σ_i σ(log α_i - β log(-l / r))     (the penalty, times l0_lambda)

z is a reparameterised sample, so gradients reach log α through the clamp (zero where it saturates). With
``structured=True`` each tensor also has one group gate z_g (section 3.3): d = z_g z ⊙ w and the penalty is
Σ_i P(z_i ≠ 0) P(z_g ≠ 0). Each layer returns its penalty from ``auxiliary_loss()``; ``PeftModel.auxiliary_loss()``
sums them, and peftkit's trainer adds that to the task loss.

Second stage (section 3.2): ``finalize(peft_model, target_density)`` (also ``peft_model.finalize(...)``) projects
d onto the L0 ball by global magnitude: it keeps exactly round(target_density * N) entries of the largest |d| over
all N targeted entries, drops w and the gates, and keeps the support's values (trainable, with the mask fixed).
peftkit's trainer runs it after 3/4 of the steps (``METHOD.after_training_at``) and trains the rest of the run with
a new optimizer whose groups ``param_groups`` gives at ``stage2_lr``.

The gate and the projection, on plain tensors, are in methods/diff_pruning_l0.py; running the module with W + d
(forward, per-row routing, merge) is core/delta.py's, shared with layer freezing.

Memory: the base weights are never copied; before finalize the layer holds w and log α (the paper's training
state), after it only the support's indices and values. Merge is W += d, unmerge W -= d.

Checkpoint (always sparse): for each targeted module and each of its tensors (``weight``, ``bias``...)
``<module>.diff_index.<tensor>`` (int32 or int64, ascending flat row-major indices into the tensor) and
``<module>.diff_values.<tensor>`` (the delta at those indices), under peft's ``base_model.model.`` prefix.
A checkpoint written after finalize (``finalized`` in adapter_config.json) loads with the support fixed; one
written before loads as gated training state: w = d, gates open on the stored entries and closed elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.delta import DeltaLayer, own_params, warn_tied
from peftkit.core.inject import inject_layers
from peftkit.core.merge import adapter_layers
from peftkit.core.method import AdapterHost, Method, Training
from peftkit.core.targeting import TargetingConfig, find_targets, output_head_names
from peftkit.errors import CheckpointError, ConfigError, MergeError, TargetNotFoundError
from peftkit.methods.diff_pruning_l0 import eval_gate as eval_gate  # the gate's names: importable from here too
from peftkit.methods.diff_pruning_l0 import magnitude_supports
from peftkit.methods.diff_pruning_l0 import prob_nonzero as prob_nonzero
from peftkit.methods.diff_pruning_l0 import sample_gate as sample_gate

ALL = "all"


@dataclass(kw_only=True)
class DiffPruningConfig(TargetingConfig):
    """Diff pruning's settings; defaults follow the paper's released setup (l = -1.5, r = 1.5, log α = 5)."""

    peft_type: ClassVar[str] = "DIFF"

    target_modules: list[str] | str | None = field(
        default=ALL,
        metadata={"help": "'all' (every module with weights but the output head), names / suffixes, or a regex."},
    )
    target_density: float = field(
        default=0.005, metadata={"help": "Share of targeted entries finalize() keeps (paper: 0.005 = 0.5%)."}
    )
    l0_lambda: float = field(
        default=1.25e-7, metadata={"help": "Weight of the expected-L0 penalty (sum over entries)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Hard-concrete temperature β."})
    stretch_l: float = field(default=-1.5, metadata={"help": "Lower stretch l of the gate (< 0)."})
    stretch_r: float = field(default=1.5, metadata={"help": "Upper stretch r of the gate (> 1)."})
    alpha_init: float = field(default=5.0, metadata={"help": "Initial log α of every gate (5: gates open)."})
    structured: bool = field(default=False, metadata={"help": "Add one group gate per tensor (section 3.3)."})
    gate_lr: float | None = field(
        default=0.1, metadata={"help": "Learning rate of the gates in param_groups() (None: the task lr)."}
    )
    stage2_lr: float | None = field(
        default=4e-3,
        metadata={
            "help": "Peak learning rate in param_groups() once finalized (stage 2: the support's values and the "
            "task head); the run's schedule scales it (about 1/4 of it at 3/4 of a linear decay). None: the task lr."
        },
    )
    finalized: bool = field(
        default=False,
        metadata={"help": "Set by finalize(): the support is fixed and no gates train. Not for new adapters."},
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        checks = [
            ("target_density", self.target_density, lambda v: 0 < v <= 1, "a share in (0, 1], e.g. 0.005"),
            ("l0_lambda", self.l0_lambda, lambda v: v >= 0, ">= 0, e.g. 1.25e-7"),
            ("temperature", self.temperature, lambda v: v > 0, "> 0, e.g. 1.0 (or 2/3 as in Louizos et al.)"),
            ("stretch_l", self.stretch_l, lambda v: v < 0, "< 0, e.g. -1.5"),
            ("stretch_r", self.stretch_r, lambda v: v > 1, "> 1, e.g. 1.5"),
            ("alpha_init", self.alpha_init, math.isfinite, "a finite log α, e.g. 5.0"),
        ]
        for name, value, ok, hint in checks:
            if not _is_number(value) or not ok(value):
                problems.append(f"{name}={value!r} is invalid; use {hint}.")
        for name in ("gate_lr", "stage2_lr"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value <= 0):
                problems.append(f"{name}={value!r} must be a positive learning rate or None.")
        for name in ("structured", "finalized"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} must be True or False.")
        return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


class _Indices(nn.Module):
    """Integer buffers (one per tensor of the wrapped module): the fixed support's flat indices."""


# ---- layer --------------------------------------------------------------------------------------------------
class DiffLayer(DeltaLayer):
    """Runs the wrapped module with W + d for each of its own tensors; d gated (training) or on a fixed support.
    core/delta.py runs it (forward, per-row routing, merge W += d and unmerge W -= d) from ``held`` and ``delta``."""

    adapter_param_names = ("diff_w", "diff_log_alpha", "diff_group_log_alpha", "diff_values", "diff_index")
    adapter_other_names = ("gate_settings",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_param_names:
            setattr(self, attr, nn.ModuleDict())
        self.gate_settings: dict[str, DiffPruningConfig] = {}

    def update_layer(self, adapter_name: str, config: DiffPruningConfig, module_name: str) -> None:
        self.set_shared_input(module_name)
        self.gate_settings[adapter_name] = config
        params = own_params(self)
        if config.finalized:  # empty support; the checkpoint loader sizes it (load_file_state)
            self.diff_index[adapter_name] = _Indices()
            for key, p in params:
                self.diff_index[adapter_name].register_buffer(key, torch.zeros(0, dtype=torch.long, device=p.device))
            self.diff_values[adapter_name] = nn.ParameterDict({k: _zeros((0,), p) for k, p in params})
            return
        self.diff_w[adapter_name] = nn.ParameterDict({k: _zeros(p.shape, p) for k, p in params})
        self.diff_log_alpha[adapter_name] = nn.ParameterDict(
            {k: nn.Parameter(torch.full_like(t, config.alpha_init)) for k, t in self.diff_w[adapter_name].items()}
        )
        if config.structured:
            self.diff_group_log_alpha[adapter_name] = nn.ParameterDict(
                {k: nn.Parameter(torch.full((1,), config.alpha_init, device=p.device)) for k, p in params}
            )

    # ---- the delta --------------------------------------------------------------------------------------
    def delta(self, name: str, key: str, sample: bool = False) -> torch.Tensor:
        """d for tensor ``key`` of adapter ``name`` (shape of W): a gate sample if ``sample``, else deterministic."""
        shape = dict(own_params(self))[key].shape
        if name in self.diff_values:
            values, index = self.diff_values[name][key], getattr(self.diff_index[name], key)
            return values.new_zeros(shape.numel()).index_put((index,), values).view(shape)  # (nnz,) -> W's shape
        c = self.gate_settings[name]
        gate = (
            (lambda a: sample_gate(a, c.temperature, c.stretch_l, c.stretch_r))
            if sample
            else (lambda a: eval_gate(a, c.stretch_l, c.stretch_r))
        )
        d = gate(self.diff_log_alpha[name][key]) * self.diff_w[name][key]  # z ⊙ w
        if name in self.diff_group_log_alpha:
            d = d * gate(self.diff_group_log_alpha[name][key])  # z_g z ⊙ w
        return d

    def held(self) -> Container[str]:
        return self.gate_settings

    def auxiliary_loss(self) -> torch.Tensor | None:
        """l0_lambda * E[||d||_0] over the live adapters whose gates train (None when there is none)."""
        losses = []
        for name in self.live_adapters():
            if name not in self.diff_log_alpha:
                continue
            c = self.gate_settings[name]
            for key, log_alpha in self.diff_log_alpha[name].items():
                if not log_alpha.requires_grad:
                    continue
                expected = prob_nonzero(log_alpha, c.temperature, c.stretch_l, c.stretch_r).sum()
                if name in self.diff_group_log_alpha:
                    group = self.diff_group_log_alpha[name][key]
                    expected = expected * prob_nonzero(group, c.temperature, c.stretch_l, c.stretch_r).sum()
                losses.append(c.l0_lambda * expected)
        return torch.stack(losses).sum() if losses else None

    # ---- stage two and the sparse checkpoint ---------------------------------------------------------------
    @torch.no_grad()
    def fix_support(self, name: str, supports: dict[str, torch.Tensor]) -> None:
        """Keep d only at ``supports[key]`` (flat indices): drop w and the gates, keep the values (trainable)."""
        trainable = any(p.requires_grad for p in self.adapter_parameters(name))
        values = {k: self.delta(name, k).flatten()[idx] for k, idx in supports.items()}
        for attr in ("diff_w", "diff_log_alpha", "diff_group_log_alpha", "diff_values", "diff_index"):
            if name in getattr(self, attr):
                del getattr(self, attr)[name]
        self.diff_index[name] = _Indices()
        for key, idx in supports.items():
            self.diff_index[name].register_buffer(key, idx.long())
        self.diff_values[name] = nn.ParameterDict(
            {k: nn.Parameter(v.detach().clone(), requires_grad=trainable) for k, v in values.items()}
        )

    @torch.no_grad()
    def file_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out = {}
        for key, param in own_params(self):
            if adapter_name in self.diff_values:
                index = getattr(self.diff_index[adapter_name], key)
                values = self.diff_values[adapter_name][key]
            else:
                d = self.delta(adapter_name, key).flatten()
                index = d.nonzero().squeeze(1)
                values = d[index]
            small = param.numel() < 2**31
            out[f"diff_index.{key}"] = index.to(torch.int32 if small else torch.int64)
            out[f"diff_values.{key}"] = values
        return out

    @torch.no_grad()
    def load_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(tensors)
        config = self.gate_settings[adapter_name]
        for key, param in own_params(self):
            if f"diff_index.{key}" not in tensors or f"diff_values.{key}" not in tensors:
                continue  # the loader reports what is missing
            index = _checked_index(tensors, key, param.numel())
            values = out.pop(f"diff_values.{key}")
            del out[f"diff_index.{key}"]
            if adapter_name in self.diff_values:  # fixed support: size it to the file's
                old = self.diff_values[adapter_name][key]
                self.diff_values[adapter_name][key] = nn.Parameter(
                    torch.zeros(index.numel(), dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
                )
                getattr(self.diff_index[adapter_name], key).resize_(index.numel())
                out[f"diff_index.{key}"], out[f"diff_values.{key}"] = index, values
                continue
            # gated state: w = d, gates saturated open on the stored entries and closed elsewhere
            low, high = config.stretch_l, config.stretch_r
            opened = max(config.alpha_init, math.log((1 - low) / (high - 1)) + 1)  # σ(a)(r - l) + l >= 1
            closed = min(-config.alpha_init, math.log(-low / high) - 1)  # σ(a)(r - l) + l <= 0
            w = torch.zeros(param.numel(), dtype=values.dtype).index_put((index,), values)
            gates = torch.full((param.numel(),), closed).index_fill(0, index, opened)
            out[f"diff_w.{key}"], out[f"diff_log_alpha.{key}"] = w.view(param.shape), gates.view(param.shape)
            if config.structured:
                out[f"diff_group_log_alpha.{key}"] = torch.tensor([opened])
        return out


def _zeros(shape: torch.Size | tuple[int, ...], like: torch.Tensor) -> nn.Parameter:
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    return nn.Parameter(torch.zeros(shape, dtype=dtype, device=like.device))


def _checked_index(tensors: dict[str, torch.Tensor], key: str, numel: int) -> torch.Tensor:
    index, values = tensors[f"diff_index.{key}"], tensors[f"diff_values.{key}"]
    problem = None
    if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
        problem = f"diff_index.{key} must be a 1-D int32/int64 tensor, got {index.dtype} {tuple(index.shape)}"
    elif values.dim() != 1 or values.numel() != index.numel():
        problem = f"diff_values.{key} has shape {tuple(values.shape)}; it needs one value per index ({index.numel()})"
    elif not values.is_floating_point():
        problem = f"diff_values.{key} has dtype {values.dtype}; it needs floating-point values (float32, bf16, fp16)"
    elif index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel):
        problem = f"diff_index.{key} holds indices outside 0..{numel - 1}"
    elif index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        problem = f"diff_index.{key} is not strictly ascending (duplicate or unsorted indices)"
    if problem:
        raise CheckpointError(f"Corrupt diff pruning checkpoint: {problem}. Re-save it with save_pretrained.")
    return index.long()


# ---- stage two: magnitude projection to the target density ----------------------------------------------------
def _diff_layers(peft_model: AdapterHost, name: str) -> list[DiffLayer]:
    return [m for _, m in adapter_layers(peft_model.model) if isinstance(m, DiffLayer) and name in m.gate_settings]


@torch.no_grad()
def finalize(peft_model: AdapterHost, target_density: float | None = None, adapter_name: str | None = None) -> int:
    """Project adapter ``adapter_name`` (default: the active one) onto the L0 ball (paper section 3.2): keep the
    k = round(target_density * N) entries of largest |d| over all N targeted entries, exactly k, ties broken in
    module order. Afterwards the support is fixed and only its values train: build a new optimizer. Returns k."""
    name = adapter_name or peft_model.active_adapter
    config = peft_model.peft_config.get(name)
    if not isinstance(config, DiffPruningConfig):
        raise ConfigError(
            f"finalize() needs a diff pruning adapter; {name!r} is "
            f"{type(config).__name__ if config else 'not loaded'}. Pass adapter_name= one of "
            f"{[n for n, c in peft_model.peft_config.items() if isinstance(c, DiffPruningConfig)]}."
        )
    density = config.target_density if target_density is None else target_density
    layers = _diff_layers(peft_model, name)
    if any(name in layer.merged_adapters for layer in layers):
        raise MergeError(f"Adapter {name!r} is merged; call unmerge_adapter() before finalize().")
    tensors = [(layer, key) for layer in layers for key, _ in own_params(layer)]
    total = sum(dict(own_params(layer))[key].numel() for layer, key in tensors)
    k = round(density * total) if _is_number(density) and 0 < density <= 1 else 0
    if k < 1:
        raise ConfigError(
            f"target_density={density!r} keeps no entry of the {total} targeted ones; use a share in (0, 1] "
            f"of at least {1 / total:.2g}."
        )
    magnitudes = [partial(_magnitude, layer, name, key) for layer, key in tensors]
    grouped: dict[int, dict[str, torch.Tensor]] = {}
    for (layer, key), support in zip(tensors, magnitude_supports(magnitudes, k), strict=True):
        grouped.setdefault(id(layer), {})[key] = support
    for layer in layers:
        layer.fix_support(name, grouped[id(layer)])
    config.finalized = True
    config.target_density = density
    return k


def _magnitude(layer: DiffLayer, name: str, key: str) -> torch.Tensor:
    return layer.delta(name, key).abs().flatten().float()  # |d|, flat


def finish_training(peft_model: AdapterHost) -> None:
    """The training loop's stage change after 3/4 of the steps (METHOD.after_training_at): finalize the active
    adapter to its target density, unless done already; the rest of the run trains the support's values only."""
    if not peft_model.peft_config[peft_model.active_adapter].finalized:
        finalize(peft_model)


def param_groups(peft_model: AdapterHost, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer groups: the gates (log α) at each config's ``gate_lr`` without weight decay, the rest at ``lr``;
    once the active adapter is finalized (stage 2), the rest at its ``stage2_lr`` (the sparse support takes larger
    steps than the dense delta did)."""
    gates: dict[float, list[nn.Parameter]] = {}
    gate_ids = set()
    for layer in (m for _, m in adapter_layers(peft_model.model) if isinstance(m, DiffLayer)):
        for name, config in layer.gate_settings.items():
            for attr in ("diff_log_alpha", "diff_group_log_alpha"):
                for p in getattr(layer, attr)[name].values() if name in getattr(layer, attr) else ():
                    if p.requires_grad:
                        gates.setdefault(config.gate_lr or lr, []).append(p)
                        gate_ids.add(id(p))
    rest = [p for p in peft_model.parameters() if p.requires_grad and id(p) not in gate_ids]
    active = peft_model.peft_config.get(peft_model.active_adapter)
    if isinstance(active, DiffPruningConfig) and active.finalized and active.stage2_lr is not None:
        lr = active.stage2_lr
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}] if rest else []
    return groups + [{"params": ps, "lr": glr, "weight_decay": 0.0} for glr, ps in gates.items()]


# ---- attaching ------------------------------------------------------------------------------------------------
def find_diff_targets(model: nn.Module, config: DiffPruningConfig) -> list[str]:
    """Paths of the modules whose own tensors get a delta, deepest first. 'all' is every module with weights but the
    output head; exclude_modules, layers_to_transform and modules_to_save apply as for any targeting config."""
    spec = ".*" if config.target_modules == ALL else config.target_modules
    found = find_targets(
        model,
        replace(config, target_modules=spec),
        lambda m: bool(own_params(m)),
        supported_label="modules with weights",
    )
    if config.target_modules == ALL:
        heads = output_head_names(model)
        found = [p for p in found if p not in heads]
        if not found:
            raise TargetNotFoundError(
                f"target_modules='all' found no module with weights in {type(model).__name__} outside the output "
                "head and modules_to_save; name modules with target_modules=[...]."
            )
    return sorted(found, key=lambda p: -p.count("."))


def inject(model: nn.Module, config: DiffPruningConfig, adapter_name: str) -> None:
    targets = find_diff_targets(model, config)
    warn_tied(model, targets)
    inject_layers(model, config, adapter_name, targets, lambda module: DiffLayer)


METHOD = Method(
    name="diff",
    config_class=DiffPruningConfig,
    inject=inject,
    can_merge=True,  # stage 2 (section 3.2): the last quarter of the steps trains the fixed support
    functions={"finalize": finalize},
    training=Training(
        learning_rate=1e-4, param_groups=param_groups, after_training_at=0.75, after_training=finish_training
    ),
)
