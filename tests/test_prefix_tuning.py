"""Prefix tuning checked against the same key/value prefix fed to the base model by hand as a KV cache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from models import (
    batch,
    minilm_folder,
    needs_minilm,
    needs_smollm2,
    smollm2_folder,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
)
from peftkit import BASE, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from peftkit.errors import ConfigError, MergeError, TargetNotFoundError
from peftkit.methods.prefix_tuning import PrefixTable, eject, extend_mask

TOL = 1e-5
BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert, "t5": tiny_t5}
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}


def make(kind: str, tokens: int = 3, **extra):
    base = BUILD[kind]()
    pm = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=tokens, task_type=TASK[kind], **extra))
    return pm.eval(), base


def table(pm: PeftModel) -> PrefixTable:
    return next(m for m in pm.modules() if isinstance(m, PrefixTable))


def prefix_cache(pm: PeftModel, rows: int, name: str = "default") -> DynamicCache:
    """The adapter's prefix as an ordinary KV cache: layer l holds keys 2l and values 2l + 1 of the flat table."""
    flat = table(pm).flat(name).detach()  # (P, L * 2 * H * d)
    config = pm.peft_config[name]
    heads = config.num_attention_heads
    per_layer = flat.view(flat.shape[0], -1, 2, heads, config.token_dim // heads)  # (P, L, 2, H, d)
    cache = DynamicCache(config=pm.get_base_model().config)
    for layer in range(per_layer.shape[1]):
        keys = per_layer[:, layer, 0].permute(1, 0, 2)[None].expand(rows, -1, -1, -1)  # (B, H, P, d)
        values = per_layer[:, layer, 1].permute(1, 0, 2)[None].expand(rows, -1, -1, -1)
        cache.update(keys.contiguous(), values.contiguous(), layer)
    return cache


# ---- config -------------------------------------------------------------------------------------------------------
def test_config_reports_every_problem_and_fills_gqa_sizes():
    with pytest.raises(ConfigError) as err:
        PrefixTuningConfig(num_virtual_tokens=-2, encoder_hidden_size=0)
    assert "num_virtual_tokens=-2" in str(err.value) and "encoder_hidden_size=0" in str(err.value)
    pm, _ = make("llama")
    config = pm.peft_config["default"]
    # grouped-query attention: 2 key/value heads of size 8, as peft computes it
    assert (config.token_dim, config.num_attention_heads, config.num_layers) == (16, 2, 2)
    assert pm.adapter_state_dict("default")["prompt_embeddings"].shape == (3, 2 * 2 * 16)
    with pytest.raises(ConfigError, match="token_dim=32 does not fit"):
        get_peft_model(tiny_llama(), PrefixTuningConfig(token_dim=32))


def test_every_attention_module_is_hooked_and_unload_removes_the_hooks():
    for kind, count in (("llama", 2), ("bert", 2), ("gpt2", 2), ("t5", 6)):  # T5: encoder, decoder self, cross
        pm, base = make(kind)
        sites = table(pm).sites
        assert len(sites) == count and all(type(m).__name__.endswith("Attention") for m in sites)
        assert all(len(m._forward_pre_hooks) == 1 for m in sites)
        assert pm.unload() is base
        assert all(not m._forward_pre_hooks for m in sites)


def test_a_deep_copy_unloads_without_touching_the_original():
    import copy

    pm, _ = make("llama")
    inputs = batch("llama", rows=2)
    with torch.no_grad():
        before = pm(**inputs).logits
        plain = copy.deepcopy(pm).unload()
        torch.testing.assert_close(pm(**inputs).logits, before, atol=0, rtol=0)
        assert not torch.allclose(plain(**inputs).logits, before, atol=1e-3)


# ---- models whose attention cannot take a prefix: refused, left as they were --------------------------------------
class TinyMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = tiny_llama().config  # even with a transformers config: there is no attention to hook
        self.embed = torch.nn.Embedding(100, 32)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(input_ids))


class TinyTorchTransformer(torch.nn.Module):
    """torch's own attention (nn.MultiheadAttention) takes no KV cache argument."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(100, 32)
        self.encoder = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(input_ids))


def assert_unchanged(model: torch.nn.Module, snapshot: dict, inputs: torch.Tensor, before: torch.Tensor) -> None:
    assert dict(model.named_modules()) == snapshot  # the same module objects at the same paths
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), before, atol=0, rtol=0)


@pytest.mark.parametrize("build", [TinyMLP, TinyTorchTransformer])
def test_model_without_prefix_capable_attention_is_refused_and_left_unchanged(build):
    torch.manual_seed(0)
    model = build().eval()
    snapshot, inputs = dict(model.named_modules()), torch.randint(0, 100, (2, 5))
    with torch.no_grad():
        before = model(inputs)
    with pytest.raises(TargetNotFoundError) as err:
        get_peft_model(model, PrefixTuningConfig(num_virtual_tokens=3))
    message = str(err.value)
    assert f"no attention module in {build.__name__}" in message and "past_key_values" in message
    assert "prompt tuning, LoRA" in message  # what to use instead
    if build is TinyTorchTransformer:  # names what it found and why it does not fit
        assert "'encoder.self_attn' (MultiheadAttention), whose forward takes no KV cache" in message
    assert_unchanged(model, snapshot, inputs, before)


def test_flex_attention_is_refused_at_attach_and_at_run_time():
    """Flex attention's BlockMask cannot be widened by P columns: refused before anything changes; a model
    switched to flex after attaching gets the same advice from the mask hook (the real BlockMask path costs
    seconds of mask building on CPU, so the hook's mask widening is called with a stand-in mask object)."""
    base = tiny_llama()
    base.set_attn_implementation("flex_attention")
    snapshot = dict(base.named_modules())
    with pytest.raises(ConfigError, match=r"attn_implementation='flex_attention'.*'sdpa' or 'eager'"):
        get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    assert dict(base.named_modules()) == snapshot and all(not m._forward_pre_hooks for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())

    class BlockMask:  # what transformers hands flex attention instead of a tensor
        pass

    with pytest.raises(ConfigError, match=r"mask of type BlockMask \(flex attention\).*'sdpa' or 'eager'"):
        extend_mask(BlockMask(), torch.ones(2, 3, dtype=torch.bool), 7, 7, True, torch.float32)


# ---- equals a hand-built KV cache -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoder_prefix_equals_past_key_values(kind):
    pm, base = make(kind)
    inputs = batch(kind, rows=2)
    with torch.no_grad():
        out = pm(**inputs).logits
        mask = torch.ones(2, 3 + 7, dtype=torch.long)
        expected = base(input_ids=inputs["input_ids"], attention_mask=mask, past_key_values=prefix_cache(pm, 2)).logits
    torch.testing.assert_close(out, expected, atol=TOL, rtol=0)
    with torch.no_grad(), pm.disable_adapter():
        assert not torch.allclose(pm(**inputs).logits, out, atol=1e-3)


def test_bert_encoder_prefix_equals_past_key_values():
    pm, base = make("bert")
    inputs = batch("bert", rows=2)
    with torch.no_grad():
        out = pm(**inputs).logits
        expected = base(input_ids=inputs["input_ids"], cache=prefix_cache(pm, 2)).logits
    torch.testing.assert_close(out, expected, atol=TOL, rtol=0)


def test_prefix_trains_through_the_attention():
    for kind in ("llama", "bert"):
        pm, _ = make(kind)
        pm.train()
        inputs = batch(kind, rows=2)
        labels = inputs["input_ids"] if kind == "llama" else torch.tensor([0, 2])
        pm(**inputs, labels=labels).loss.backward()
        grads = [p.grad for p in pm.parameters() if p.grad is not None]
        assert len(grads) == 1 + (kind == "bert") * 2  # the prefix (+ BERT's classifier copy)
        assert table(pm).prompt_embeddings["default"].grad.abs().sum() > 0


def test_merge_is_refused():
    pm, _ = make("llama")
    with pytest.raises(MergeError, match="key/value vectors"):
        pm.merge_adapter()


# ---- generate -----------------------------------------------------------------------------------------------------
def greedy_reference(pm: PeftModel, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by hand on the base model: prefix as past key values, the whole sequence re-read."""
    base, out = pm.get_base_model(), list(ids)
    for _ in range(steps):
        with torch.no_grad():
            mask = torch.ones(1, 3 + len(out), dtype=torch.long)
            logits = base(
                input_ids=torch.tensor([out]), attention_mask=mask, past_key_values=prefix_cache(pm, 1)
            ).logits
        out.append(int(logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_equals_hand_built_reference(use_cache):
    pm, _ = make("llama")
    ids = [5, 17, 42, 8]
    tokens = pm.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False, use_cache=use_cache)
    assert tokens[0].tolist() == greedy_reference(pm, ids, 6)


def test_generate_batched_with_left_padding_equals_each_row_alone():
    pm, _ = make("llama")
    rows = [[5, 17, 42, 8, 9], [33, 2, 71]]
    ids = torch.tensor([rows[0], [0, 0, *rows[1]]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    tokens = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for i, row in enumerate(rows):
        assert tokens[i, 5 - len(row) :].tolist() == greedy_reference(pm, row, 5)


def test_t5_generate_with_and_without_cache_equals_greedy_forward():
    pm, _ = make("t5")
    inputs = batch("t5", rows=2)
    with_cache = pm.generate(input_ids=inputs["input_ids"], max_new_tokens=5, do_sample=False)
    without = pm.generate(input_ids=inputs["input_ids"], max_new_tokens=5, do_sample=False, use_cache=False)
    assert with_cache.tolist() == without.tolist()
    decoded = with_cache[:, :1]
    for _ in range(5):
        with torch.no_grad():
            logits = pm(input_ids=inputs["input_ids"], decoder_input_ids=decoded).logits
        decoded = torch.cat([decoded, logits[:, -1:].argmax(-1)], dim=1)
    assert decoded.tolist() == with_cache.tolist()


def test_t5_prefix_reaches_encoder_decoder_and_cross_attention():
    pm, _ = make("t5")
    inputs = batch("t5", rows=2)
    flat = table(pm).prompt_embeddings["default"]  # (P, 6 sites * 2 * 32): enc 0-1, then (self, cross) per layer
    with torch.no_grad():
        full = pm(**inputs).logits
        for sites in ((0, 1), (2, 4), (3, 5)):  # encoder, decoder self-attention, cross-attention
            saved = flat.clone()
            for site in sites:
                flat[:, site * 64 : (site + 1) * 64] = 0
            assert not torch.allclose(pm(**inputs).logits, full, atol=1e-4), f"sites {sites}: prefix had no effect"
            flat.copy_(saved)


# ---- several adapters, per-row routing, projection ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "bert", "t5"])
def test_rows_with_prefixes_of_different_lengths_equal_each_row_alone(kind):
    pm, _ = make(kind, tokens=2)
    pm.add_adapter("long", PrefixTuningConfig(num_virtual_tokens=5, task_type=TASK[kind]))
    inputs = batch(kind, rows=4)
    names = ["long", "default", BASE, "long"]
    with torch.no_grad():
        mixed = pm(**inputs, adapter_names=names).logits
        for name in ("default", "long"):
            pm.set_adapter(name)
            rows = [i for i, n in enumerate(names) if n == name]
            torch.testing.assert_close(mixed[rows], pm(**inputs).logits[rows], atol=TOL, rtol=0)
        with pm.disable_adapter():
            torch.testing.assert_close(mixed[2], pm(**inputs).logits[2], atol=TOL, rtol=0)


def test_routed_generate_equals_each_row_alone():
    pm, _ = make("llama", tokens=2)
    pm.add_adapter("long", PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"))
    ids = batch("llama", rows=2, length=4)["input_ids"]
    mixed = pm.generate(input_ids=ids, max_new_tokens=4, do_sample=False, adapter_names=["long", "default"])
    for i, name in enumerate(["long", "default"]):
        pm.set_adapter(name)
        assert mixed[i].tolist() == pm.generate(input_ids=ids[i : i + 1], max_new_tokens=4, do_sample=False)[0].tolist()


def test_projection_is_saved_for_resuming_and_eject_flattens_it(tmp_path):
    pm, base = make("llama", prefix_projection=True, encoder_hidden_size=12)
    keys = set(pm.adapter_state_dict("default"))
    assert "model.embed_tokens.prefix_encoder.transform.0.weight" in keys and "prompt_embeddings" not in keys
    inputs = batch("llama", rows=2)
    with torch.no_grad():
        before = pm(**inputs).logits
    pm.save_pretrained(tmp_path / "mlp")
    resumed = PeftModel.from_pretrained(tiny_llama(), tmp_path / "mlp", is_trainable=True)
    assert any(p.requires_grad for n, p in resumed.named_parameters() if "transform" in n)
    eject(pm)
    assert set(pm.adapter_state_dict("default")) == {"prompt_embeddings"}
    assert pm.peft_config["default"].prefix_projection is False
    with torch.no_grad():
        torch.testing.assert_close(pm(**inputs).logits, before, atol=TOL, rtol=0)
        cache, mask = prefix_cache(pm, 2), torch.ones(2, 10, dtype=torch.long)
        expected = base(input_ids=inputs["input_ids"], past_key_values=cache, attention_mask=mask).logits
        torch.testing.assert_close(before, expected, atol=TOL, rtol=0)
    with pytest.raises(ConfigError, match="no prefix projection"):
        eject(pm)


def adamw_steps(pm: PeftModel, batches: list[dict]) -> list[float]:
    """One AdamW step per batch on the trainable parameters, with a fresh optimizer."""
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for inputs in batches:
        loss = pm(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_resuming_a_projection_checkpoint_trains_the_mlp_as_an_uninterrupted_run(tmp_path):
    """Train, save, reload with is_trainable=True and train on: the MLP (not a flat prefix) is what loads and
    trains, and the run equals one that never stopped (with the optimizer re-created at the save point)."""
    batches = [batch("llama", rows=2, seed=s) for s in range(4)]
    config = PrefixTuningConfig(
        num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=12, task_type="CAUSAL_LM"
    )
    torch.manual_seed(1)
    pm = get_peft_model(tiny_llama(), config).train()
    adamw_steps(pm, batches[:2])
    saved = {k: v.clone() for k, v in pm.adapter_state_dict("default").items()}
    pm.save_pretrained(tmp_path / "step2")
    with torch.no_grad():
        saved_logits = pm.eval()(**batches[0]).logits
    uninterrupted = adamw_steps(pm.train(), batches[2:])
    final = pm.adapter_state_dict("default")

    resumed = PeftModel.from_pretrained(tiny_llama(), tmp_path / "step2", is_trainable=True)
    loaded = resumed.adapter_state_dict("default")
    assert set(loaded) == set(saved) and not any("prompt_embeddings" in k for k in loaded)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key  # the trained MLP, bit for bit
    trainable = {n for n, p in resumed.named_parameters() if p.requires_grad}
    mlp = ("embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias")
    assert trainable == {f"base_model.model.model.embed_tokens.prefix_encoder.default.{k}" for k in mlp}
    with torch.no_grad():
        torch.testing.assert_close(resumed.eval()(**batches[0]).logits, saved_logits, atol=0, rtol=0)
    frozen = {n: p.clone() for n, p in resumed.named_parameters() if not p.requires_grad}
    losses = adamw_steps(resumed.train(), batches[2:])
    assert losses == pytest.approx(uninterrupted, abs=1e-6)
    for key, value in resumed.adapter_state_dict("default").items():
        torch.testing.assert_close(value, final[key], atol=1e-6, rtol=0)
        assert not torch.equal(value, saved[key]), f"{key} did not train"
    assert all(torch.equal(p, frozen[n]) for n, p in resumed.named_parameters() if not p.requires_grad)


def test_prompt_prefix_and_lora_live_on_one_model_and_switch():
    base = tiny_llama()
    configs = {
        "prompt": PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
        "prefix": PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "lora": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    }
    pm = get_peft_model(base, configs["prompt"], adapter_name="prompt").eval()
    pm.add_adapter("prefix", configs["prefix"])
    pm.add_adapter("lora", configs["lora"])
    inputs = batch("llama", rows=3)
    outs = {}
    with torch.no_grad():
        for name in configs:
            pm.set_adapter(name)
            outs[name] = pm(**inputs).logits
            alone = get_peft_model(tiny_llama(), configs[name]).eval()
            state = {k: v for k, v in pm.adapter_state_dict(name).items()}
            alone._load_state("default", state, "test")
            torch.testing.assert_close(outs[name], alone(**inputs).logits, atol=TOL, rtol=0)
        mixed = pm(**inputs, adapter_names=["lora", "prefix", "prompt"]).logits
        for i, name in enumerate(["lora", "prefix", "prompt"]):
            torch.testing.assert_close(mixed[i], outs[name][i], atol=TOL, rtol=0)
    sites = table(pm).sites
    pm.delete_adapter("prefix")
    assert not any(isinstance(m, PrefixTable) for m in pm.modules())
    assert all(not m._forward_pre_hooks for m in sites)
    with torch.no_grad():
        pm.set_adapter("lora")
        torch.testing.assert_close(pm(**inputs).logits, outs["lora"], atol=TOL, rtol=0)


# ---- real models ------------------------------------------------------------------------------------------------
@needs_minilm
def test_real_minilm_classifier_with_a_prefix():
    """peft fails on encoder-only models with transformers 5; here the prefix equals a hand-built cache."""
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=2).eval()
    pm = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=4, task_type="SEQ_CLS"))
    assert len(table(pm).sites) == 6 and pm.peft_config["default"].token_dim == 384
    inputs = {"input_ids": torch.randint(1000, 5000, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    with torch.no_grad():
        expected = base(input_ids=inputs["input_ids"], cache=prefix_cache(pm, 2)).logits
        torch.testing.assert_close(pm.eval()(**inputs).logits, expected, atol=TOL, rtol=0)
    pm.train()
    pm(**inputs, labels=torch.tensor([0, 1])).loss.backward()
    assert table(pm).prompt_embeddings["default"].grad.abs().sum() > 0


@needs_smollm2
def test_real_smollm2_generate_equals_hand_built_reference():
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32).eval()
    pm = get_peft_model(base, PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")).eval()
    config = pm.peft_config["default"]
    assert (config.num_attention_heads, config.token_dim) == (3, 192)  # SmolLM2: 9 query heads, 3 kv heads of 64
    with torch.no_grad():
        table(pm).prompt_embeddings["default"].mul_(0.3)
    ids = [1, 504, 3145, 314, 4849, 314]
    tokens = pm.generate(input_ids=torch.tensor([ids]), max_new_tokens=3, do_sample=False)
    assert tokens[0].tolist() == greedy_reference(pm, ids, 3)


def test_beam_search_with_routing_equals_each_row_alone():
    pm, _ = make("llama", tokens=2)
    pm.add_adapter("long", PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"))
    ids = batch("llama", rows=2, length=4)["input_ids"]
    settings = {"max_new_tokens": 4, "do_sample": False, "num_beams": 3}
    mixed = pm.generate(input_ids=ids, adapter_names=["long", "default"], **settings)
    for i, name in enumerate(["long", "default"]):
        pm.set_adapter(name)
        alone = pm.generate(input_ids=ids[i : i + 1], **settings)
        assert mixed[i].tolist() == alone[0].tolist()
        assert pm.generate(input_ids=ids[i : i + 1], use_cache=False, **settings).tolist() == alone.tolist()


def test_eager_attention_equals_sdpa():
    """The mask is widened in both formats: sdpa's boolean / absent mask and eager's additive one."""
    pm, base = make("llama")
    inputs = batch("llama", rows=2)
    inputs["attention_mask"][1, :2] = 0  # left padding in row 1
    with torch.no_grad():
        sdpa = pm(**inputs).logits
        base.config._attn_implementation = "eager"
        eager = pm(**inputs).logits
    torch.testing.assert_close(eager[:, 2:], sdpa[:, 2:], atol=TOL, rtol=0)
