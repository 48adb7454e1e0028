"""Bottleneck adapters: small two-layer networks added after (or beside) a frozen model's modules.

Sequential (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", section 2.1; Pfeiffer et al.
2020, "AdapterFusion", section 3.1 for the single-adapter placement), on a module's output h (width d):

    h' = h + s * up(dropout(f(down(LN_before(h)))))     down: d -> k, up: k -> d, k = d / reduction_factor

Parallel (He et al. 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning", section 3, eq. 9),
beside a block (attention or feed-forward) whose input is x and whose output projection gives h:

    h' = h + s * up(f(down(x)))

Presets: "houlsby" adapts the attention output and the feed-forward output (swish, k = d/16); "pfeiffer" the
feed-forward output only (relu, k = d/16); "parallel" sits beside the feed-forward block (relu, k = d/2, s = 4).
``init_weights="identity"`` zeroes the up-projection, so the adapted model starts equal to the base model.

Adapters attach by name, never by copying model code: ``PLACEMENTS`` (methods/bottleneck_placements.py) tells, per
``model_type``, which modules are the attention output and the feed-forward output (and, for parallel adapters,
the blocks whose input they read, captured with a forward pre-hook); the config's ``*_modules`` fields give them
for any other nn.Module.
An adapter is a new non-linear layer, so it cannot be folded into a weight: ``merge_adapter`` raises.
Several adapters compose at every layer with Stack / Average / Fusion (core/compose.py); a fusion adapter
(``fusion_of=[...]``) holds AdapterFusion's query, key and value (Pfeiffer et al. 2021, section 3.2;
methods/bottleneck_fusion.py).
Compacter (methods/compacter.py) reuses this layer with PHM projections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.core.compose import Average, Composition, Fusion, Stack
from peftkit.core.inject import Injection, add_modules_to_save
from peftkit.core.layer import AdapterLayer
from peftkit.core.method import Method, Training
from peftkit.core.targeting import TargetingConfig
from peftkit.errors import ConfigError, choices
from peftkit.methods.bottleneck_fusion import FusionLayer, fusion_sites
from peftkit.methods.bottleneck_placements import PLACEMENTS as PLACEMENTS  # re-exported: importable from here too
from peftkit.methods.bottleneck_placements import Placement as Placement
from peftkit.methods.bottleneck_placements import features, sites

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh}
INIT_CHOICES = ("identity", "bert")
PRESETS: dict[str, dict[str, Any]] = {
    "houlsby": dict(mh_adapter=True, output_adapter=True, parallel=False, reduction_factor=16, non_linearity="swish"),
    "pfeiffer": dict(mh_adapter=False, output_adapter=True, parallel=False, reduction_factor=16, non_linearity="relu"),
    "parallel": dict(mh_adapter=False, output_adapter=True, parallel=True, reduction_factor=2, non_linearity="relu"),
}
PRESET_SCALING = {False: 1.0, True: 4.0}  # sequential, parallel (He et al. 2022 use s = 4)


def _names_help(what: str) -> dict[str, str]:
    return {"help": f"Names / dotted suffixes (list) or a regex (string) of {what}; None: the model type's default."}


@dataclass(kw_only=True)
class BottleneckConfig(TargetingConfig):
    """Bottleneck adapters. Fields left at None take the preset's value; ``target_modules`` (optional) overrides
    the placement: one adapter after (or beside) each named module."""

    peft_type: ClassVar[str] = "BOTTLENECK"
    prefix: ClassVar[str] = "bottleneck"  # parameter-name prefix of the projections
    presets: ClassVar[dict[str, dict[str, Any]]] = PRESETS

    preset: str = field(default="pfeiffer", metadata={"help": f"Placement and defaults: {', '.join(PRESETS)}."})
    mh_adapter: bool | None = field(default=None, metadata={"help": "An adapter after the attention output."})
    output_adapter: bool | None = field(default=None, metadata={"help": "An adapter after the feed-forward output."})
    parallel: bool | None = field(default=None, metadata={"help": "Beside the block (reads its input) vs after it."})
    reduction_factor: float | None = field(default=None, metadata={"help": "Bottleneck width k = d / factor."})
    bottleneck_size: int | None = field(default=None, metadata={"help": "Bottleneck width k (instead of a factor)."})
    non_linearity: str | None = field(default=None, metadata={"help": f"One of {', '.join(ACTIVATIONS)}."})
    scaling: float | None = field(default=None, metadata={"help": "s in h + s * up(f(down(.))); 1 (parallel: 4)."})
    residual: bool = field(default=True, metadata={"help": "Add the adapter's input back (sequential adapters)."})
    residual_before_ln: bool = field(
        default=True, metadata={"help": "Residual taken before ln_before (True) or after it (False)."}
    )
    ln_before: bool = field(default=False, metadata={"help": "A trainable LayerNorm on the adapter's input."})
    ln_after: bool = field(default=False, metadata={"help": "A trainable LayerNorm on the output (not identity)."})
    init_weights: str = field(
        default="identity", metadata={"help": "'identity': up-projection zero; 'bert': N(0, 0.02) everywhere."}
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the bottleneck activations."})
    attention_output_modules: list[str] | str | None = field(
        default=None, metadata=_names_help("the attention output projections")
    )
    ffn_output_modules: list[str] | str | None = field(
        default=None, metadata=_names_help("the feed-forward output projections")
    )
    attention_modules: list[str] | str | None = field(
        default=None, metadata=_names_help("the attention blocks (parallel adapters read their input)")
    )
    ffn_modules: list[str] | str | None = field(
        default=None, metadata=_names_help("the feed-forward blocks (parallel adapters read their input)")
    )
    fusion_of: list[str] | None = field(
        default=None, metadata={"help": "Make this adapter an AdapterFusion layer over these trained adapters."}
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.preset not in self.presets:
            problems.append(f"preset={self.preset!r} is not a preset; use one of {choices(self.presets)}.")
        if self.reduction_factor is not None and not self.reduction_factor > 0:
            problems.append(f"reduction_factor={self.reduction_factor!r} must be positive (typical: 16).")
        if self.bottleneck_size is not None and (not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1):
            problems.append(f"bottleneck_size={self.bottleneck_size!r} must be a positive integer (e.g. 48).")
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            problems.append("give reduction_factor or bottleneck_size, not both.")
        if self.non_linearity is not None and self.non_linearity not in ACTIVATIONS:
            problems.append(f"non_linearity={self.non_linearity!r} is not one of {choices(ACTIVATIONS)}.")
        if self.init_weights not in INIT_CHOICES:
            problems.append(f"init_weights={self.init_weights!r} is not one of {choices(INIT_CHOICES)}.")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout!r} must be in [0, 1).")
        if self.fusion_of is not None and (
            isinstance(self.fusion_of, str) or not self.fusion_of or not all(isinstance(n, str) for n in self.fusion_of)
        ):
            problems.append(f"fusion_of={self.fusion_of!r} must be a non-empty list of adapter names.")
        if self.preset in self.presets and not (self.setting("mh_adapter") or self.setting("output_adapter")):
            problems.append("mh_adapter=False and output_adapter=False place no adapter; enable one of them.")
        return problems

    def setting(self, name: str) -> Any:
        """A field's value, or the preset's when the field is None."""
        value = getattr(self, name)
        if value is None and name == "scaling":
            return PRESET_SCALING[bool(self.setting("parallel"))]
        return self.presets.get(self.preset, {}).get(name) if value is None else value

    def width(self, d: int, module_name: str) -> int:
        """Bottleneck width k for a module of width d; refuses a factor larger than d."""
        k = self.bottleneck_size or int(d // self.setting("reduction_factor"))
        if k < 1:
            raise ConfigError(
                f"reduction_factor={self.setting('reduction_factor')!r} is larger than the width {d} of "
                f"{module_name!r}, leaving no bottleneck; use a factor of at most {d} or set bottleneck_size."
            )
        return k

    def make_projections(self, d_in: int, k: int, d_out: int) -> tuple[nn.Module, nn.Module]:
        """(down, up) modules; Compacter overrides this with PHM layers."""
        down, up = nn.Linear(d_in, k), nn.Linear(k, d_out)
        with torch.no_grad():
            if self.init_weights == "bert":
                for p in (down.weight, up.weight):
                    p.normal_(0.0, 0.02)
                down.bias.zero_()
            else:
                up.weight.zero_()
            up.bias.zero_()
        return down, up


# ---- layers -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Settings:
    parallel: bool
    residual: bool
    residual_before_ln: bool
    scaling: float
    non_linearity: str


class _Tap:
    """Forward pre-hook on a block: keeps the block's input for the parallel adapter beside it."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.hook_id = -1
        self.x: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.x = first if first is not None else kwargs.get("hidden_states")

    def remove(self) -> None:
        self.module._forward_pre_hooks.pop(self.hook_id, None)
        self.module._forward_pre_hooks_with_kwargs.pop(self.hook_id, None)

    def __getstate__(self) -> dict:  # copies never carry an activation
        return {**self.__dict__, "x": None}


class BottleneckLayer(AdapterLayer):
    """Adapters on a wrapped module's output. Holds bottleneck adapters, Compacter adapters (``compacter_*``,
    PHM projections and the shared rule) and fusion layers; runs plain lists, compositions and per-row routing."""

    adapter_param_names = (
        "bottleneck_down", "bottleneck_up", "bottleneck_ln_before", "bottleneck_ln_after", "bottleneck_fusion",
        "compacter_down", "compacter_up", "compacter_rule",
    )  # fmt: skip
    adapter_other_names = ("bottleneck_dropout", "settings", "fusion_of", "taps", "rule_owner")
    composable = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in (*self.adapter_param_names, "bottleneck_dropout"):
            setattr(self, attr, nn.ModuleDict())
        self.settings: dict[str, _Settings] = {}
        self.fusion_of: dict[str, list[str]] = {}
        self.taps: dict[str, _Tap] = {}
        self.rule_owner: dict[str, bool] = {}  # Compacter: the one layer that saves the shared rule
        self.composition: Composition | None = None

    def update_layer(self, adapter_name: str, config: BottleneckConfig, module_name: str) -> None:
        dims = features(self.get_base_layer())
        weight = next(self.get_base_layer().parameters(), None)
        dtype = weight.dtype if weight is not None and weight.dtype == torch.float64 else torch.float32
        device = weight.device if weight is not None else None
        if config.fusion_of:
            self.bottleneck_fusion[adapter_name] = FusionLayer(dims[1]).to(device=device, dtype=dtype)
            self.fusion_of[adapter_name] = list(config.fusion_of)
            return
        parallel = bool(config.setting("parallel"))
        d_out = dims[1]
        d_in = dims[0] if parallel and config.target_modules is not None else d_out
        k = config.width(d_out, module_name)
        down, up = config.make_projections(d_in, k, d_out)
        getattr(self, f"{config.prefix}_down")[adapter_name] = down.to(device=device, dtype=dtype)
        getattr(self, f"{config.prefix}_up")[adapter_name] = up.to(device=device, dtype=dtype)
        if config.ln_before:
            self.bottleneck_ln_before[adapter_name] = nn.LayerNorm(d_in).to(device=device, dtype=dtype)
        if config.ln_after:
            self.bottleneck_ln_after[adapter_name] = nn.LayerNorm(d_out).to(device=device, dtype=dtype)
        self.bottleneck_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.settings[adapter_name] = _Settings(
            parallel, config.residual, config.residual_before_ln, config.setting("scaling"),
            config.setting("non_linearity"),
        )  # fmt: skip

    @property
    def weight(self) -> torch.Tensor:  # model code reads it (T5 casts to wo.weight.dtype)
        return self.get_base_layer().weight

    def attach_tap(self, adapter_name: str, block: nn.Module) -> None:
        tap = _Tap(block)
        tap.hook_id = block.register_forward_pre_hook(tap, with_kwargs=True).id
        self.taps[adapter_name] = tap

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.taps:
            self.taps[adapter_name].remove()
        super().delete_adapter(adapter_name)

    def unload(self, merge: bool) -> nn.Module:
        for tap in self.taps.values():
            tap.remove()
        return super().unload(merge)

    def set_adapter(self, names: list[str] | Composition) -> None:
        super().set_adapter(names)  # a composition iterates over its adapter names
        self.composition = names if isinstance(names, Composition) and names.layer_level else None

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        out = super().adapter_state_dict(adapter_name)
        if not self.rule_owner.get(adapter_name, False):  # the shared rule is saved once, by its owner
            out = {k: v for k, v in out.items() if not k.startswith("compacter_rule.")}
        return out

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(x, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out  # (..., d)
        if self.disabled:
            return out
        if self.routing is not None:
            new = self._routed(h, x)
        elif self.composition is not None:
            new = self._compose(self.composition, h, x, None)
        else:
            live = self.live_adapters()
            if not live:
                return out
            new = h + sum(self._compose(name, h, x, None) - h for name in live)  # plain list: effects add
        for tap in self.taps.values():  # the block's input is used once; do not keep it (or its graph) alive
            tap.x = None
        return (new, *out[1:]) if isinstance(out, tuple) else new

    def _routed(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Each row through its own adapter: a loop over the adapters present, never over rows."""
        new = h.clone()
        for name, idx in self.routed_groups(h.shape[0]):
            x_rows = x[idx] if isinstance(x, torch.Tensor) and x.shape[:1] == h.shape[:1] else x
            new[idx] = self._compose(name, h[idx], x_rows, idx).to(new.dtype)
        return new

    def _compose(self, plan: str | Composition, h: torch.Tensor, x: torch.Tensor, rows: torch.Tensor | None):
        """The output of ``plan`` (an adapter name or a block) on h; adapters absent here act as the identity."""
        if isinstance(plan, Stack):
            for child in plan.children:
                h = self._compose(child, h, x, rows)
            return h
        if isinstance(plan, Average):
            return sum(w * self._compose(c, h, x, rows) for c, w in zip(plan.children, plan.weights))
        if isinstance(plan, Fusion):
            return self._fuse(plan.name, list(plan.children), h, x, rows)
        if plan in self.fusion_of:
            return self._fuse(plan, self.fusion_of[plan], h, x, rows)
        if plan in self.settings:
            return self._adapter(plan, h, x, rows)
        return h

    def _fuse(self, name: str, children: list[str], h: torch.Tensor, x: torch.Tensor, rows) -> torch.Tensor:
        if name not in self.bottleneck_fusion:
            return h
        fusion = self.bottleneck_fusion[name]
        outputs = [self._compose(c, h, x, rows).to(fusion.value.weight.dtype) for c in children]
        return fusion(h.to(fusion.value.weight.dtype), outputs).to(h.dtype)

    def _project(self, name: str, which: str, z: torch.Tensor) -> torch.Tensor:
        if name in self.compacter_down:
            proj = getattr(self, f"compacter_{which}")[name]
            return proj(z, self.compacter_rule[name].phm_rule)
        return getattr(self, f"bottleneck_{which}")[name](z)

    def _adapter(self, name: str, h: torch.Tensor, x: torch.Tensor, rows) -> torch.Tensor:
        """Sequential: h + s up(f(down(LN(h)))); parallel: h + s up(f(down(x_block)))."""
        st = self.settings[name]
        dtype = self.adapter_parameters(name)[0].dtype
        if st.parallel:
            tap = self.taps.get(name)
            z = (tap.x if rows is None else tap.x[rows]) if tap is not None else x  # (..., d_in)
            z = z.to(dtype)
            residual = h
        else:
            residual = z = h.to(dtype)  # (..., d)
        if name in self.bottleneck_ln_before:
            z = self.bottleneck_ln_before[name](z)
            residual = residual if st.residual_before_ln or st.parallel else z
        hidden = self.bottleneck_dropout[name](ACTIVATIONS[st.non_linearity](self._project(name, "down", z)))
        y = self._project(name, "up", hidden) * st.scaling  # (..., d)
        result = y + residual if (st.residual or st.parallel) else y
        if name in self.bottleneck_ln_after:
            result = self.bottleneck_ln_after[name](result)
        return result.to(h.dtype)


# ---- attaching ----------------------------------------------------------------------------------------------
def inject(model: nn.Module, config: BottleneckConfig, adapter_name: str) -> list[BottleneckLayer]:
    """Attach one adapter (or fusion layer) as a transaction; returns the layers that received it."""
    if config.fusion_of:
        return _inject_fusion(model, config, adapter_name)
    plan = sites(model, config)
    with Injection(model, adapter_name) as inj:
        layers = [inj.wrap(name, BottleneckLayer, config) for name, _ in plan]
        add_modules_to_save(model, config, inj)
    for layer, (_, block) in zip(layers, plan):  # after every wrap succeeded: hooks are never half-added
        if block is not None:
            layer.attach_tap(adapter_name, model.get_submodule(block))
    return layers


def _inject_fusion(model: nn.Module, config: BottleneckConfig, adapter_name: str) -> list[BottleneckLayer]:
    found = fusion_sites(model, config.fusion_of, BottleneckLayer)
    with Injection(model, adapter_name) as inj:
        layers = [inj.wrap(name, BottleneckLayer, config) for name in found]
        add_modules_to_save(model, config, inj)
    return layers


def parameter_count(d: int, k: int, n_adapters: int, d_in: int | None = None) -> int:
    """Trainable parameters of ``n_adapters`` bottleneck adapters: n (d_in k + k + k d + d), biases included."""
    d_in = d if d_in is None else d_in
    return n_adapters * (d_in * k + k + k * d + d)


METHOD = Method(
    name="bottleneck",
    config_class=BottleneckConfig,
    inject=inject,
    can_merge=False,
    merge_hint=(
        "bottleneck adapters add new layers (down-projection, non-linearity, up-projection) after a module's "
        "output, and a non-linear function cannot be folded into a weight matrix, so they always cost extra "
        "inference time (docs/bottleneck.md measures it)."
    ),
    training=Training(learning_rate=5e-3),
)
