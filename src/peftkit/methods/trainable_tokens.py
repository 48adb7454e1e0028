"""Trainable tokens: train only chosen rows of the input embedding (Hugging Face peft's ``TrainableTokensConfig``),
e.g. the embeddings of new special tokens added to a tokenizer, without training (or saving) the whole matrix.

For the embedding E (V, D) and an adapter's rows R = ``token_indices`` with trained values T (|R|, D):

    E'[i] = T[k]    if i = R[k]            (the chosen rows are replaced)
    E'[i] = E[i]    otherwise              y = embed(ids; E')

T starts as E[R] (``init_weights=True``), so the model starts unchanged. An empty ``token_indices`` (peft's default,
which trains nothing there) takes the special tokens the model's config names (pad, bos, eos...). With several
active adapters each one replaces its rows, in activation order (a later adapter wins on a shared row). Per-row
routing (``adapter_names=``) runs each row group with its adapter's E'.

Tied embeddings: every other module that shares E's tensor (GPT-2's and T5's ``lm_head``; T5's encoder and decoder
``embed_tokens``) is wrapped too and reads the same T, so the output head's rows for those tokens change with the
input rows, as a tied weight does; peft writes the tied copies' keys as well, and so does peftkit.

Beside another method (LoRA's ``trainable_token_indices``, through :func:`with_token_rows`) the same layers train
the rows of the adapter that method attaches; peft then writes ``<embedding>.token_adapter.trainable_tokens_delta``
and not the tied copies.

Merging writes T into E's rows (a copy of the old rows is kept), unmerging writes the old rows back bit for bit;
several merged adapters must not share rows (MergeError). The checkpoint is peft's:
``<module>.trainable_tokens_delta`` (the rows' values, not a difference, despite the name) per wrapped module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from peftkit.core.inject import Injection, add_modules_to_save, own_layer_path
from peftkit.core.layer import AdapterLayer, WrapsInPlace
from peftkit.core.method import Method, Training
from peftkit.core.targeting import TargetingConfig, base_of, find_targets
from peftkit.errors import ConfigError, MergeError

DEFAULT_EMBEDDING = "embed_tokens"  # peft's fallback when the model has no get_input_embeddings


@dataclass(kw_only=True)
class TrainableTokensConfig(TargetingConfig):
    """Trainable tokens' settings, with Hugging Face peft's names.

    ``target_modules`` None takes the model's input embedding (``get_input_embeddings()``), saved by its name.
    """

    peft_type: ClassVar[str] = "TRAINABLE_TOKENS"

    token_indices: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Rows (token ids) of the embedding that train, e.g. the ids of new special tokens; empty: the "
            "model config's special tokens (pad, bos, eos, unk, sep, cls)."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: the rows start as the embedding's (no change at init); False: random."},
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        indices = self.token_indices
        if not isinstance(indices, (list, tuple)):
            problems.append(f"token_indices={indices!r} must be a list of token ids, e.g. [32000].")
        elif any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in indices):
            problems.append(f"token_indices={indices!r} must hold non-negative token ids (int).")
        elif len(set(indices)) != len(indices):
            twice = sorted({i for i in indices if indices.count(i) > 1})
            problems.append(f"token_indices lists {twice} more than once; give each token id once.")
        if not isinstance(self.init_weights, bool):
            problems.append(f"init_weights={self.init_weights!r} must be True or False.")
        return problems

    def to_dict(self) -> dict:
        out = super().to_dict()
        for key in ("exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save"):
            if out.get(key) is None:  # not in peft's TrainableTokensConfig: written only when used
                out.pop(key, None)
        return out


SPECIAL_TOKENS = ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "sep_token_id", "cls_token_id")


def special_token_ids(model: nn.Module) -> list[int]:
    """The special token ids the model's config names (peftkit's default for an empty ``token_indices``)."""
    config, values = getattr(model, "config", None), []
    for key in SPECIAL_TOKENS:
        value = getattr(config, key, None)
        values.extend(value if isinstance(value, (list, tuple)) else [value])
    return sorted({v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0})


def is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


# ---- layers ---------------------------------------------------------------------------------------------------
class TrainableTokensLayer(WrapsInPlace):
    """The chosen rows' values per adapter (``trainable_tokens_delta``), replacing those rows of the weight."""

    adapter_param_names = ("trainable_tokens_delta",)
    adapter_other_names = ("token_indices",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = {}
        self._replaced: dict[str, torch.Tensor] = {}  # merged adapter -> the rows it overwrote

    def update_layer(self, adapter_name: str, config: TrainableTokensConfig, module_name: str) -> None:
        weight = self.get_base_layer().weight  # (V, D)
        rows, size = list(config.token_indices), weight.shape[0]
        if max(rows) >= size:
            raise ConfigError(
                f"token_indices={rows!r} holds {max(rows)}, but {module_name!r} has {size} rows (ids 0..{size - 1}). "
                "Resize the embedding first (model.resize_token_embeddings(len(tokenizer))) or fix the ids."
            )
        with torch.no_grad():
            values = weight[rows].clone() if config.init_weights else torch.randn_like(weight[rows])
        self.token_indices[adapter_name] = rows
        self.trainable_tokens_delta[adapter_name] = nn.Parameter(values)  # (|R|, D)

    def _rows(self, name: str, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.token_indices[name], dtype=torch.long, device=device)

    def weight_with(self, names: list[str]) -> torch.Tensor:
        """E with each named adapter's rows replaced, in order (a later adapter wins on a shared row)."""
        weight = self.get_base_layer().weight  # (V, D)
        for name in names:
            values = self.trainable_tokens_delta[name].to(weight.dtype)
            weight = weight.index_copy(0, self._rows(name, weight.device), values)
        return weight

    def _run(self, names: list[str], args: tuple, kwargs: dict) -> torch.Tensor:
        """The wrapped module with E' as its weight (its own forward: padding_idx, scaled embeddings... kept)."""
        weights = {self.base_prefix() + "weight": self.weight_with(names)}
        return functional_call(self.base_layer, weights, args, kwargs, tie_weights=False, strict=False)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.routing is not None and not self.disabled:
            out = self.base_layer(x, *args, **kwargs)  # (B, T, D) or (B, T, V) for a tied head
            groups = self.routed_groups(x.shape[0])
            if groups:
                out = out.clone()
            for name, rows in groups:
                out[rows] = self._run([name], (x[rows], *args), kwargs).to(out.dtype)
            return out
        live = [n for n in self.live_adapters() if n in self.trainable_tokens_delta]
        if not live:
            return self.base_layer(x, *args, **kwargs)
        return self._run(live, (x, *args), kwargs)

    # ---- merging: write the rows; unmerge writes the overwritten rows back ---------------------------------------
    def _check_disjoint(self, adapter_names: list[str]) -> None:
        seen: dict[int, str] = {}
        for name in [*self.merged_adapters, *adapter_names]:
            for row in self.token_indices[name]:
                if row in seen and seen[row] != name:
                    raise MergeError(
                        f"Adapters {seen[row]!r} and {name!r} both replace token {row}: merged, the result would "
                        "depend on the order. Merge one of them only (merge_adapter(adapter_names=[...]))."
                    )
                seen[row] = name

    @torch.no_grad()
    def merge(self, adapter_names: list[str]) -> None:
        self._check_disjoint(adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            rows = self._rows(name, weight.device)
            self._replaced[name] = weight[rows].clone()
            weight.index_copy_(0, rows, self.trainable_tokens_delta[name].to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.index_copy_(0, self._rows(name, weight.device), self._replaced.pop(name))


class TiedTokensLayer(TrainableTokensLayer):
    """A module sharing the target's weight (a tied LM head, T5's encoder / decoder embeddings): it reads the
    target layer's rows (the same tensors; saved under its own key too, as peft does) and never writes the weight
    itself: the target layer's merge already changed the shared tensor."""

    def update_layer(self, adapter_name: str, config: TrainableTokensConfig, module_name: str) -> None:
        """Nothing of its own: ``tie`` shares the target layer's containers."""

    def tie(self, target: TrainableTokensLayer) -> None:
        self.trainable_tokens_delta = target.trainable_tokens_delta
        self.token_indices = target.token_indices

    def file_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """A copy: the file holds the tensor under both keys, and safetensors refuses shared storage."""
        return {"trainable_tokens_delta": self.trainable_tokens_delta[adapter_name].detach().clone()}

    def delete_adapter(self, adapter_name: str) -> None:
        """The containers are the target layer's: it deletes the entries."""
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]

    @torch.no_grad()
    def merge(self, adapter_names: list[str]) -> None:
        self.merged_adapters.extend(adapter_names)

    @torch.no_grad()
    def unmerge(self) -> None:
        self.merged_adapters.clear()


# ---- attaching ----------------------------------------------------------------------------------------------
def input_embedding_name(model: nn.Module) -> str:
    """peft's default target: the name of ``get_input_embeddings()``, else ``embed_tokens``."""
    getter = getattr(model, "get_input_embeddings", None)
    embedding = getter() if callable(getter) else None
    for name, module in model.named_modules():
        if embedding is not None and (module is embedding or base_of(module) is embedding):
            return name
    return DEFAULT_EMBEDDING


def _free_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every (name, module), shared modules under each of their names, adapter layers' insides left out."""
    inside: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, AdapterLayer):
            inside.append(name)
        yield name, module


def tied_names(model: nn.Module, target: str) -> list[str]:
    """The other modules whose weight is the target's very tensor (tied input / output embeddings)."""
    weight = base_of(model.get_submodule(target)).weight
    return [n for n, m in _free_modules(model) if n != target and getattr(base_of(m), "weight", None) is weight]


def inject(model: nn.Module, config: TrainableTokensConfig, adapter_name: str) -> None:
    """Wrap the embedding(s) and every module tied to them, as one transaction."""
    if config.target_modules is None:  # saved explicit, as peft does
        config.target_modules = input_embedding_name(model)
    if not config.token_indices:  # saved explicit too
        config.token_indices = special_token_ids(model)
    if not config.token_indices:
        raise ConfigError(
            f"token_indices=[] and {type(model).__name__}'s config names no special tokens to default to; list the "
            "token ids to train, e.g. token_indices=tokenizer.convert_tokens_to_ids(['<new>'])."
        )
    targets = find_targets(model, config, is_embedding, supported_label="nn.Embedding")
    ties = {n: tied_names(model, n) for n in targets}
    with Injection(model, adapter_name) as inj:
        for name in targets:
            layer = inj.wrap(own_layer_path(model, name, TrainableTokensLayer), TrainableTokensLayer, config)
            for tied in ties[name]:
                inj.wrap(own_layer_path(model, tied, TiedTokensLayer), TiedTokensLayer, config).tie(layer)
        add_modules_to_save(model, config, inj)


# ---- beside another method (LoRA's trainable_token_indices) ----------------------------------------------------
TOKEN_ADAPTER = "token_adapter"  # peft's wrapper attribute: the rows' key prefix beside another method


class TokensBesideLayer(TrainableTokensLayer):
    """Trainable rows that another method's config asks for: peft keeps them as ``token_adapter.<tensor>``."""

    def file_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {f"{TOKEN_ADAPTER}.{k}": v for k, v in super().file_state_dict(adapter_name).items()}

    def load_file_state(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k.removeprefix(f"{TOKEN_ADAPTER}."): v for k, v in tensors.items()}


class TiedBesideLayer(TiedTokensLayer):
    """A module tied to such an embedding: it reads the embedding layer's rows, which peft saves once (there)."""

    def adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {}

    def file_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        return {}


def token_row_targets(model: nn.Module, indices: list[int] | dict[str, list[int]]) -> dict[str, list[int]]:
    """peft's ``trainable_token_indices``: a list of rows of the input embedding, or {embedding name: rows}."""
    spec = indices if isinstance(indices, dict) else {input_embedding_name(model): indices}
    out: dict[str, list[int]] = {}
    for key, rows in spec.items():
        if not rows:
            raise ConfigError(
                f"trainable_token_indices gives no rows for {key!r}; list token ids (e.g. [32000]) or set it to None."
            )
        config = TrainableTokensConfig(target_modules=[key], token_indices=list(rows))
        out.update(dict.fromkeys(find_targets(model, config, is_embedding, supported_label="nn.Embedding"), rows))
    return out


def with_token_rows(
    model: nn.Module, indices: list[int] | dict[str, list[int]] | None, adapter_name: str, attach: Callable[[], None]
) -> None:
    """Run another method's injection ``attach`` with trainable embedding rows for the same adapter beside it
    (LoRA's ``trainable_token_indices``; None: just ``attach``). All or nothing: if either part fails, neither
    stays. Tied modules (a tied LM head) read the same rows."""
    if indices is None:
        attach()
        return
    targets = token_row_targets(model, indices)
    ties = {n: tied_names(model, n) for n in targets}
    with Injection(model, adapter_name) as inj:
        for name, rows in targets.items():
            config = TrainableTokensConfig(target_modules=[name], token_indices=list(rows))
            layer = inj.wrap(own_layer_path(model, name, TokensBesideLayer), TokensBesideLayer, config)
            for tied in ties[name]:
                inj.wrap(own_layer_path(model, tied, TiedBesideLayer), TiedBesideLayer, config).tie(layer)
        attach()


METHOD = Method(
    name="trainable_tokens",
    config_class=TrainableTokensConfig,
    inject=inject,
    can_merge=True,
    training=Training(learning_rate=1e-3),
)
