"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

The frozen model reads P trainable "soft prompt" vectors before the input's token embeddings (section 2):

    h = f([E_prompt ; E(x)])          E_prompt: (P, d), E(x): (T, d), f: the frozen model

Only E_prompt trains. The prompt is initialised at random, from sampled vocabulary embeddings, or from the
embeddings of a text (section 3.2: class-label / vocabulary initialisation beats random at small scale).

How it attaches: a :class:`PromptEmbedding` wraps the word-embedding module and holds one prompt table per
adapter (its forward is the embedding's own); ``prepare_inputs`` prepends the live prompt to the inputs of every
forward / generate, extends ``attention_mask`` and ``token_type_ids``, sets ``labels`` to -100 on the prompt, and
returns logits for the real tokens only. Encoder-decoders get the prompt on the encoder input. The file layout
is peft's: one tensor ``prompt_embeddings`` of shape (P * num_transformer_submodules, d).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.core.config import PeftConfig
from peftkit.core.inject import Injection, add_modules_to_save
from peftkit.core.layer import AdapterLayer
from peftkit.core.method import Call, Method, Training
from peftkit.errors import ConfigError, choices
from peftkit.integrations import hf_inputs as hf

INIT_CHOICES = ("RANDOM", "SAMPLE_VOCAB", "TEXT")


@dataclass(kw_only=True)
class PromptTuningConfig(PeftConfig):
    """Prompt tuning's settings, with Hugging Face peft's names; model-derived fields are filled on attach."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    num_virtual_tokens: int = field(default=20, metadata={"help": "Number of soft prompt vectors P."})
    prompt_tuning_init: str = field(
        default="RANDOM",
        metadata={"help": "'RANDOM' (N(0, 1)), 'SAMPLE_VOCAB' (random rows of the embedding table) or 'TEXT'."},
    )
    prompt_tuning_init_text: str | None = field(
        default=None, metadata={"help": "Text whose token embeddings initialise the prompt ('TEXT' init)."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Local tokenizer folder used to tokenise prompt_tuning_init_text."}
    )
    tokenizer_kwargs: dict | None = field(
        default=None, metadata={"help": "Extra arguments for AutoTokenizer.from_pretrained ('TEXT' init only)."}
    )
    token_dim: int | None = field(default=None, metadata={"help": "Embedding size d (filled from the model)."})
    num_transformer_submodules: int | None = field(
        default=None, metadata={"help": "1, or 2 for encoder-decoders (peft's layout; the encoder uses the first P)."}
    )
    num_attention_heads: int | None = field(default=None, metadata={"help": "Filled from the model (peft's field)."})
    num_layers: int | None = field(default=None, metadata={"help": "Filled from the model (peft's field)."})

    def __post_init__(self) -> None:
        if isinstance(self.prompt_tuning_init, str):
            self.prompt_tuning_init = self.prompt_tuning_init.upper()
        super().__post_init__()

    def problems(self) -> list[str]:
        problems = super().problems()
        n = self.num_virtual_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            problems.append(f"num_virtual_tokens={n!r} must be a positive integer (typical: 8 to 100).")
        if self.prompt_tuning_init not in INIT_CHOICES:
            problems.append(f"prompt_tuning_init={self.prompt_tuning_init!r} is not one of {choices(INIT_CHOICES)}.")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            problems.append(
                "prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path "
                f"(got {self.prompt_tuning_init_text!r} and {self.tokenizer_name_or_path!r})."
            )
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            problems.append("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'; remove it.")
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                problems.append(f"{name}={value!r} must be a positive integer or None (filled from the model).")
        return problems


class PromptEmbedding(AdapterLayer):
    """Wraps the word embeddings and holds each adapter's soft prompt, (P * submodules, d); the encoder (or the
    decoder-only model) reads the first P rows."""

    adapter_param_names = ("prompt_embeddings",)
    adapter_other_names = ("num_virtual_tokens",)
    root_state_keys = ("prompt_embeddings",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.prompt_embeddings = nn.ParameterDict()
        self.num_virtual_tokens: dict[str, int] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.get_base_layer().weight

    def update_layer(self, adapter_name: str, config: PromptTuningConfig, module_name: str) -> None:
        weight = self.get_base_layer().weight  # (vocab, d)
        rows = config.num_virtual_tokens * config.num_transformer_submodules
        with torch.no_grad():
            if config.prompt_tuning_init == "SAMPLE_VOCAB":
                init = weight[torch.randint(0, weight.shape[0], (rows,), device=weight.device)].clone()
            elif config.prompt_tuning_init == "TEXT":
                init = weight[_text_ids(config, rows).to(weight.device)].clone()
            else:
                init = torch.randn(rows, weight.shape[1], device=weight.device)
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.prompt_embeddings[adapter_name] = nn.Parameter(init.to(dtype))
        self.num_virtual_tokens[adapter_name] = config.num_virtual_tokens

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.base_layer(x, *args, **kwargs)  # the prompt is prepended by prepare_inputs

    def prompts(self, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This call's prompts, (b, P_max, d) with b = 1 or ``batch``, left-padded, and their lengths (b,)."""
        groups, rows = hf.row_groups(self, batch)
        if not any(groups):
            return None
        weight = next(iter(self.prompt_embeddings.values()))
        pieces = [
            torch.cat([self.prompt_embeddings[n][: self.num_virtual_tokens[n]] for n in group])
            if group
            else weight.new_zeros(0, weight.shape[1])
            for group in groups
        ]
        table, lengths = hf.left_pad(pieces, dim=0)  # (groups, P_max, d), (groups,)
        return (table, lengths) if rows is None else (table[rows], lengths[rows])


def _text_ids(config: PromptTuningConfig, rows: int) -> torch.Tensor:
    """Token ids of the init text, repeated to fill ``rows`` (section 3.2). A text longer than P is refused
    rather than cut: the cut-off words would silently be missing from the prompt."""
    from transformers import AutoTokenizer

    text, tokens = config.prompt_tuning_init_text, config.num_virtual_tokens
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **(config.tokenizer_kwargs or {}))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"prompt_tuning_init_text={text!r} tokenises to nothing; give a non-empty text.")
    if len(ids) > tokens:
        raise ConfigError(
            f"prompt_tuning_init_text={text!r} is {len(ids)} tokens long but num_virtual_tokens={tokens}: "
            f"set num_virtual_tokens to at least {len(ids)} or shorten the text to {tokens} tokens or fewer."
        )
    return torch.tensor((ids * (rows // len(ids) + 1))[:rows])


# ---- attaching ----------------------------------------------------------------------------------------------
def fill_from_model(config: PromptTuningConfig, model: nn.Module) -> None:
    """peft's model-derived fields: embedding size, layers, heads, and 2 submodules for encoder-decoders."""
    model_cfg = hf.model_config(model)
    dim = model.get_input_embeddings().weight.shape[1]
    if config.token_dim not in (None, dim):
        raise ConfigError(f"token_dim={config.token_dim} but the model's word embeddings have size {dim}; use {dim}.")
    config.token_dim = dim
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    if config.num_layers is None:
        config.num_layers = getattr(model_cfg, "num_hidden_layers", None)
    if config.num_attention_heads is None:
        config.num_attention_heads = getattr(model_cfg, "num_attention_heads", None)


def inject(model: nn.Module, config: PromptTuningConfig, adapter_name: str) -> None:
    name = hf.input_embedding_name(model)
    fill_from_model(config, model)
    with Injection(model, adapter_name) as inj:
        inj.wrap(name, PromptEmbedding, config)
        add_modules_to_save(model, config, inj)


def prepare_inputs(model: nn.Module, call: Call) -> None:
    """Prepend the live prompts to this call's inputs (see the module docstring)."""
    layer = next((m for m in model.modules() if isinstance(m, PromptEmbedding)), None)
    if layer is None:
        return
    call.args, kwargs = hf.first_input(call.args, call.kwargs)
    source = kwargs.get("input_ids") if kwargs.get("inputs_embeds") is None else kwargs["inputs_embeds"]
    if not isinstance(source, torch.Tensor):
        return
    found = layer.prompts(source.shape[0])
    if found is None:
        return
    prompts, lengths = (hf.for_rows(t, source.shape[0]) for t in found)  # (B, P, d), (B,)
    encoder_decoder = hf.is_encoder_decoder(model)
    if kwargs.get("encoder_outputs") is not None or (not encoder_decoder and hf.cache_length(kwargs) > 0):
        _extend_mask_only(model, kwargs, lengths, prompts.shape[1])  # a later decoding step: prompt already seen
    elif call.for_generate and not encoder_decoder and kwargs.get("inputs_embeds") is None:
        _generate_with_prompt(model, call, prompts, lengths)
    else:
        _prepend(model, call, prompts, lengths, encoder_decoder)


def _prompt_mask(lengths: torch.Tensor, longest: int, like: torch.Tensor | None, batch: int) -> torch.Tensor:
    valid = hf.valid_columns(lengths, longest)
    return valid.to(like.dtype) if like is not None else valid.long()


def _extend_mask_only(model: nn.Module, kwargs: dict, lengths: torch.Tensor, longest: int) -> None:
    """A call that continues from a cache (or from encoder_outputs) that already holds the prompt: the user's
    attention_mask covers the real tokens only, so the prompt's columns go in front of it."""
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids") if kwargs.get("inputs_embeds") is None else kwargs["inputs_embeds"]
    encoder_outputs = kwargs.get("encoder_outputs")
    past = hf.cache_length(kwargs)
    seen = encoder_outputs[0].shape[1] if encoder_outputs is not None else past + ids.shape[1]
    if mask is not None and mask.shape[1] + longest == seen:
        kwargs["attention_mask"] = torch.cat([_prompt_mask(lengths, longest, mask, len(mask)), mask], dim=1)
    pad = longest - lengths
    missing = encoder_outputs is None and kwargs.get("position_ids") is None
    if missing and bool(pad.any()) and hf.accepts(model, "position_ids"):  # as alone: its own prompt before it
        kwargs["position_ids"] = torch.arange(past, past + ids.shape[1], device=ids.device)[None] - pad[:, None]


def _prepend(model: nn.Module, call: Call, prompts: torch.Tensor, lengths: torch.Tensor, enc_dec: bool) -> None:
    """[prompt ; input] in inputs_embeds, with the mask, token types, labels and positions to match.

    Rows whose prompt is shorter than the longest: a causal model gets them left-padded (positions shifted so
    each row counts from 0, as alone); a bidirectional one (BERT pools its first token, T5's encoder) gets each
    row packed to the left, [prompt_r ; input ; padding], so the row reads exactly as it would alone.
    """
    kwargs = call.kwargs
    embeds = kwargs.pop("inputs_embeds", None)
    ids = kwargs.pop("input_ids", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)  # (B, T, d), through any other adapter on the embeddings
    batch, length = embeds.shape[:2]
    longest = prompts.shape[1]
    pad = longest - lengths  # (B,) prompt padding of each row
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
    parts = {
        "inputs_embeds": torch.cat([prompts.to(embeds.dtype), embeds], dim=1),  # (B, P + T, d)
        "attention_mask": torch.cat([_prompt_mask(lengths, longest, mask, batch), mask], dim=1),
    }
    if kwargs.get("token_type_ids") is not None:
        types = kwargs["token_type_ids"]
        parts["token_type_ids"] = torch.cat([types.new_zeros(batch, longest), types], dim=1)
    labels = kwargs.get("labels")
    if not enc_dec and labels is not None and labels.dim() >= 2 and labels.shape[1] == length:
        parts["labels"] = torch.cat([labels.new_full((batch, longest), -100), labels], dim=1)
    positions = kwargs.get("position_ids")
    if positions is not None and not enc_dec:  # the prompt takes positions 0..P-1; the inputs move up by P
        prompt_positions = (torch.arange(longest, device=pad.device)[None] - pad[:, None]).clamp(min=0)
        parts["position_ids"] = torch.cat([prompt_positions, positions + lengths[:, None]], dim=1)
    packed = bool(pad.any()) and (enc_dec or not _is_causal(model))
    if packed:
        parts = {k: _roll_left(v, pad) for k, v in parts.items()}
    elif bool(pad.any()) and positions is None and hf.accepts(model, "position_ids"):
        parts["position_ids"] = (torch.arange(longest + length, device=pad.device)[None] - pad[:, None]).clamp(min=0)
    kwargs.update(parts)
    if not enc_dec and not call.for_generate:
        first = lengths if packed else torch.full_like(lengths, longest)
        call.outputs.append(lambda out: _drop_prompt_positions(out, first, length))


def _is_causal(model: nn.Module) -> bool:
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def _roll_left(tensor: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row i moved ``shift[i]`` places to the left along dim 1 (what falls off the front goes to the end)."""
    length = tensor.shape[1]
    index = (torch.arange(length, device=tensor.device)[None] + shift[:, None]) % length  # (B, L)
    return tensor.gather(1, index.view(*index.shape, *[1] * (tensor.dim() - 2)).expand_as(tensor))


def _take_inputs(tensor: torch.Tensor, first: torch.Tensor, length: int) -> torch.Tensor:
    """Columns first[i] .. first[i] + length of each row i: the real tokens' outputs."""
    index = torch.arange(length, device=tensor.device)[None] + first[:, None].to(tensor.device)  # (B, T)
    return tensor.gather(1, index.view(*index.shape, *[1] * (tensor.dim() - 2)).expand(-1, -1, *tensor.shape[2:]))


def _generate_with_prompt(model: nn.Module, call: Call, prompts: torch.Tensor, lengths: torch.Tensor) -> None:
    """Decoder-only generate: placeholder ids stand for the prompt, so generate counts positions and the mask
    over P + T tokens; a hook swaps in the prompt vectors whenever the model reads the sequence from its start
    (the first step, or every step without a KV cache). The placeholders are cut from the output."""
    kwargs = call.kwargs
    ids = kwargs["input_ids"]
    batch, longest = ids.shape[0], prompts.shape[1]
    placeholder = getattr(model.config, "pad_token_id", None) or 0
    kwargs["input_ids"] = torch.cat([ids.new_full((batch, longest), placeholder), ids], dim=1)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    kwargs["attention_mask"] = torch.cat([_prompt_mask(lengths, longest, mask, batch), mask], dim=1)

    def swap_in_prompt(_module: nn.Module, args: tuple, hook_kwargs: dict) -> tuple[tuple, dict] | None:
        args, hook_kwargs = hf.first_input(args, hook_kwargs)
        step_ids = hook_kwargs.get("input_ids")
        if step_ids is None or hf.cache_length(hook_kwargs) > 0 or step_ids.shape[1] < longest:
            return None
        embeds = model.get_input_embeddings()(step_ids)  # (b, L, d), b = batch * beams
        rows = hf.for_rows(prompts, embeds.shape[0]).to(embeds.dtype)
        hook_kwargs["inputs_embeds"] = torch.cat([rows, embeds[:, longest:]], dim=1)
        hook_kwargs["input_ids"] = None
        return args, hook_kwargs

    handle = model.register_forward_pre_hook(swap_in_prompt, with_kwargs=True)
    call.cleanup.callback(handle.remove)
    call.outputs.append(lambda out: _drop_placeholders(out, longest))


def _drop_prompt_positions(out: Any, first: torch.Tensor, length: int) -> Any:
    """Keep the outputs of the real tokens: logits and hidden states of columns first[i] .. first[i] + T."""
    total = None
    for key in ("logits", "last_hidden_state"):
        value = out.get(key) if hasattr(out, "get") else None
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] > length:
            total = value.shape[1]
            out[key] = _take_inputs(value, first, length)
    hidden = out.get("hidden_states") if hasattr(out, "get") else None
    if isinstance(hidden, tuple) and total is not None:
        out["hidden_states"] = tuple(_take_inputs(h, first, length) if h.shape[1] == total else h for h in hidden)
    return out


def _drop_placeholders(out: Any, longest: int) -> Any:
    """generate() output without the P placeholder ids in front."""
    if isinstance(out, torch.Tensor):
        return out[:, longest:]
    if getattr(out, "sequences", None) is not None:
        out["sequences"] = out.sequences[:, longest:]
    return out


METHOD = Method(
    name="prompt_tuning",
    config_class=PromptTuningConfig,
    inject=inject,
    can_merge=False,
    merge_hint="a soft prompt adds input vectors, there is no weight to fold it into.",
    prepare_inputs=prepare_inputs,
    training=Training(learning_rate=3e-2),
)
