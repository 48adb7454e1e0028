"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Every attention layer l attends to P trainable key/value vectors in front of the real ones (section 4):

    head = softmax(q [K_l^prefix ; K]^T / sqrt(d)) [V_l^prefix ; V]        K_l^prefix, V_l^prefix: (H_kv, P, d)

The prefix acts exactly like P earlier tokens held in the KV cache: the real tokens' positions start at P.
Section 4.3 trains the prefix through a reparameterisation, an MLP over a smaller table
(``prefix_projection``: embedding (P, token_dim) -> Linear -> tanh -> Linear -> (P, sites * 2 * token_dim));
the checkpoint keeps the MLP so training can resume, and :func:`eject` folds it into the flat prefix.

How it attaches: a :class:`PrefixTable` wraps the word embeddings and holds each adapter's prefix (flat, in
peft's ``prompt_embeddings`` layout (P, sites * 2 * H_kv * d), layer l's keys at 2l and values at 2l + 1);
the table puts a forward pre-hook on each attention module (every layer of BERT / Llama / GPT-2; T5's encoder,
decoder self- and cross-attention; the modules stay in place, so LoRA can still target their projections),
which hands it a stand-in KV cache that puts this call's prefix in front of the keys and values, so the
model's own cache never stores it. ``prepare_inputs`` computes the prefix once per call and shifts
``position_ids`` by P. Grouped-query attention: the prefix has the model's H_kv heads.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.config import PeftConfig
from peftkit.core.inject import Injection, add_modules_to_save
from peftkit.core.layer import AdapterLayer
from peftkit.core.method import AdapterHost, Call, Method, Training
from peftkit.errors import ConfigError, TargetNotFoundError
from peftkit.integrations import hf_inputs as hf


@dataclass(kw_only=True)
class PrefixTuningConfig(PeftConfig):
    """Prefix tuning's settings, with Hugging Face peft's names; model-derived fields are filled on attach."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    foreign_defaults: ClassVar[dict[str, Any]] = {"init_weights": None}

    num_virtual_tokens: int = field(default=20, metadata={"help": "Prefix length P (virtual tokens per layer)."})
    prefix_projection: bool = field(
        default=False, metadata={"help": "Train the prefix through an MLP (section 4.3); eject() removes it."}
    )
    encoder_hidden_size: int | None = field(
        default=None, metadata={"help": "Hidden size of the projection MLP (default: token_dim)."}
    )
    token_dim: int | None = field(
        default=None, metadata={"help": "Key/value size per token, H_kv * head_dim (filled from the model)."}
    )
    num_attention_heads: int | None = field(
        default=None, metadata={"help": "Key/value heads H_kv (filled from the model; fewer than query heads in GQA)."}
    )
    num_layers: int | None = field(default=None, metadata={"help": "Transformer layers (filled from the model)."})
    num_transformer_submodules: int | None = field(
        default=None, metadata={"help": "1, or 2 for encoder-decoders (peft's field; informational)."}
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            problems.append(f"num_virtual_tokens={n!r} must be a positive integer (typical: 10 to 200).")
        for name in ("encoder_hidden_size", "token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                problems.append(f"{name}={value!r} must be a positive integer or None (filled from the model).")
        return problems


# ---- the prefix table -----------------------------------------------------------------------------------------
class PrefixEncoder(nn.Module):
    """Section 4.3's reparameterisation: P_theta = MLP(P'_theta), embedding (P, token_dim) -> (P, out)."""

    def __init__(self, num_tokens: int, token_dim: int, hidden: int, out: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, token_dim)
        self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)  # (P, out)


class PrefixTable(AdapterLayer):
    """Wraps the word embeddings (its forward is theirs) and holds every prefix adapter's parameters."""

    adapter_param_names = ("prompt_embeddings", "prefix_encoder")
    adapter_other_names = ("shapes",)
    root_state_keys = ("prompt_embeddings",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prompt_embeddings = nn.ParameterDict()  # flat prefix (P, sites * 2 * H * d)
        self.prefix_encoder = nn.ModuleDict()  # or its MLP (prefix_projection)
        self.shapes: dict[str, tuple[int, int, int, int]] = {}  # (P, sites, H, d)
        self.sites: list[nn.Module] = []  # the hooked attention modules (a plain list: not submodules)

    def attach(self, sites: list[nn.Module]) -> None:
        """Hook the attention modules (once, for every prefix adapter of this table)."""
        if not self.sites:
            self.sites = sites
            for site in sites:
                site.register_forward_pre_hook(_add_prefix, with_kwargs=True)

    def detach(self) -> None:
        """Remove the hooks. Found by identity in the module's hook dict rather than through handles, which
        would still point at the original modules in a deep copy of the model."""
        for site in self.sites:
            for key in [k for k, hook in site._forward_pre_hooks.items() if hook is _add_prefix]:
                del site._forward_pre_hooks[key]
                site._forward_pre_hooks_with_kwargs.pop(key, None)
            site.__dict__.pop(PENDING, None)
        self.sites = []

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if not self.shapes:
            self.detach()

    def unload(self, merge: bool) -> nn.Module:
        self.detach()
        return self.base_layer

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    @property
    def adapter_names(self) -> list[str]:
        return list(self.shapes)

    def update_layer(self, adapter_name: str, config: PrefixTuningConfig, module_name: str) -> None:
        """Parameters are made by :meth:`create`, which also needs the number of attention sites."""

    def create(self, adapter_name: str, config: PrefixTuningConfig, sites: int) -> None:
        heads = config.num_attention_heads
        shape = (config.num_virtual_tokens, sites, heads, config.token_dim // heads)
        out = sites * 2 * config.token_dim
        device = self.get_base_layer().weight.device
        if config.prefix_projection:
            hidden = config.encoder_hidden_size or config.token_dim
            encoder = PrefixEncoder(config.num_virtual_tokens, config.token_dim, hidden, out)
            self.prefix_encoder[adapter_name] = encoder.to(device)
        else:
            self.prompt_embeddings[adapter_name] = nn.Parameter(
                torch.randn(config.num_virtual_tokens, out, device=device)
            )
        self.shapes[adapter_name] = shape

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs)

    def flat(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.prefix_encoder:
            return self.prefix_encoder[adapter_name]()
        return self.prompt_embeddings[adapter_name]

    def prefix(self, adapter_name: str) -> torch.Tensor:
        """(sites, 2, H, P, d): per site, keys then values."""
        tokens, sites, heads, dim = self.shapes[adapter_name]
        flat = self.flat(adapter_name)  # (P, sites * 2 * H * d)
        return flat.view(tokens, sites * 2, heads, dim).permute(1, 2, 0, 3).reshape(sites, 2, heads, tokens, dim)

    def prefixes(self, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This call's prefixes (b, sites, 2, H, P_max, d), b = 1 or ``batch``, left-padded; lengths (b,)."""
        groups, rows = hf.row_groups(self, batch)
        if not any(groups):
            return None
        some = self.prefix(next(n for group in groups for n in group))
        pieces = [
            torch.cat([self.prefix(n) for n in group], dim=3)
            if group
            else some[..., :0, :].new_zeros(some[..., :0, :].shape)
            for group in groups
        ]
        table, lengths = hf.left_pad(pieces, dim=3)
        return (table, lengths) if rows is None else (table[rows], lengths[rows])


# ---- the attention hook --------------------------------------------------------------------------------------
class PrefixCache:
    """Stands in for the model's KV cache inside one attention call: real keys and values go to (and come
    from) the real cache, and the prefix goes in front; ``get_seq_length`` counts the prefix as past tokens
    (T5 computes its relative position bias from it)."""

    def __init__(self, real: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.real, self.keys, self.values = real, keys, values
        self.is_updated: dict[int, bool] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple:
        if self.real is not None:
            key, value = self.real.update(key, value, layer_idx, *args, **kwargs)
        keys = torch.cat([self.keys.to(key.dtype), key], dim=2)  # (B, H, P + S, d)
        return keys, torch.cat([self.values.to(value.dtype), value], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys.shape[2] + (self.real.get_seq_length(layer_idx) if self.real is not None else 0)


PENDING = "peftkit_prefix"  # attribute on a hooked attention module: this call's (keys, values, valid)


def _add_prefix(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook on an attention module: swap its cache for a PrefixCache and widen its mask."""
    pending = module.__dict__.get(PENDING)
    if pending is None:
        return None
    hidden = args[0] if args else kwargs["hidden_states"]
    batch, length = hidden.shape[:2]
    keys, values, valid = (hf.for_rows(t, batch) for t in pending)  # (B, H, P, d) x2, (B, P)
    source = kwargs.get("key_value_states")
    source = kwargs.get("encoder_hidden_states") if source is None else source
    cache = kwargs.pop("cache", None)
    cache = kwargs.pop("past_key_values", None) if cache is None else cache
    real = None if source is not None or cache is None else getattr(cache, "self_attention_cache", cache)
    past = real.get_seq_length(getattr(module, "layer_idx", 0) or 0) if real is not None else 0
    params = inspect.signature(module.forward).parameters
    kwargs["cache" if "cache" in params else "past_key_values"] = PrefixCache(real, keys, values)
    mask_arg = "attention_mask" if "attention_mask" in params else "mask"
    keys_len = source.shape[1] if source is not None else past + length
    causal = source is None and kwargs.get("is_causal", getattr(module, "is_causal", False))
    kwargs[mask_arg] = extend_mask(kwargs.get(mask_arg), valid, length, keys_len, bool(causal), hidden.dtype)
    return args, kwargs


def extend_mask(
    mask: Any, valid: torch.Tensor, length: int, keys_len: int, causal: bool, dtype: torch.dtype
) -> torch.Tensor:
    """The attention mask with the prefix's columns in front, (B, h, T, P + S): a row sees its own prefix.

    ``mask`` is the model's (boolean: True = attend, or additive float) or None, meaning full attention, or
    causal attention when the module is causal (sdpa's ``is_causal`` shortcut, which no longer applies).
    """
    batch, longest = valid.shape
    front = valid[:, None, None, :]  # (B, 1, 1, P)
    if mask is None:
        if causal:
            last_key = torch.arange(length, device=valid.device) + (keys_len - length)  # (T,)
            allowed = torch.arange(keys_len, device=valid.device)[None, :] <= last_key[:, None]  # (T, S)
        else:
            allowed = torch.ones(length, keys_len, dtype=torch.bool, device=valid.device)
        full = torch.cat([front.expand(batch, 1, length, longest), allowed.expand(batch, 1, length, keys_len)], -1)
        return torch.zeros(full.shape, dtype=dtype, device=valid.device).masked_fill(~full, torch.finfo(dtype).min)
    if not isinstance(mask, torch.Tensor):
        raise ConfigError(
            f"Prefix tuning cannot extend an attention mask of type {type(mask).__name__} (flex attention); load "
            "the model with attn_implementation='sdpa' or 'eager'."
        )
    heads, queries = mask.shape[1], mask.shape[2]
    mask = mask.expand(batch, heads, queries, mask.shape[-1])
    front = front.expand(batch, heads, queries, longest)
    if mask.dtype != torch.bool:
        zeros = torch.zeros(front.shape, dtype=mask.dtype, device=mask.device)
        front = zeros.masked_fill(~front, torch.finfo(mask.dtype).min)
    return torch.cat([front, mask], dim=-1)


# ---- attaching ------------------------------------------------------------------------------------------------
def attention_sites(model: nn.Module) -> list[nn.Module]:
    """Innermost attention modules that take a KV cache argument (one per self- or cross-attention)."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if type(module).__name__.endswith("Attention")
        and {"cache", "past_key_values"} & set(inspect.signature(module.forward).parameters)
    ]
    return [m for n, m in found if not any(other.startswith(f"{n}.") for other, _ in found)]


def fill_from_model(config: PrefixTuningConfig, model: nn.Module) -> None:
    """peft's model-derived fields; with grouped-query attention token_dim = H_kv * head_dim."""
    cfg = hf.model_config(model)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or cfg.hidden_size // heads
    for name, value in (("token_dim", kv_heads * head_dim), ("num_attention_heads", kv_heads)):
        if getattr(config, name) not in (None, value):
            raise ConfigError(
                f"{name}={getattr(config, name)} does not fit this model's attention (key/value heads {kv_heads}, "
                f"head_dim {head_dim}): use {name}={value} or leave it None."
            )
        setattr(config, name, value)
    if config.num_layers is None:
        config.num_layers = cfg.num_hidden_layers
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if hf.is_encoder_decoder(model) else 1
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim


def check_model(model: nn.Module, sites: list[nn.Module]) -> None:
    """Refuse, before anything changes, a model whose attention cannot take a prefix: no attention module that
    takes a KV cache (a plain MLP, ``nn.MultiheadAttention``), or flex attention (its block masks are built
    for the real keys only and cannot be widened)."""
    if not sites:
        others = [
            f"{name!r} ({type(module).__name__})"
            for name, module in model.named_modules()
            if type(module).__name__.endswith("Attention")
        ]
        found = f"; found {', '.join(others[:4])}, whose forward takes no KV cache" if others else ""
        raise TargetNotFoundError(
            f"Prefix tuning found no attention module in {type(model).__name__} (a module named '*Attention' "
            f"whose forward takes a `past_key_values` or `cache` argument){found}. It supports transformers models "
            "such as BERT, Llama, GPT-2 and T5; for other models use prompt tuning, LoRA or a bottleneck adapter."
        )
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation == "flex_attention":
        raise ConfigError(
            f"Prefix tuning cannot widen flex attention's block masks (attn_implementation={implementation!r}); "
            "load the model with attn_implementation='sdpa' or 'eager', or call "
            "model.set_attn_implementation('sdpa') before get_peft_model."
        )


def inject(model: nn.Module, config: PrefixTuningConfig, adapter_name: str) -> None:
    sites = attention_sites(model)
    check_model(model, sites)
    fill_from_model(config, model)
    name = hf.input_embedding_name(model)
    with Injection(model, adapter_name) as inj:
        table = inj.wrap(name, PrefixTable, config)
        table.create(adapter_name, config, len(sites))
        add_modules_to_save(model, config, inj)
    table.attach(sites)


def prepare_inputs(model: nn.Module, call: Call) -> None:
    """Hand each attention site its slice of the live prefixes and shift the positions by P."""
    table = next((m for m in model.modules() if isinstance(m, PrefixTable)), None)
    if table is None:
        return
    call.args, kwargs = hf.first_input(call.args, call.kwargs)
    source = kwargs.get("input_ids") if kwargs.get("inputs_embeds") is None else kwargs["inputs_embeds"]
    found = table.prefixes(source.shape[0]) if isinstance(source, torch.Tensor) else None
    for site in table.sites:
        site.__dict__.pop(PENDING, None)
    if found is None:
        return
    prefixes, lengths = found  # (b, sites, 2, H, P, d), (b,)
    valid = hf.valid_columns(lengths, prefixes.shape[4])  # (b, P)
    for i, site in enumerate(table.sites):
        site.__dict__[PENDING] = (prefixes[:, i, 0], prefixes[:, i, 1], valid)
    if not (model.training and torch.is_grad_enabled()):  # training keeps it for activation-checkpoint replays
        call.cleanup.callback(lambda: [site.__dict__.pop(PENDING, None) for site in table.sites])
    if not hf.is_encoder_decoder(model) and hf.accepts(model, "position_ids"):
        kwargs["position_ids"] = (
            _positions(kwargs, source, call.for_generate) + hf.for_rows(lengths, len(source))[:, None]
        )


def _positions(kwargs: dict, source: torch.Tensor, for_generate: bool) -> torch.Tensor:
    """The positions the model would use without a prefix: given ones, generate's (from the attention mask)
    or the forward default (after the cached tokens)."""
    if kwargs.get("position_ids") is not None:
        return kwargs["position_ids"]
    mask = kwargs.get("attention_mask")
    if for_generate and mask is not None:
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    past = hf.cache_length(kwargs)
    return torch.arange(past, past + source.shape[1], device=source.device)[None]


def eject(peft_model: AdapterHost, adapter_name: str = "default") -> None:
    """Fold a ``prefix_projection`` adapter's MLP into its flat prefix (peft's file layout; inference as before)."""
    config = peft_model.peft_config[adapter_name]
    table = next((m for m in peft_model.modules() if isinstance(m, PrefixTable) and adapter_name in m.shapes), None)
    if table is None or adapter_name not in table.prefix_encoder:
        raise ConfigError(f"Adapter {adapter_name!r} has no prefix projection to eject (prefix_projection=False).")
    with torch.no_grad():
        flat = table.prefix_encoder[adapter_name]().detach().clone()
    del table.prefix_encoder[adapter_name]
    table.prompt_embeddings[adapter_name] = nn.Parameter(flat)
    config.prefix_projection = False
    peft_model.set_adapter(peft_model.active_adapters)  # re-applies which parameters train


METHOD = Method(
    name="prefix_tuning",
    config_class=PrefixTuningConfig,
    inject=inject,
    can_merge=False,
    merge_hint="a prefix adds key/value vectors to every attention layer, there is no weight to fold it into.",
    prepare_inputs=prepare_inputs,
    training=Training(learning_rate=3e-2),
)
