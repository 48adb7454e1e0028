"""Layer freezing against a hand-built reference: the base model with W + ΔW written into the chosen blocks."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from models import batch, build, clone, output, perturb, tiny_unet
from peftkit import BASE, LayerFreezeConfig, LoraConfig, PeftModel, get_peft_model
from peftkit.errors import ConfigError, RoutingError, TargetNotFoundError
from peftkit.methods.freeze import FreezeLayer, find_block_lists, logical

TOL = 1e-5


def deltas(pm, name: str = "default") -> dict[str, dict[str, torch.Tensor]]:
    """logical module name -> {tensor name: ΔW}"""
    return {
        logical(n): {k: v.detach() for k, v in m.freeze_delta[name].items()}
        for n, m in pm.model.named_modules()
        if isinstance(m, FreezeLayer) and name in m.freeze_delta
    }


def reference(base: nn.Module, moved: dict[str, dict[str, torch.Tensor]]) -> nn.Module:
    """A plain copy of the base model with W + ΔW written into each trained tensor."""
    ref = clone(base)
    with torch.no_grad():
        for name, tensors in moved.items():
            for key, delta in tensors.items():
                getattr(ref.get_submodule(name), key).add_(delta)
    return ref


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("bert", ["bert.encoder.layer"]),
        ("llama", ["model.layers"]),
        ("gpt2", ["transformer.h"]),
        ("t5", ["encoder.block", "decoder.block"]),
    ],
)
def test_block_lists_found_by_structure(kind, expected):
    assert find_block_lists(build(kind)) == expected


def test_unet_blocks_and_plain_sequential():
    assert find_block_lists(tiny_unet()) == ["down_blocks", "up_blocks"]
    stack = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])
    assert find_block_lists(nn.Sequential(nn.Linear(4, 4), stack)) == ["1"]
    with pytest.raises(TargetNotFoundError, match="layers_pattern"):
        find_block_lists(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))


def test_last_block_trains_and_reports_its_list(caplog):
    model = build("bert")
    n_block = sum(p.numel() for p in model.bert.encoder.layer[1].parameters())
    n_head = sum(p.numel() for p in model.classifier.parameters())
    with caplog.at_level(logging.INFO, logger="peftkit"):
        pm = get_peft_model(model, LayerFreezeConfig(trainable_layers=1, task_type="SEQ_CLS"))
    assert "bert.encoder.layer" in caplog.text
    assert pm.peft_config["default"].block_lists == ["bert.encoder.layer"]
    assert all(n.startswith("bert.encoder.layer.1.") for n in deltas(pm))
    assert pm.get_nb_trainable_parameters()[0] == n_block + n_head  # one delta per trained tensor, nothing more
    first = get_peft_model(build("bert"), LayerFreezeConfig(trainable_layers=-1))
    assert {n.split(".")[3] for n in deltas(first)} == {"0"}
    both = get_peft_model(build("bert"), LayerFreezeConfig(layer_indices=[0, -1], trainable_modules=["embeddings"]))
    assert {n.split(".")[1] for n in deltas(both)} == {"encoder", "embeddings"}


def test_t5_choice_applies_to_encoder_and_decoder():
    pm = get_peft_model(build("t5"), LayerFreezeConfig(trainable_layers=1, task_type="SEQ_2_SEQ_LM"))
    assert {".".join(n.split(".")[:3]) for n in deltas(pm)} == {"encoder.block.1", "decoder.block.1"}


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2", "t5"])
def test_output_is_base_with_w_plus_delta(kind):
    base = build(kind)
    modules = {"bert": ["embeddings"], "llama": ["norm"], "gpt2": ["ln_f", "wpe"], "t5": ["final_layer_norm"]}[kind]
    pm = get_peft_model(clone(base), LayerFreezeConfig(trainable_layers=1, trainable_modules=modules)).eval()
    perturb(pm, "default", scale=0.05)
    ref = reference(base, deltas(pm)).eval()
    inputs = batch(kind)
    torch.testing.assert_close(output(pm, inputs), output(ref, inputs), atol=TOL, rtol=0)


def test_unet_last_down_and_up_block():
    base = tiny_unet()
    pm = get_peft_model(clone(base), LayerFreezeConfig(trainable_layers=1)).eval()
    assert {n.split(".")[0] + "." + n.split(".")[1] for n in deltas(pm)} == {"down_blocks.1", "up_blocks.1"}
    perturb(pm, "default", scale=0.05)
    ref = reference(base, deltas(pm))
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 7]), torch.randn(2, 3, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(pm(x, t, ctx).sample, ref(x, t, ctx).sample, atol=TOL, rtol=0)


def test_tied_target_warns():
    with pytest.warns(UserWarning, match=r"'shared' shares its weight with 'encoder.embed_tokens'"):
        get_peft_model(build("t5"), LayerFreezeConfig(trainable_modules=["shared"]))


def test_gradients_equal_full_fine_tuning_of_the_block():
    base = build("llama")
    pm = get_peft_model(clone(base), LayerFreezeConfig(trainable_layers=1, trainable_modules=["norm"]))
    inputs = {**batch("llama"), "labels": batch("llama")["input_ids"]}
    pm(**inputs).loss.backward()
    full = clone(base)
    full(**inputs).loss.backward()
    layer = pm.model.model.layers[1].mlp.down_proj
    torch.testing.assert_close(
        layer.freeze_delta["default"]["weight"].grad, full.model.layers[1].mlp.down_proj.weight.grad
    )
    torch.testing.assert_close(pm.model.model.norm.freeze_delta["default"]["weight"].grad, full.model.norm.weight.grad)
    assert all(p.grad is None for n, p in pm.named_parameters() if "freeze_delta" not in n)


def test_checkpoint_holds_only_the_deltas(tmp_path):
    pm = get_peft_model(build("bert"), LayerFreezeConfig(trainable_layers=1, task_type="SEQ_CLS"))
    perturb(pm, "default")
    pm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    trained = {f"base_model.model.{n}.freeze_delta.{k}" for n, ts in deltas(pm).items() for k in ts}
    head = {k for k in saved if ".classifier.modules_to_save." not in k and "classifier" in k}
    assert set(saved) - head == trained | {k for k in saved if "classifier" in k} - head
    assert {k for k in saved if "classifier" not in k} == trained
    loaded = PeftModel.from_pretrained(build("bert"), tmp_path).eval()
    assert loaded.peft_config["default"].trainable_layers == 1


def test_merge_writes_w_plus_delta_and_unload_restores_the_original():
    base = build("llama")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    pm = get_peft_model(base, LayerFreezeConfig(layer_indices=[0])).eval()
    perturb(pm, "default")
    d = pm.model.model.layers[0].self_attn.q_proj.freeze_delta["default"]["weight"].detach().clone()
    pm.merge_adapter()
    merged_q = pm.model.model.layers[0].self_attn.q_proj.get_base_layer().weight
    torch.testing.assert_close(merged_q, original["model.layers.0.self_attn.q_proj.weight"] + d)
    pm.unmerge_adapter()
    plain = pm.unload()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0)
    assert not any(isinstance(m, FreezeLayer) for m in plain.modules())


def test_second_adapter_beside_lora_and_per_row_routing():
    pm = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"])).eval()
    pm.add_adapter("frz", LayerFreezeConfig(trainable_layers=1))
    perturb(pm, "default", seed=1)
    perturb(pm, "frz", seed=2)
    q = pm.model.model.layers[1].self_attn.q_proj
    assert isinstance(q, FreezeLayer) and type(q.base_layer).__name__ == "LoraLinear"
    inputs = batch("llama")
    names = ["frz", "default", BASE, "frz"]
    mixed = output(pm, inputs, adapter_names=names)
    for name in ("frz", "default"):
        pm.set_adapter(name)
        alone = output(pm, inputs)
        rows = [i for i, n in enumerate(names) if n == name]
        torch.testing.assert_close(mixed[rows], alone[rows], atol=TOL, rtol=0)
    pm.set_adapter(["default", "frz"])  # both at once: LoRA inside, W + ΔW on its base weight
    both = output(pm, inputs)
    assert not torch.allclose(both, output(pm, inputs, adapter_names=["frz"] * 4), atol=1e-4)


def test_t5_relative_position_bias_refuses_mixed_rows():
    pm = get_peft_model(build("t5"), LayerFreezeConfig(trainable_layers=-1)).eval()
    pm.add_adapter("b", LayerFreezeConfig(trainable_layers=-1))
    perturb(pm, "default")
    perturb(pm, "b", seed=3)
    inputs = batch("t5")
    same = output(pm, inputs, adapter_names=["b"] * 4)
    pm.set_adapter("b")
    torch.testing.assert_close(same, output(pm, inputs), atol=TOL, rtol=0)
    with pytest.raises(RoutingError, match="Embedding"):
        output(pm, inputs, adapter_names=["default", "b", "b", "b"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trainable_layers": 0}, "trainable_layers=0"),
        ({"trainable_layers": 1, "layer_indices": [0]}, "give only one"),
        ({"trainable_modules": "["}, "not a valid regex"),
        ({"layer_indices": []}, "non-empty list"),
        ({"trainable_modules": []}, "non-empty list"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LayerFreezeConfig(**kwargs)


def test_default_trains_the_last_two_blocks():
    assert LayerFreezeConfig().trainable_layers == 2
    assert LayerFreezeConfig(trainable_modules=["norm"]).trainable_layers is None  # a choice given: no default
    assert LayerFreezeConfig(layer_indices=[0]).trainable_layers is None


def test_bad_targets_leave_the_model_untouched():
    model = build("bert")
    before = [n for n, _ in model.named_modules()]
    for config, message in [
        (LayerFreezeConfig(trainable_layers=3), r"has 2 blocks; use a value between -2 and 2"),
        (LayerFreezeConfig(layer_indices=[5]), r"\[5\] out of range .*\(valid: 0..1"),
        (LayerFreezeConfig(trainable_layers=1, layers_pattern="blocks"), "'bert.encoder.layer'"),
        (LayerFreezeConfig(trainable_modules=["nope"]), "Candidates: .*'embeddings.word_embeddings'"),
    ]:
        with pytest.raises(TargetNotFoundError, match=message):
            get_peft_model(model, config)
        assert [n for n, _ in model.named_modules()] == before
