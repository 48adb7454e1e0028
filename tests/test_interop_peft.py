"""LoRA checkpoints move both ways between peftkit and Hugging Face peft 0.21: same outputs (1e-5), same files.

Each case builds the same tiny model twice from a seed, trains nothing, and gives the adapter random values
(init_lora_weights=False plus a perturbed head copy) so that a wrong key, rank, scaling or transpose shows.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from models import batch, build, minilm_folder, needs_minilm
from peftkit import errors as peftkit_errors

peft = pytest.importorskip("peft")

TOL = 1e-5

# name -> (model kind, LoRA config kwargs shared by both libraries)
CASES: dict[str, tuple[str, dict]] = {
    "bert-seq-cls": (
        "bert",
        dict(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", modules_to_save=["classifier"]),
    ),
    "bert-patterns-rslora-embedding": (
        "bert",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["query", "key", "word_embeddings"],
            task_type="SEQ_CLS",
            rank_pattern={"key": 2, "word_embeddings": 3},
            alpha_pattern={"query": 3},
            use_rslora=True,
        ),
    ),
    "llama-gqa": (
        "llama",
        dict(
            r=4,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"],
            task_type="CAUSAL_LM",
            rank_pattern={"k_proj": 2, "layers.1.self_attn.v_proj": 6},
            alpha_pattern={"o_proj": 5},
        ),
    ),
    "gpt2-conv1d": (
        "gpt2",
        dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "wte"], task_type="CAUSAL_LM", use_rslora=True),
    ),
}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def randomise_heads(model: torch.nn.Module, seed: int) -> None:
    """Move trainable head copies away from the base head (LoRA factors are random via init_lora_weights=False)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, without the full copies of a targeted embedding's base weight that peft adds
    (save_embedding_layers="auto" when 'embed_tokens' / 'lm_head' is targeted); peftkit saves only the adapter
    and reads those copies back (see test_peft_checkpoint_loads_in_peftkit)."""
    tensors = file_tensors(folder)
    copies = {k for k in tensors if k.endswith(".base_layer.weight")}
    assert all(k.endswith("embed_tokens.base_layer.weight") for k in copies), copies
    return {k: v for k, v in tensors.items() if k not in copies}


def peft_model(base, config: dict, seed: int = 0):
    torch.manual_seed(seed)
    pm = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **config))
    randomise_heads(pm, seed)
    return pm.eval()


def our_model(base, config: dict, seed: int = 0):
    torch.manual_seed(seed)
    pm = peftkit.get_peft_model(base, peftkit.LoraConfig(init_lora_weights=False, **config))
    randomise_heads(pm, seed)
    return pm.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_peft_checkpoint_loads_in_peftkit(case, tmp_path):
    kind, config = CASES[case]
    reference = build(kind)
    inputs = batch(kind)
    theirs = peft_model(copy.deepcopy(reference), config)
    expected = logits(theirs, inputs)
    assert (expected - logits(reference, inputs)).abs().max() > 1e-3  # the adapter does something
    theirs.save_pretrained(tmp_path)

    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    torch.testing.assert_close(logits(ours, inputs), expected, atol=TOL, rtol=0)
    if kind == "gpt2":  # wte is tied to lm_head: merging into it would change both, so peftkit refuses
        with pytest.raises(peftkit_errors.MergeError, match="tied"):
            ours.merge_and_unload()
        torch.testing.assert_close(logits(ours, inputs), expected, atol=TOL, rtol=0)  # nothing half-merged
        return
    merged = ours.merge_and_unload()
    torch.testing.assert_close(logits(merged, inputs), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_peftkit_checkpoint_loads_in_peft(case, tmp_path):
    kind, config = CASES[case]
    reference = build(kind)
    inputs = batch(kind)
    ours = our_model(copy.deepcopy(reference), config, seed=5)
    expected = logits(ours, inputs)
    assert (expected - logits(reference, inputs)).abs().max() > 1e-3
    ours.save_pretrained(tmp_path)

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, inputs), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_file_keys_and_shapes_equal_peft(case, tmp_path):
    kind, config = CASES[case]
    reference = build(kind)
    peft_model(copy.deepcopy(reference), config).save_pretrained(tmp_path / "peft")
    our_model(copy.deepcopy(reference), config).save_pretrained(tmp_path / "ours")
    theirs, mine = adapter_tensors(tmp_path / "peft"), file_tensors(tmp_path / "ours")
    assert sorted(mine) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert {k: v.dtype for k, v in mine.items()} == {k: v.dtype for k, v in theirs.items()}
    our_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "task_type"):
        assert our_config[key] == peft_config[key], key
    assert sorted(our_config["target_modules"]) == sorted(peft_config["target_modules"])


def test_non_default_adapter_in_sub_folder_both_ways(tmp_path):
    _, config = CASES["llama-gqa"]
    other = dict(config, r=2, lora_alpha=4, rank_pattern={}, alpha_pattern={})
    reference = build("llama")
    inputs = batch("llama")

    theirs = peft_model(copy.deepcopy(reference), config)
    torch.manual_seed(9)
    theirs.add_adapter("task_b", peft.LoraConfig(init_lora_weights=False, **other))
    theirs.set_adapter("task_b")
    expected_b = logits(theirs, inputs)
    theirs.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "task_b" / "adapter_model.safetensors").is_file()

    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "peft").eval()
    ours.load_adapter(tmp_path / "peft" / "task_b", adapter_name="task_b")
    ours.set_adapter("task_b")
    torch.testing.assert_close(logits(ours, inputs), expected_b, atol=TOL, rtol=0)

    ours.save_pretrained(tmp_path / "ours")
    assert sorted(file_tensors(tmp_path / "ours" / "task_b")) == sorted(adapter_tensors(tmp_path / "peft" / "task_b"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "ours").eval()
    back.load_adapter(str(tmp_path / "ours" / "task_b"), adapter_name="task_b")
    back.set_adapter("task_b")
    torch.testing.assert_close(logits(back, inputs), expected_b, atol=TOL, rtol=0)


# ---- the real MiniLM -------------------------------------------------------------------------------------------
@needs_minilm
def test_real_minilm_both_ways(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    reference = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = dict(tokenizer(["LoRA adapters move between libraries.", "a second, longer sentence here"],
                            padding=True, return_tensors="pt"))  # fmt: skip
    config = dict(r=8, lora_alpha=16, target_modules=["query", "value", "dense"], rank_pattern={"value": 4},
                  task_type="FEATURE_EXTRACTION")  # fmt: skip

    def hidden(model):
        with torch.no_grad():
            return model(**inputs).last_hidden_state

    theirs = peft_model(copy.deepcopy(reference), config)
    expected = hidden(theirs)
    assert (expected - hidden(reference)).abs().max() > 1e-3
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "peft").eval()
    torch.testing.assert_close(hidden(ours), expected, atol=TOL, rtol=0)

    mine = our_model(copy.deepcopy(reference), config, seed=2)
    expected = hidden(mine)
    mine.save_pretrained(tmp_path / "ours")
    assert sorted(file_tensors(tmp_path / "ours")) == sorted(file_tensors(tmp_path / "peft"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "ours").eval()
    torch.testing.assert_close(hidden(back), expected, atol=TOL, rtol=0)


def test_peft_embedding_base_copy_is_loaded(tmp_path):
    """peft saves a targeted embed_tokens' full base weight and loads it back (e.g. after resizing the
    vocabulary); peftkit does the same, so a checkpoint whose embedding differs from the model's still matches."""
    _, config = CASES["llama-gqa"]
    reference = build("llama")
    inputs = batch("llama")
    theirs = peft_model(copy.deepcopy(reference), config)
    with torch.no_grad():
        theirs.get_base_model().model.embed_tokens.base_layer.weight[1:50].mul_(1.5)  # a trained / resized table
    expected = logits(theirs, inputs)
    theirs.save_pretrained(tmp_path)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in file_tensors(tmp_path)
    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    torch.testing.assert_close(logits(ours, inputs), expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases_both_ways(bias, tmp_path):
    """bias="all" / "lora_only": the trained base biases travel with the adapter, in both directions."""
    config = dict(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS", bias=bias)
    reference = build("bert")
    inputs = batch("bert")

    def train_biases(model, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and name.endswith("bias"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)

    theirs = peft_model(copy.deepcopy(reference), config)
    train_biases(theirs, 1)
    expected = logits(theirs, inputs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftkit.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(ours, inputs), expected, atol=TOL, rtol=0)

    mine = our_model(copy.deepcopy(reference), config, seed=4)
    train_biases(mine, 2)
    expected = logits(mine, inputs)
    mine.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, inputs), expected, atol=TOL, rtol=0)
    # the same keys, less peft's duplicates of the head copy ('classifier.modules_to_save.bias') and of the
    # frozen original ('classifier.original_module.bias'), which it writes when bias="all"
    peft_keys = {
        k for k in file_tensors(tmp_path / "peft") if ".modules_to_save." not in k and ".original_module." not in k
    }
    assert set(file_tensors(tmp_path / "ours")) == peft_keys


class ConvNet(torch.nn.Module):
    """A plain torch model with an Embedding (padding_idx), a Conv1d and a strided, padded Conv2d."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 6, padding_idx=0)
        self.conv1 = torch.nn.Conv1d(6, 5, 3, padding=1)
        self.conv = torch.nn.Conv2d(5, 4, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.emb(ids).transpose(1, 2))  # (B, 5, T)
        h = self.conv(h[:, :, None, :].expand(-1, -1, 4, -1))  # (B, 4, 2, T/2)
        return self.head(h.mean((2, 3)))  # (B, 3)


def test_embedding_and_convolutions_both_ways(tmp_path):
    config = dict(r=2, lora_alpha=4, target_modules=["emb", "conv1", "conv"], rank_pattern={"conv1": 3})
    ids = torch.tensor([[0, 3, 5, 7, 1, 2, 0, 9], [4, 4, 0, 0, 19, 8, 6, 1]])
    theirs = peft_model(ConvNet(), config, seed=1)
    expected = theirs(ids).detach()
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftkit.PeftModel.from_pretrained(ConvNet(), tmp_path / "peft").eval()
    torch.testing.assert_close(ours(ids), expected, atol=TOL, rtol=0)

    mine = our_model(ConvNet(), config, seed=2)
    expected = mine(ids).detach()
    mine.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(ConvNet(), tmp_path / "ours").eval()
    torch.testing.assert_close(back(ids), expected, atol=TOL, rtol=0)
    shapes = {k: tuple(v.shape) for k, v in file_tensors(tmp_path / "ours").items()}
    assert shapes == {k: tuple(v.shape) for k, v in file_tensors(tmp_path / "peft").items()}
    assert shapes["base_model.model.conv.lora_B.weight"] == (4, 2, 1, 1)
