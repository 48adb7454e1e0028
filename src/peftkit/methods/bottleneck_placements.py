"""Where bottleneck adapters go: per ``model_type``, the attention and feed-forward output projections (an adapter
after each) and the blocks whose input a parallel adapter reads (He et al. 2022, section 3, eq. 9).

Adapters attach by name, never by copying model code: ``PLACEMENTS`` gives regexes over full module names; the
config's ``*_modules`` fields give them for any other nn.Module, and ``target_modules`` puts one adapter after each
named module instead. Used by methods/bottleneck.py (and so by Compacter, which shares its placement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from peftkit.core.targeting import find_targets, is_conv1d_gpt2, model_type
from peftkit.errors import ConfigError, choices

if TYPE_CHECKING:
    from peftkit.methods.bottleneck import BottleneckConfig

SUPPORTED = "Linear, GPT-2 Conv1D, or any module with in_features / out_features"


@dataclass(frozen=True)
class Placement:
    """Regexes over full module names: the attention and feed-forward output projections (where adapters go)
    and the attention and feed-forward blocks (whose input a parallel adapter reads)."""

    attention_output: str
    ffn_output: str
    attention: str
    ffn: str


_BERT = Placement(
    r".*\.layer\.\d+\.attention\.output\.dense",
    r".*\.layer\.\d+\.output\.dense",
    r".*\.layer\.\d+\.attention",
    r".*\.layer\.\d+\.intermediate",
)
_LLAMA = Placement(
    r".*\.layers\.\d+\.self_attn\.o_proj", r".*\.layers\.\d+\.mlp\.down_proj", r".*\.layers\.\d+\.self_attn",
    r".*\.layers\.\d+\.mlp",
)  # fmt: skip
_CLIP = Placement(
    r".*\.layers\.\d+\.self_attn\.out_proj", r".*\.layers\.\d+\.mlp\.fc2", r".*\.layers\.\d+\.self_attn",
    r".*\.layers\.\d+\.mlp",
)  # fmt: skip
PLACEMENTS: dict[str, Placement] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], _BERT),
    "gpt2": Placement(r".*\.h\.\d+\.attn\.c_proj", r".*\.h\.\d+\.mlp\.c_proj", r".*\.h\.\d+\.attn", r".*\.h\.\d+\.mlp"),
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3"], _LLAMA),
    **dict.fromkeys(["t5", "mt5"], Placement(
        r".*\.layer\.\d+\.(SelfAttention|EncDecAttention)\.o", r".*\.layer\.\d+\.DenseReluDense\.wo",
        r".*\.layer\.\d+\.(SelfAttention|EncDecAttention)", r".*\.layer\.\d+\.DenseReluDense",
    )),
    "whisper": Placement(
        r".*\.layers\.\d+\.(self_attn|encoder_attn)\.out_proj", r".*\.layers\.\d+\.fc2",
        r".*\.layers\.\d+\.(self_attn|encoder_attn)", r".*\.layers\.\d+\.fc1",
    ),
    **dict.fromkeys(["clip", "clip_text_model", "clip_vision_model"], _CLIP),
}  # fmt: skip


def features(module: nn.Module) -> tuple[int, int] | None:
    """(input width, output width) of a Linear-like module, else None."""
    if is_conv1d_gpt2(module):
        return module.weight.shape[0], module.weight.shape[1]
    d_in, d_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return (d_in, d_out) if isinstance(d_in, int) and isinstance(d_out, int) else None


def _placement(model: nn.Module, config: BottleneckConfig, field_name: str, attr: str) -> list[str] | str:
    given = getattr(config, field_name)
    if given is not None:
        return given
    kind = model_type(model)
    if kind in PLACEMENTS:
        return getattr(PLACEMENTS[kind], attr)
    raise ConfigError(
        f"{type(config).__name__} has no built-in placement for model type {kind!r} (built in: "
        f"{choices(PLACEMENTS)}). Name the modules: {field_name}=[...] (a list of names or suffixes, or a regex), "
        "or give target_modules=[...] to put one adapter after each named module."
    )


def _find(model: nn.Module, config: BottleneckConfig, spec: list[str] | str, any_module: bool) -> list[str]:
    supported = (lambda m: True) if any_module else (lambda m: features(m) is not None)
    return find_targets(model, config.replace(target_modules=spec), supported, supported_label=SUPPORTED)


def _pair(name: str, blocks: list[str], field_name: str) -> str:
    """The block beside ``name``: the one sharing the longest dotted prefix with it."""

    def shared(block: str) -> int:
        a, b = name.split("."), block.split(".")
        return next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))

    best = max(blocks, key=shared, default=None)
    if best is None or shared(best) < len(name.split(".")) - 3:
        raise ConfigError(
            f"No block of {field_name} sits beside {name!r} (found: {blocks[:4]!r}); a parallel adapter reads that "
            f"block's input. Set {field_name}=[...] to the block that feeds {name!r}."
        )
    return best


def sites(model: nn.Module, config: BottleneckConfig) -> list[tuple[str, str | None]]:
    """(module whose output gets an adapter, block whose input a parallel adapter reads, or None)."""
    if config.target_modules is not None:
        return [(name, None) for name in _find(model, config, config.target_modules, any_module=False)]
    parallel = config.setting("parallel")
    out: list[tuple[str, str | None]] = []
    for enabled, out_field, block_field in (
        (config.setting("mh_adapter"), "attention_output_modules", "attention_modules"),
        (config.setting("output_adapter"), "ffn_output_modules", "ffn_modules"),
    ):
        if not enabled:
            continue
        attr = out_field.removesuffix("_modules")
        names = _find(model, config, _placement(model, config, out_field, attr), any_module=False)
        if not parallel:
            out.extend((n, None) for n in names)
            continue
        block_spec = _placement(model, config, block_field, block_field.removesuffix("_modules"))
        blocks = _find(model, config, block_spec, any_module=True)
        out.extend((n, _pair(n, blocks, block_field)) for n in names)
    return out
