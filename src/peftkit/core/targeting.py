"""Which modules an adapter attaches to: exact names, dotted suffixes, a regex, or "all-linear".

The rules follow Hugging Face peft so that the same config targets the same modules:
- a list entry matches a module whose full name equals it or ends with ``"." + entry``;
- a string is a regular expression that must match the full module name;
- ``"all-linear"`` takes every Linear / GPT-2 Conv1D except the output head;
- ``exclude_modules`` uses the same rules to drop matches; modules in ``modules_to_save`` are never targets;
- ``layers_to_transform`` keeps only modules inside the given block indices, found after ``layers_pattern``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from peftkit.core.config import TASK_HEADS, PeftConfig
from peftkit.errors import ConfigError, TargetNotFoundError, choices

ALL_LINEAR = "all-linear"


@dataclass(kw_only=True)
class TargetingConfig(PeftConfig):
    """Config fields of methods that attach to modules chosen by name."""

    # model_type -> default target_modules, used when target_modules is None
    default_target_modules: ClassVar[dict[str, list[str]]] = {}

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names or dotted suffixes (list), a regex (string), or 'all-linear'."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never to target (same rules as target_modules)."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only target modules inside these block indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the block list that layers_to_transform indexes (e.g. 'layers')."}
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        if isinstance(self.target_modules, str) and self.target_modules != ALL_LINEAR:
            try:
                re.compile(self.target_modules)
            except re.error as err:
                problems.append(f"target_modules={self.target_modules!r} is not a valid regex ({err}).")
        if isinstance(self.target_modules, (list, tuple, set)) and not self.target_modules:
            problems.append("target_modules=[] targets nothing; list module names or leave it None for defaults.")
        layers = self.layers_to_transform
        if layers is not None:
            values = [layers] if isinstance(layers, int) else list(layers)
            if any(not isinstance(v, int) or v < 0 for v in values):
                problems.append(f"layers_to_transform={layers!r} must hold non-negative block indices.")
        return problems

    def to_dict(self) -> dict:
        out = super().to_dict()
        if isinstance(self.target_modules, (set, tuple)):
            out["target_modules"] = sorted(self.target_modules)
        return out


def model_type(model: nn.Module) -> str | None:
    """transformers' ``config.model_type`` ("bert", "llama", ...), else the class name (diffusers models)."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None) if config is not None else None
    return kind or type(model).__name__


def is_conv1d_gpt2(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a Linear stored transposed, weight (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d_gpt2(module)


def iter_free_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module that is not inside an adapter wrapper's internals.

    An adapter wrapper itself is yielded (so a second adapter can be added to it); its base layer and its
    adapter parameters are not.
    """
    from peftkit.core.layer import AdapterLayer  # local: layer imports targeting helpers

    wrapped: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in wrapped):
            continue
        if isinstance(module, AdapterLayer):
            wrapped.append(name)
        yield name, module


def base_of(module: nn.Module) -> nn.Module:
    from peftkit.core.layer import AdapterLayer

    while isinstance(module, AdapterLayer):
        module = module.base_layer
    return module


def _matches(name: str, spec: Sequence[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def _layer_index(name: str, layers_pattern: Sequence[str] | str | None) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(\d+)\.", name + ".")
        return int(match.group(1)) if match else None
    for pattern in patterns:
        match = re.match(rf"(?:.*\.)?{re.escape(pattern)}\.(\d+)\.", name + ".")
        if match:
            return int(match.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head or base_of(module) is head}


def resolve_targets(model: nn.Module, config: TargetingConfig) -> list[str] | str:
    """The effective target_modules: the config's, or the method's default for this model type."""
    if config.target_modules is not None:
        targets = config.target_modules
        return ALL_LINEAR if isinstance(targets, str) and targets.lower() == ALL_LINEAR else targets  # as peft
    kind = model_type(model)
    if kind in config.default_target_modules:
        return list(config.default_target_modules[kind])
    raise ConfigError(
        f"{type(config).__name__} has no default target_modules for model type {kind!r} "
        f"(defaults exist for {choices(config.default_target_modules)}). Pass target_modules, "
        "e.g. target_modules=['q_proj', 'v_proj'] or target_modules='all-linear'."
    )


def find_targets(
    model: nn.Module,
    config: TargetingConfig,
    supported: Callable[[nn.Module], bool],
    *,
    supported_label: str,
) -> list[str]:
    """Full names of the modules ``config`` targets in ``model``; raises when none (or a wrong type) match."""
    targets = resolve_targets(model, config)
    heads = output_head_names(model) if targets == ALL_LINEAR else set()
    keep = [*(config.modules_to_save or []), *TASK_HEADS.get(config.task_type or "", ())]  # never targets
    matched, wrong_type = [], []
    for name, module in iter_free_modules(model):
        if targets == ALL_LINEAR:
            hit = is_linear_like(base_of(module)) and name not in heads
        else:
            hit = _matches(name, targets)
        if not hit or (config.exclude_modules and _matches(name, config.exclude_modules)):
            continue
        if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in keep):
            continue
        if config.layers_to_transform is not None:
            wanted = config.layers_to_transform
            wanted = [wanted] if isinstance(wanted, int) else list(wanted)
            if _layer_index(name, config.layers_pattern) not in wanted:
                continue
        (matched if supported(base_of(module)) else wrong_type).append(name)
    if wrong_type and targets != ALL_LINEAR and isinstance(targets, (list, tuple, set)):
        kinds = {n: type(base_of(model.get_submodule(n))).__name__ for n in wrong_type[:5]}
        raise ConfigError(
            f"target_modules={targets!r} matched modules of a type {supported_label} cannot adapt: "
            + ", ".join(f"{n!r} ({k})" for n, k in kinds.items())
            + f". Supported: {supported_label}. Name the layers inside them instead."
        )
    if not matched:
        raise TargetNotFoundError(no_match_message(model, targets, "target_modules", supported))
    return matched


def no_match_message(model: nn.Module, spec, field_name: str, supported: Callable[[nn.Module], bool]) -> str:
    names = [n for n, m in iter_free_modules(model) if supported(base_of(m))]
    suffixes = list(dict.fromkeys(".".join(n.split(".")[-2:]) for n in names))
    shown = ", ".join(repr(s) for s in suffixes[:16]) + (", ..." if len(suffixes) > 16 else "")
    leaf = sorted({n.split(".")[-1] for n in names})[:2] or ["q_proj", "v_proj"]
    return (
        f"No module matched {field_name}={spec!r}. Candidates: {shown or '(none of a supported type)'}. "
        f"Use full names or dotted suffixes such as {leaf!r}, or a regex such as r'.*\\.({'|'.join(leaf)})'."
    )
