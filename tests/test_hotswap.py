"""Hot-swapping LoRA adapters in place: equal to a fresh load, padded ranks, no recompilation under torch.compile."""

from __future__ import annotations

import pytest
import torch

from models import batch, clone, output, perturb, tiny_llama
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.core.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from peftkit.errors import CheckpointError, ConfigError

TARGETS = ["q_proj", "v_proj", "embed_tokens"]  # Linear and Embedding layers


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Three checkpoints for one tiny Llama: r=4 (alpha 8), another r=4 (alpha 4), r=8 with rsLoRA."""
    base = tiny_llama()
    root = tmp_path_factory.mktemp("swap")
    configs = {
        "a": LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS),
        "b": LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS),
        "c": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=TARGETS),
    }
    for seed, (name, config) in enumerate(configs.items()):
        pm = get_peft_model(clone(base), config)
        perturb(pm, "default", seed=seed)
        pm.save_pretrained(root / name)
    return base, root


def fresh(base, path):
    return output(PeftModel.from_pretrained(clone(base), path).eval(), batch("llama"))


def test_hotswap_equals_a_fresh_load_and_keeps_the_modules(saved):
    base, root = saved
    pm = PeftModel.from_pretrained(clone(base), root / "a").eval()
    modules = {name: id(m) for name, m in pm.named_modules()}
    params = {name: id(p) for name, p in pm.named_parameters()}
    hotswap_adapter(pm, root / "b", "default")
    torch.testing.assert_close(output(pm, batch("llama")), fresh(base, root / "b"), atol=1e-6, rtol=0)
    assert {name: id(m) for name, m in pm.named_modules()} == modules, "hot-swap must not re-inject"
    assert {name: id(p) for name, p in pm.named_parameters()} == params
    assert pm.peft_config["default"].lora_alpha == 4 or pm.peft_config["default"].alpha_pattern


def test_higher_rank_needs_padding_first(saved):
    base, root = saved
    pm = PeftModel.from_pretrained(clone(base), root / "a").eval()
    before = output(pm, batch("llama"))
    with pytest.raises(CheckpointError, match="target_rank=8"):
        hotswap_adapter(pm, root / "c", "default")
    torch.testing.assert_close(output(pm, batch("llama")), before, atol=0, rtol=0)  # nothing half-written


def test_padded_swaps_of_any_rank_and_save_after(saved, tmp_path):
    base, root = saved
    pm = PeftModel.from_pretrained(clone(base), root / "a").eval()
    before = output(pm, batch("llama"))
    prepare_model_for_compiled_hotswap(pm, target_rank=8)
    torch.testing.assert_close(output(pm, batch("llama")), before, atol=1e-6, rtol=0)  # zero padding changes nothing
    for name in ("c", "b", "a"):
        hotswap_adapter(pm, root / name, "default")
        torch.testing.assert_close(output(pm, batch("llama")), fresh(base, root / name), atol=1e-6, rtol=0)
    hotswap_adapter(pm, root / "c", "default")
    pm.save_pretrained(tmp_path)  # padded tensors and a config that describes them
    torch.testing.assert_close(fresh(base, tmp_path), fresh(base, root / "c"), atol=1e-6, rtol=0)


def test_no_recompilation_after_a_swap(saved):
    from torch._dynamo.utils import counters

    base, root = saved
    pm = PeftModel.from_pretrained(clone(base), root / "a").eval()
    prepare_model_for_compiled_hotswap(pm, target_rank=8)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(pm, backend="eager")
    inputs = batch("llama")
    with torch.no_grad():
        compiled(**inputs)
        graphs = counters["stats"]["unique_graphs"]
        assert graphs >= 1
        for name in ("c", "b"):
            hotswap_adapter(pm, root / name, "default")
            torch.testing.assert_close(compiled(**inputs).logits, fresh(base, root / name), atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == graphs, "a swap recompiled the model"
    torch._dynamo.reset()


def test_bad_checkpoints_are_refused(saved, tmp_path):
    base, root = saved
    pm = PeftModel.from_pretrained(clone(base), root / "a").eval()
    other = get_peft_model(clone(base), LoraConfig(r=4, target_modules=["k_proj"]))
    other.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="same modules"):
        hotswap_adapter(pm, tmp_path, "default")
    with pytest.raises(CheckpointError, match="not a folder"):
        hotswap_adapter(pm, tmp_path / "nope", "default")
    with pytest.raises(ConfigError, match="target_rank=2 is below"):
        prepare_model_for_compiled_hotswap(pm, target_rank=2)
