"""EVA: data-driven LoRA initialisation (``init_lora_weights="eva"``; Paischer et al. 2024, "One Initialization to
Rule them All: Fine-tuning via Explained Variance Adaptation", section 3).

For every LoRA Linear with input activations X (tokens, in), A is set to the top right-singular vectors of the
centred X, i.e. the principal directions of the layer's inputs, and B = 0 (so the model still starts as the base):

    X - mean(X) = U S V^T        A = V_r^T (r, in)        (whiten: A = diag(S_r)^(-1/2) V_r^T)

The SVD is computed incrementally over batches (Ross et al. 2008, "Incremental Learning for Robust Visual
Tracking": the running components and singular values, the new centred batch and a mean-correction row are
re-decomposed; ``IncrementalPCA``), and a layer stops once its first components' cosine similarity to the previous
step's reaches ``tau`` (section 3.1). Rank redistribution (section 3.2): with ``rho`` >= 1 each layer computes
round(r rho) components, and the total budget (the sum of the configured ranks) goes to the components with the
largest explained-variance ratios across all layers, so a layer ends with 0 .. round(r rho) ranks; with
``adjust_scaling_factors`` its alpha becomes alpha * new r / r. Layers that receive the same input (q, k, v) share
one SVD. A layer left with rank 0 loses its LoRA.

Semantics and names follow peft 0.21 (``EvaConfig``, ``get_eva_state_dict``, ``initialize_lora_eva_weights``, its
default input preparation for language modelling: tokens with attention_mask 0 or label -100 are left out). One
difference: the SVD here is exact (peft draws a randomised one with ``q = 2 k``; the two agree where 2 k covers the
layer's input size).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from peftkit.core.inject import replace_module
from peftkit.core.merge import adapter_layers
from peftkit.core.targeting import find_targets, is_linear_like
from peftkit.errors import ConfigError
from peftkit.methods.lora.config import EvaConfig, LoraConfig
from peftkit.methods.lora.layers import LoraLinear


class IncrementalPCA:
    """Principal components of a stream of batches (Ross et al. 2008; scikit-learn's IncrementalPCA), exact SVD,
    float64. Signs follow scikit-learn: each component's largest-magnitude entry is positive."""

    def __init__(self, n_components: int) -> None:
        self.n_components = n_components
        self.seen = 0
        self.mean: torch.Tensor | None = None  # (in,)
        self.var: torch.Tensor | None = None  # (in,)
        self.components: torch.Tensor | None = None  # (k, in)
        self.singular_values: torch.Tensor | None = None  # (k,)
        self.explained_variance_ratio: torch.Tensor | None = None  # (k,)

    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.double()
        n = x.shape[0]
        total = self.seen + n
        batch_mean = x.mean(0)
        batch_var = x.var(0, unbiased=False)
        if self.mean is None:
            mean, var, stacked = batch_mean, batch_var, x - batch_mean
        else:
            delta = batch_mean - self.mean
            mean = self.mean + delta * n / total
            var = (self.var * self.seen + batch_var * n + delta.square() * self.seen * n / total) / total
            correction = (self.seen * n / total) ** 0.5 * (self.mean - batch_mean)  # the mean shift, as one row
            stacked = torch.cat([self.singular_values[:, None] * self.components, x - batch_mean, correction[None]])
        _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        signs = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))  # (k, 1)
        vh = vh * signs
        k = self.n_components
        self.seen, self.mean, self.var = total, mean, var
        self.components, self.singular_values = vh[:k], s[:k]
        self.explained_variance_ratio = s[:k].square() / (var * total).sum()


class _Hook:
    """Forward hook of one layer: prepares its input rows and feeds them to an IncrementalPCA (or hashes them)."""

    def __init__(self, name: str, prepare: Callable | None, n_components: int = 0, tau: float = 1.0) -> None:
        self.name, self.prepare, self.tau = name, prepare, tau
        self.model_input: Any = None
        self.pca = IncrementalPCA(n_components) if n_components else None
        self.converged = torch.zeros(max(n_components, 1), dtype=torch.bool)
        self.digest: str | None = None
        self.handle: Any = None

    def rows(self, layer_input: Any) -> torch.Tensor:
        if self.prepare is not None:
            return self.prepare(layer_input, self.model_input, self.name)
        x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
        return x.reshape(-1, x.shape[-1])

    @torch.no_grad()
    def __call__(self, module: nn.Module, layer_input: Any, output: Any) -> None:
        x = self.rows(layer_input)
        if self.pca is None:
            self.digest = hashlib.sha1(x.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
            return
        if x.shape[0] < self.pca.n_components:  # fewer tokens than components: this batch cannot update it
            return
        previous = self.pca.components
        self.pca.partial_fit(x.float())
        if previous is not None:
            self.converged = nn.functional.cosine_similarity(self.pca.components, previous) >= self.tau


def forward_fn_dict(model: nn.Module, inputs: dict) -> Any:
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: dict, peft_config: LoraConfig) -> torch.Tensor:
    """The (row, position) index of every token to use: attention_mask 1 and, with use_label_mask, label not
    label_mask_value."""
    if not isinstance(model_input, Mapping):
        raise ConfigError(
            f"EVA's default input preparation needs dict batches (input_ids, attention_mask, labels), not "
            f"{type(model_input).__name__}; pass prepare_model_inputs_fn=None and forward_fn for other batches."
        )
    mask = model_input.get("attention_mask", torch.ones_like(model_input["input_ids"])).bool()
    eva = peft_config.eva_config or EvaConfig()
    if eva.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(layer_input: Any, model_input: torch.Tensor, layer_name: str):
    """The layer's input at the tokens ``prepare_model_inputs_fn_language_modeling`` kept: (tokens, in)."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x[model_input.T.unbind()]


def _targets(model: nn.Module, config: LoraConfig, is_peft: bool) -> list[str]:
    """The Linear layers EVA initialises: LoRA Linear layers of a PeftModel, else the config's Linear targets."""
    if is_peft:
        return [n for n, m in model.named_modules() if type(m) is LoraLinear]
    return find_targets(model, config, is_linear_like, supported_label="Linear, GPT-2 Conv1D")


def _rank_distribution(hooks: dict, groups: dict, budget: int, max_components: dict) -> dict[str, int]:
    """The budget's components go to the largest explained-variance ratios over every layer (ties: the earlier
    layer, layers with their own SVD first); a layer sharing another's input counts that layer's ratios, and the one
    holding the SVD keeps the larger rank."""
    keys, values = [], []
    ordered = [n for n, o in groups.items() if n == o] + [n for n, o in groups.items() if n != o]  # as peft lists them
    for name in ordered:
        ratios = hooks[groups[name]].pca.explained_variance_ratio[: max_components[name]]
        keys += [name] * len(ratios)
        values.append(ratios)
    order = torch.argsort(torch.cat(values), descending=True, stable=True)[:budget]
    counts = dict.fromkeys(groups, 0)
    for i in order.tolist():
        counts[keys[i]] += 1
    for name, owner in groups.items():
        if name != owner and counts[owner] < counts[name]:
            counts[owner], counts[name] = counts[name], counts[owner]
    return counts


def _register(model: nn.Module, names: list[str], make: Callable[[str], _Hook]) -> dict[str, _Hook]:
    hooks = {}
    for name in names:
        hook = make(name)
        hook.handle = model.get_submodule(name).register_forward_hook(hook)
        hooks[name] = hook
    return hooks


def _prepare(fns: Callable | Mapping | None, name: str) -> Callable | None:
    return fns.get(name) if isinstance(fns, Mapping) else fns


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable,
    peft_config: LoraConfig | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """{layer name: A (rank, in)} from the activations of ``dataloader``'s batches (see the module docstring); the
    rank is the redistributed one (0 .. round(r rho)). ``model`` is a PeftModel (its adapters are disabled while the
    batches run) or a plain model with ``peft_config``. ``gather_distributed_inputs`` and ``show_progress_bar`` are
    peft's arguments: each process here decomposes its own batches (warned under torch.distributed) and no bar is
    drawn."""
    if gather_distributed_inputs and torch.distributed.is_available() and torch.distributed.is_initialized():
        warnings.warn(
            "get_eva_state_dict does not gather activations across processes (peft does): each process computes EVA "
            "from its own batches. Run it on one process and broadcast the adapter, or feed every process the same "
            "batches.",
            stacklevel=2,
        )
    is_peft = hasattr(model, "peft_config") and hasattr(model, "disable_adapter")
    config = peft_config or (model.peft_config[adapter_name] if is_peft else None)
    if config is None:
        raise ConfigError("get_eva_state_dict needs peft_config=LoraConfig(...) when model is not a PeftModel.")
    if len(dataloader) == 0:
        raise ConfigError("get_eva_state_dict got an empty dataloader; EVA needs a few batches of real inputs.")
    names = _targets(model, config, is_peft)
    context = model.disable_adapter() if is_peft else contextlib.nullcontext()
    training = model.training
    model.eval()
    try:
        with context:
            return _run(model, dataloader, config, names, forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn)
    finally:
        model.train(training)


def _model_input(inputs: Any, config: LoraConfig, fn: Callable | None) -> Any:
    return fn(inputs, config) if fn is not None else inputs


def _run(model, dataloader, config, names, forward_fn, model_fn, layer_fns) -> dict[str, torch.Tensor]:
    eva = config.eva_config or EvaConfig()
    rho = eva.rho if eva.rho <= 1000 else min(eva.rho, max(max(p.shape) for p in model.parameters()) // config.r)
    ranks = {n: config.rank_for(n) for n in names}
    max_components = {n: round(r * rho) for n, r in ranks.items()}
    budget = sum(ranks.values())
    # one batch to find layers with equal inputs (q, k, v): those share the first one's SVD
    first = next(iter(dataloader))
    hooks = _register(model, names, lambda n: _Hook(n, _prepare(layer_fns, n)))
    for hook in hooks.values():
        hook.model_input = _model_input(first, config, model_fn)
    try:
        forward_fn(model, first)
    finally:
        for hook in hooks.values():
            hook.handle.remove()
    owner_of = {}
    for name in names:
        owner_of[name] = next(o for o in names if hooks[o].digest == hooks[name].digest)
    for name in names:
        max_components[name] = max(max_components[o] for o in names if owner_of[o] == owner_of[name])
    owners = [n for n in names if owner_of[n] == n]
    make = lambda n: _Hook(n, _prepare(layer_fns, n), max_components[n], eva.tau)  # noqa: E731
    hooks = _register(model, owners, make)
    try:
        ranks = _iterate(model, dataloader, config, hooks, owner_of, budget, max_components, forward_fn, model_fn)
    finally:
        for hook in hooks.values():
            if hook.handle is not None:
                hook.handle.remove()
    return _components(hooks, owner_of, ranks, eva)


def _iterate(model, dataloader, config, hooks, owner_of, budget, max_components, forward_fn, model_fn) -> dict:
    """Batches until every layer's first (assigned-rank) components have converged; ranks redistributed each step."""
    rank_dist = dict(max_components)
    for step, inputs in enumerate(itertools.cycle(dataloader)):
        _check_fed(hooks, step, len(dataloader))
        model_input = _model_input(inputs, config, model_fn)
        for name, hook in hooks.items():
            done = bool(hook.converged[: rank_dist[name]].all())
            if done and hook.handle is not None:
                hook.handle.remove()
                hook.handle = None
                continue
            if not done and hook.handle is None:
                hook.handle = model.get_submodule(name).register_forward_hook(hook)
            hook.model_input = model_input
        if all(h.handle is None for h in hooks.values()):
            break
        forward_fn(model, inputs)
        if all(h.pca.components is not None for h in hooks.values()):
            rank_dist = _rank_distribution(hooks, owner_of, budget, max_components)
    return rank_dist


def _check_fed(hooks: dict[str, _Hook], step: int, batches: int) -> None:
    """After a whole pass over the batches, every layer must have had enough tokens once (else it never could)."""
    starved = [n for n, h in hooks.items() if h.pca.components is None] if step > batches else []
    if starved:
        raise ConfigError(
            f"EVA: layers {starved[:3]} never received more tokens in one batch than the components they compute "
            f"(round(r * rho) = {hooks[starved[0]].pca.n_components}); use larger batches or a smaller r / rho."
        )


def _components(hooks: dict[str, _Hook], owner_of: dict, rank_dist: dict, eva: EvaConfig) -> dict[str, torch.Tensor]:
    """A = the first ``rank`` components of each layer's (or its input twin's) SVD, whitened if asked."""
    out = {}
    for name, rank in rank_dist.items():
        pca = hooks[owner_of[name]].pca
        a = pca.components[:rank]
        if eva.whiten:
            a = a / pca.singular_values[:rank].sqrt()[:, None]
        out[name] = a.float()
    return out


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable | None = None,
    eva_state_dict: dict[str, torch.Tensor] | None = None,
    forward_fn: Callable | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: Callable | Mapping | None = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Set the A of every LoRA Linear of adapter ``adapter_name`` (created with ``init_lora_weights="eva"``) from the
    activations of ``dataloader`` (or a ready ``eva_state_dict``), with the redistributed ranks; B stays 0. The
    adapter's config then records the ranks (rank_pattern), the adjusted alphas (alpha_pattern) and the layers kept
    (target_modules), so save_pretrained writes a checkpoint peft and peftkit load as it is."""
    if not hasattr(model, "peft_config") or adapter_name not in model.peft_config:
        raise ConfigError(
            f"initialize_lora_eva_weights needs a PeftModel with adapter {adapter_name!r}; build it with "
            "get_peft_model(model, LoraConfig(init_lora_weights='eva', ...)) first."
        )
    config = model.peft_config[adapter_name]
    if getattr(config, "init_lora_weights", None) != "eva":
        raise ConfigError(
            f"initialize_lora_eva_weights works on adapters made with init_lora_weights='eva'; {adapter_name!r} has "
            f"init_lora_weights={getattr(config, 'init_lora_weights', None)!r}. Recreate it with 'eva'."
        )
    if len(model.active_adapters) > 1:
        raise ConfigError(
            f"initialize_lora_eva_weights runs with one active adapter (as in peft); active: {model.active_adapters}. "
            f"Call set_adapter({adapter_name!r}) first."
        )
    if eva_state_dict is None:
        if dataloader is None:
            raise ConfigError("initialize_lora_eva_weights needs a dataloader (or a ready eva_state_dict).")
        eva_state_dict = get_eva_state_dict(
            model, dataloader, None, forward_fn, prepare_model_inputs_fn, prepare_layer_inputs_fn, adapter_name
        )
    model.peft_config[adapter_name] = _load(model, dict(eva_state_dict), adapter_name, config)
    return model


def _load(model: nn.Module, eva_state_dict: dict, adapter_name: str, config: LoraConfig) -> LoraConfig:
    """Copy each layer's A in (re-creating the adapter there at its new rank, or removing it at rank 0); the
    config restated for what is now in the model."""
    eva = config.eva_config or EvaConfig()
    kept, missing, rank_pattern, alpha_pattern = [], [], {}, {}
    for path, layer in adapter_layers(model):
        if type(layer) is not LoraLinear or adapter_name not in layer.r:
            continue
        name = re.sub(r"^base_model\.model\.", "", path)
        r, alpha = config.rank_for(name), config.alpha_for(name)
        a = eva_state_dict.pop(path, None)
        if a is None:
            missing.append(name)
            new_r = r
        else:
            new_r = a.shape[0]
            if new_r != r and eva.adjust_scaling_factors:
                alpha = alpha * new_r / r
            if new_r == 0:
                _drop(model, path, layer, adapter_name)
                continue
            if new_r != r:
                _recreate(
                    layer,
                    adapter_name,
                    config.replace(r=new_r, lora_alpha=alpha, rank_pattern={}, alpha_pattern={}),
                    name,
                )
            layer.lora_A[adapter_name].weight.copy_(a)
        kept.append(name)
        if new_r != config.r:
            rank_pattern[name] = new_r
        if alpha != config.lora_alpha:
            alpha_pattern[name] = alpha
    if missing:
        warnings.warn(
            f"EVA found no activations for {missing}; their A keeps the Kaiming-uniform start (B = 0).", stacklevel=3
        )
    return config.replace(target_modules=kept, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def _recreate(layer: LoraLinear, adapter_name: str, config: LoraConfig, name: str) -> None:
    active = list(layer.active_adapters)
    layer.delete_adapter(adapter_name)
    layer.update_layer(adapter_name, config, name)
    layer.set_adapter(active)


def _drop(model: nn.Module, path: str, layer: LoraLinear, adapter_name: str) -> None:
    """Rank 0: the adapter leaves this layer (the wrapper too, when it held no other adapter)."""
    layer.delete_adapter(adapter_name)
    if not layer.adapter_names:
        replace_module(model, path, layer.base_layer)
