"""Layer freezing: train a few whole blocks (or named modules) of a pretrained model and freeze the rest.

The oldest form of parameter-efficient transfer: fine-tune only the top k layers (Howard & Ruder 2018,
"Universal Language Model Fine-tuning for Text Classification", section 3.2, gradual unfreezing; Lee et al. 2019,
"What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning", section 3, who find that training the
last quarter of BERT's layers recovers ~90% of full fine-tuning quality).

peftkit keeps the base model untouched and trains, per adapter, a delta for every tensor of the chosen modules:

    W' = W + ΔW        ΔW = 0 at init, so the model starts as the base model

The gradient of the loss with respect to ΔW equals the one with respect to W, so training ΔW is training the
chosen blocks (only weight decay differs: it pulls ΔW, not W, towards 0). Because the trained tensors are
deltas held by wrap layers, a frozen-layer adapter behaves like any other: it can be switched, disabled, routed
per row (``adapter_names=``), saved alone (the checkpoint holds ΔW only), merged (``W += ΔW``) and unmerged
(``W -= ΔW``); ``unload()`` returns the original weights. Memory: one delta per trained tensor per adapter.

Blocks are found by structure, not by name: the outermost ``nn.ModuleList`` (or ``nn.Sequential`` of one
class) with at least two parameterised children, holding at least 10% of the model's parameters, at the
shallowest depth: ``bert.encoder.layer``, ``model.layers`` (Llama), ``transformer.h`` (GPT-2),
``encoder.block`` and ``decoder.block`` (T5: the choice applies to each list), ``down_blocks`` and ``up_blocks``
(diffusers UNets). ``layers_pattern`` names the list instead. The lists found are logged and kept on the
adapter's config as ``block_lists``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.config import TASK_HEADS, PeftConfig
from peftkit.core.delta import DeltaLayer, logical, own_params, warn_tied
from peftkit.core.inject import inject_layers
from peftkit.core.layer import AdapterLayer, ModulesToSave
from peftkit.core.method import Method, Training
from peftkit.errors import TargetNotFoundError

logger = logging.getLogger("peftkit")

MIN_SHARE = 0.10  # a block list holds at least this share of the model's parameters


DEFAULT_TRAINABLE_LAYERS = 2  # with nothing chosen: the last two blocks train (and the task head)


@dataclass(kw_only=True)
class LayerFreezeConfig(PeftConfig):
    """Which blocks and modules train (as deltas); everything else stays frozen.

    After injection, ``config.block_lists`` (on the adapter's config in ``PeftModel.peft_config``) names the
    repeated-block lists found, e.g. ``['bert.encoder.layer']``.
    """

    peft_type: ClassVar[str] = "FREEZE"

    trainable_layers: int | None = field(
        default=None,
        metadata={
            "help": "Train the last N blocks (N > 0) or the first N blocks (-N) of each block list; "
            f"{DEFAULT_TRAINABLE_LAYERS} when neither layer_indices nor trainable_modules is given."
        },
    )
    layer_indices: list[int] | None = field(
        default=None,
        metadata={"help": "Train these block indices of each block list (negative counts from the end)."},
    )
    trainable_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Also train these modules whole: names or dotted suffixes (list, e.g. ['norm', 'embeddings']) "
            "or a regex on the full module name (string)."
        },
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name(s) or dotted suffix(es) of the block list(s) to use instead of detecting them."},
    )

    def __post_init__(self) -> None:
        if self.trainable_layers is None and self.layer_indices is None and self.trainable_modules is None:
            self.trainable_layers = DEFAULT_TRAINABLE_LAYERS
        super().__post_init__()

    def problems(self) -> list[str]:
        problems = super().problems()
        layers, indices, modules = self.trainable_layers, self.layer_indices, self.trainable_modules
        if layers is not None and (not isinstance(layers, int) or isinstance(layers, bool) or layers == 0):
            problems.append(f"trainable_layers={layers!r} must be a non-zero int: N (last N blocks) or -N (first N).")
        if indices is not None and (
            not isinstance(indices, (list, tuple))
            or not indices
            or any(not isinstance(i, int) or isinstance(i, bool) for i in indices)
        ):
            problems.append(f"layer_indices={indices!r} must be a non-empty list of block indices, e.g. [10, 11].")
        if layers is not None and indices is not None:
            problems.append(
                f"trainable_layers={layers!r} and layer_indices={indices!r} both choose blocks; give only one."
            )
        problems += _pattern_problems("trainable_modules", modules)
        problems += _pattern_problems("layers_pattern", self.layers_pattern)
        return problems


def _pattern_problems(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            return [f"{name}={value!r} is not a valid regex ({err})."]
        return []
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        return [f"{name}={value!r} must be a non-empty list of module names, a regex string or None."]
    return []


# ---- the model's modules, seen through adapter wrappers --------------------------------------------------------
def walk(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) for the model's own modules: an adapter wrapper stands for the module it wraps (its path is
    the wrapper's), the modules inside that one are reached through ``base_layer``; adapter tensors are skipped."""
    for name, child in module.named_children():
        path = prefix + name
        yield path, child
        inner, inner_path = child, path
        while isinstance(inner, AdapterLayer):
            inner, inner_path = inner.base_layer, inner_path + ".base_layer"
        yield from walk(inner, inner_path + ".")


def _matches(name: str, spec: list[str] | str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def _is_block_list(module: nn.Module) -> bool:
    if not isinstance(module, (nn.ModuleList, nn.Sequential)):
        return False
    children = list(module.children())
    if len(children) < 2 or not all(any(True for _ in c.parameters()) for c in children):
        return False
    return isinstance(module, nn.ModuleList) or len({type(c) for c in children}) == 1


def find_block_lists(model: nn.Module, layers_pattern: list[str] | str | None = None) -> list[str]:
    """Paths of the model's repeated-block lists (see the module docstring for the rule), or of the lists
    ``layers_pattern`` names. Raises, naming the candidates, when there is none."""
    lists = [(logical(p), m) for p, m in walk(model) if _is_block_list(m)]
    if layers_pattern is not None:
        found = [p for p, _ in lists if _matches(p, layers_pattern)]
        if not found:
            raise TargetNotFoundError(
                f"layers_pattern={layers_pattern!r} matched no block list. Lists in this model: "
                f"{', '.join(repr(p) for p, _ in lists) or '(none)'}. Use one of them, e.g. layers_pattern="
                f"{(lists[0][0] if lists else 'layers')!r}."
            )
        return found
    outermost = [(p, m) for p, m in lists if not any(p.startswith(q + ".") for q, _ in lists)]
    total = sum(p.numel() for p in model.parameters()) or 1
    sized = [(p, m) for p, m in outermost if sum(t.numel() for t in m.parameters()) >= MIN_SHARE * total]
    sized = sized or outermost
    if not sized:
        raise TargetNotFoundError(
            f"Found no repeated-block list in {type(model).__name__} (an nn.ModuleList, or nn.Sequential of one "
            "class, with at least two parameterised children). Name the blocks with layers_pattern=..., or list "
            "the modules to train with trainable_modules=[...]."
        )
    depth = min(p.count(".") for p, _ in sized)
    return [p for p, _ in sized if p.count(".") == depth]


def chosen_blocks(model: nn.Module, config: LayerFreezeConfig) -> tuple[list[str], list[str]]:
    """(block lists found, logical paths of the chosen blocks) for trainable_layers / layer_indices."""
    if config.trainable_layers is None and config.layer_indices is None:
        return [], []
    lists = find_block_lists(model, config.layers_pattern)
    chosen = []
    for path in lists:
        n = len(model.get_submodule(_actual(model, path)))
        if config.trainable_layers is not None:
            k = config.trainable_layers
            if abs(k) > n:
                raise TargetNotFoundError(
                    f"trainable_layers={k} but {path!r} has {n} blocks; use a value between -{n} and {n}."
                )
            indices = range(n - k, n) if k > 0 else range(-k)
        else:
            bad = [i for i in config.layer_indices if not -n <= i < n]
            if bad:
                raise TargetNotFoundError(
                    f"layer_indices={config.layer_indices!r}: {bad} out of range for {path!r}, which has {n} blocks "
                    f"(valid: 0..{n - 1}, or -{n}..-1 from the end)."
                )
            indices = sorted({i % n for i in config.layer_indices})
        chosen += [f"{path}.{i}" for i in indices]
    return lists, chosen


def _actual(model: nn.Module, logical_path: str) -> str:
    return next(p for p, _ in walk(model) if logical(p) == logical_path)


def find_freeze_targets(model: nn.Module, config: LayerFreezeConfig) -> tuple[list[str], list[str]]:
    """(paths of the modules whose own tensors train, deepest first; block lists found)."""
    lists, prefixes = chosen_blocks(model, config)
    entries = [(p, logical(p), m) for p, m in walk(model)]
    if config.trainable_modules is not None:
        named = [name for _, name, _ in entries if _matches(name, config.trainable_modules)]
        if not named:
            shown = list(dict.fromkeys(".".join(n.split(".")[-2:]) for _, n, m in entries if own_params(m)))[:16]
            raise TargetNotFoundError(
                f"No module matched trainable_modules={config.trainable_modules!r}. Candidates: "
                f"{', '.join(repr(s) for s in shown)}. Use names or dotted suffixes such as ['norm'], or a regex."
            )
        prefixes += named
    keep = [*(config.modules_to_save or []), *TASK_HEADS.get(config.task_type or "", ())]
    heads = [name for _, name, m in entries if isinstance(m, ModulesToSave) or _matches(name, keep)] if keep else []
    heads += [name for _, name, m in entries if isinstance(m, ModulesToSave)]

    def inside(name: str, roots: list[str]) -> bool:
        return any(name == r or name.startswith(r + ".") for r in roots)

    targets = [p for p, name, m in entries if own_params(m) and inside(name, prefixes) and not inside(name, heads)]
    if not targets:
        raise TargetNotFoundError(
            f"The chosen blocks / modules ({', '.join(prefixes[:6])}) hold no tensor outside modules_to_save; "
            "choose other blocks or modules."
        )
    return list(reversed(targets)), lists


# ---- layer --------------------------------------------------------------------------------------------------
class FreezeLayer(DeltaLayer):
    """Holds one delta per own tensor of the wrapped module per adapter; runs the module with W + ΔW
    (core/delta.py: forward, per-row routing, merge W += ΔW and unmerge W -= ΔW)."""

    adapter_param_names = ("freeze_delta",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.freeze_delta = nn.ModuleDict()

    def update_layer(self, adapter_name: str, config: LayerFreezeConfig, module_name: str) -> None:
        self.set_shared_input(module_name)
        deltas = nn.ParameterDict()
        for key, param in own_params(self):
            dtype = param.dtype if param.dtype in (torch.float32, torch.float64) else torch.float32
            deltas[key] = nn.Parameter(torch.zeros(param.shape, dtype=dtype, device=param.device))
        self.freeze_delta[adapter_name] = deltas

    def held(self) -> Container[str]:
        return self.freeze_delta

    def delta(self, name: str, key: str, sample: bool = False) -> torch.Tensor:
        """ΔW itself: a trained tensor, the same at training and evaluation."""
        return self.freeze_delta[name][key]


def inject(model: nn.Module, config: LayerFreezeConfig, adapter_name: str) -> None:
    targets, lists = find_freeze_targets(model, config)
    warn_tied(model, targets)
    config.block_lists = lists
    if lists:
        logger.info("LayerFreeze: block lists %s; training %d modules", lists, len(targets))
    inject_layers(model, config, adapter_name, targets, lambda module: FreezeLayer)


METHOD = Method(
    name="freeze",
    config_class=LayerFreezeConfig,
    inject=inject,
    can_merge=True,
    training=Training(learning_rate=5e-4),
)
