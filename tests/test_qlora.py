"""QLoRA: LoRA / DoRA / (IA)3 over bitsandbytes 4-bit and 8-bit and torchao int8 base layers, on CPU.

The quantized models are loaded the way users load them, with transformers' BitsAndBytesConfig / TorchAoConfig from
a tiny Llama / BERT saved once per session. bitsandbytes' Linear4bit repacks its weight into a CPU inference layout
with bfloat16 scales on its first eval no-grad forward on AVX512-BF16 CPUs (a lossy, bf16-compute path); the
exactness tests switch that off (``support_avx512bf16_for_cpu = False``) so that the fp32 kernel is the reference.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch

from models import batch, tiny_bert, tiny_llama
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.core import quantized as Q
from peftkit.errors import ConfigError, MergeError
from peftkit.methods.lora.quantized import QuantizedLoraLinear


def _bnb_runs() -> str | None:
    """None when bitsandbytes quantizes and runs a 4-bit Linear here, else the reason it cannot."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'peftkit[quant]')"
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
        layer(torch.randn(2, 64))
    except Exception as exc:  # no AVX2, no CPU backend in this build...
        return f"bitsandbytes cannot run a 4-bit Linear on this CPU: {exc!r}"
    return None


BNB_REASON = _bnb_runs()
pytestmark = [
    pytest.mark.skipif(BNB_REASON is not None, reason=BNB_REASON or ""),
    pytest.mark.filterwarnings("ignore::peftkit.core.quantized.RoundingWarning"),
]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def saved(tmp_path_factory) -> dict[str, str]:
    """A tiny Llama and a tiny BERT saved as ordinary transformers folders (the unquantized reference models)."""
    root = tmp_path_factory.mktemp("qlora_bases")
    # hidden 64: bitsandbytes 0.50.2's CPU dequantize_4bit misplaces block scales when a row is shorter than a
    # 64-value block (in_features 32 gives a 4x larger error; the kernel multiplies by the same weight, so the formula
    # tests hold either way, but the merge error bound would not)
    sizes = dict(hidden_size=64, intermediate_size=128)
    tiny_llama(**sizes).save_pretrained(root / "llama")
    tiny_bert(**sizes).save_pretrained(root / "bert")
    return {"llama": str(root / "llama"), "bert": str(root / "bert")}


def exact_cpu_kernel(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


_LOADED: dict[tuple, torch.nn.Module] = {}


def load(saved: dict, kind: str = "llama", quant: str = "nf4", double: bool = False, dtype=torch.float32):
    """The saved tiny model loaded through transformers' quantization configs (each load once; a copy per call)."""
    key = (saved[kind], kind, quant, double, dtype)
    if key not in _LOADED:
        _LOADED[key] = _load(saved, kind, quant, double, dtype)
    return copy.deepcopy(_LOADED[key])


def _load(saved: dict, kind: str, quant: str | None, double: bool, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    auto = AutoModelForCausalLM if kind == "llama" else AutoModelForSequenceClassification
    if quant is None:
        return auto.from_pretrained(saved[kind]).eval()
    if quant == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        config = TorchAoConfig(Int8WeightOnlyConfig())
    elif quant == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant, bnb_4bit_use_double_quant=double, bnb_4bit_compute_dtype=dtype
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_pretrained(saved[kind], quantization_config=config, device_map="cpu")
    return exact_cpu_kernel(model.eval())


def stored(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every quantized layer's stored weight bytes and scales (copies)."""
    out = {}
    for name, module in model.named_modules():
        if Q.is_quantized(module) and not isinstance(module, QuantizedLoraLinear):
            weight = module.weight.data
            for part in ("qdata", "scale"):  # torchao: the int8 data and the scales inside the tensor subclass
                if hasattr(weight, part):
                    out[f"{name}.weight.{part}"] = getattr(weight, part).clone()
            if not hasattr(weight, "qdata"):
                out[name + ".weight"] = weight.clone()
            state = getattr(module.weight, "quant_state", None)
            if state is not None:
                out[name + ".absmax"] = state.absmax.clone()
    return out


def perturb(pm, name: str = "default", scale: float = 0.2, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in pm.adapter_state_dict(name).values():
            t.add_(torch.randn(t.shape, generator=g) * scale)


def logits(model, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **kwargs).logits.float()


# ---- the forward: LoRA over the quantized kernel equals the hand formula -------------------------------------------
@pytest.mark.parametrize(("quant", "double"), [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
def test_lora_over_linear4bit_is_dequant_plus_low_rank(saved, quant, double):
    """h = dequant(W) x + b + s B A x on every wrapped Linear4bit (fp32 compute, 1e-5)."""
    pm = get_peft_model(
        load(saved, quant=quant, double=double), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    perturb(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLoraLinear) and Q.kind(layer.base_layer) == quant
    x = torch.randn(3, 5, 64)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    w = Q.dequantize(layer.base_layer)
    expected = x @ w.T + 2.0 * (x @ a.T) @ b.T
    if layer.base_layer.bias is not None:
        expected = expected + layer.base_layer.bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quant", ["int8", "torchao-int8"])
def test_lora_over_int8_is_base_plus_low_rank(saved, quant):
    """int8 kernels quantize the input too, so the reference is the base layer's own output plus s B A x."""
    pm = get_peft_model(load(saved, quant=quant), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    perturb(pm)
    layer = pm.base_model.model.model.layers[1].self_attn.v_proj
    assert isinstance(layer, QuantizedLoraLinear)
    assert Q.kind(layer.base_layer) == {"int8": "int8", "torchao-int8": "torchao-Int8Tensor"}[quant]
    x = torch.randn(2, 4, 64)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * (x @ a.T) @ b.T, atol=1e-5, rtol=1e-5)
        dense = x @ Q.dequantize(layer.base_layer).T
        assert (layer.base_layer(x) - dense).abs().max() < 0.05  # dequantize reads the kernel's weight


def test_bf16_compute_runs_the_adapter_in_bf16(saved):
    pm = get_peft_model(load(saved, dtype=torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"]))
    perturb(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 64)
    seen = []
    layer.lora_B["default"].register_forward_hook(lambda *a: seen.append(a))  # not called: F.linear on the weights
    out = layer(x)
    assert out.dtype == torch.float32 and not seen
    a, b = layer.lora_A["default"].weight.bfloat16(), layer.lora_B["default"].weight.bfloat16()
    low = (((x.bfloat16() @ a.T) @ b.T) * 2.0).float()  # s = alpha / r = 8 / 4
    torch.testing.assert_close(out - layer.base_layer(x), low, atol=2e-2, rtol=2e-2)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # master weights stay fp32


def test_torchao_int4_needs_its_gpu_kernels():
    pytest.skip(
        "torchao 0.18's Int4WeightOnlyConfig needs the 'mslk' kernels (CUDA); it cannot quantize on this CPU. "
        "LoRA dispatches on any torchao-quantized nn.Linear, int4 included, where torchao runs it."
    )


# ---- training: only adapter tensors move, the quantized weights stay bit-identical ---------------------------------
@pytest.mark.parametrize("quant", ["nf4", "int8", "torchao-int8"])
def test_training_moves_only_the_adapter(saved, quant):
    pm = get_peft_model(load(saved, quant=quant, double=True), LoraConfig(r=4, target_modules="all-linear"))
    before_stored = stored(pm)
    quantized = {n + ".weight" for n, m in pm.named_modules() if Q.is_quantized(m)}
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if n not in quantized}
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    inputs = batch("llama")
    for _ in range(3):
        loss = pm(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    moved = {n for n, p in pm.named_parameters() if n in before and not torch.equal(p.detach(), before[n])}
    assert moved and moved <= trainable
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)
    after_stored = stored(pm)
    assert before_stored.keys() == after_stored.keys() and len(before_stored) >= 14
    assert all(torch.equal(before_stored[k], after_stored[k]) for k in before_stored)
    assert all(p.grad is None for n, p in pm.named_parameters() if n not in trainable)


# ---- files: save / load, and peft both ways over the same quantized base ------------------------------------------
def test_save_load_round_trip(saved, tmp_path):
    pm = get_peft_model(load(saved), LoraConfig(r=4, target_modules="all-linear"))
    perturb(pm)
    inputs = batch("llama")
    expected = logits(pm, inputs)
    pm.save_pretrained(tmp_path)
    again = PeftModel.from_pretrained(load(saved), tmp_path)
    torch.testing.assert_close(logits(again, inputs), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("use_dora", [False, True])
def test_peft_loads_peftkit_adapter_over_the_same_bnb_base(saved, tmp_path, use_dora):
    import peft

    pm = get_peft_model(load(saved, double=True), LoraConfig(r=4, target_modules="all-linear", use_dora=use_dora))
    perturb(pm)
    pm.save_pretrained(tmp_path)
    inputs = batch("llama")
    theirs = peft.PeftModel.from_pretrained(load(saved, double=True), tmp_path)
    torch.testing.assert_close(logits(pm, inputs), logits(theirs, inputs), atol=1e-4, rtol=1e-4)
    # the same file over the unquantized base: peftkit and peft agree there too
    ours_fp = PeftModel.from_pretrained(load(saved, quant=None), tmp_path)
    theirs_fp = peft.PeftModel.from_pretrained(load(saved, quant=None), tmp_path)
    torch.testing.assert_close(logits(ours_fp, inputs), logits(theirs_fp, inputs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_peftkit_loads_peft_adapter_over_the_same_bnb_base(saved, tmp_path, kind):
    import peft

    targets = ["query", "value"] if kind == "bert" else LLAMA_TARGETS
    theirs = peft.get_peft_model(
        load(saved, kind), peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)
    )
    theirs.save_pretrained(tmp_path)
    inputs = batch(kind)
    ours = PeftModel.from_pretrained(load(saved, kind), tmp_path)
    assert any(isinstance(m, QuantizedLoraLinear) for m in ours.modules())
    torch.testing.assert_close(logits(ours, inputs), logits(theirs, inputs), atol=1e-4, rtol=1e-4)


# ---- merging: dequantize, add, requantize, and say how much rounding that cost ------------------------------------
NF4_HALF_GAP = (1.0 - 0.7229568362236023) / 2  # the widest gap between NF4 codes (its top two), halved


@pytest.mark.filterwarnings("default::peftkit.core.quantized.RoundingWarning")
def test_merge_reports_rounding_error_within_the_nf4_bound(saved):
    pm = get_peft_model(load(saved, double=True), LoraConfig(r=4, target_modules="all-linear"))
    perturb(pm, scale=0.05)
    inputs = batch("llama")
    with pm.disable_adapter():
        base = logits(pm, inputs)
    unmerged = logits(pm, inputs)
    layers = [m for m in pm.modules() if isinstance(m, QuantizedLoraLinear)]
    targets = [(Q.dequantize(m.base_layer) + m.delta_weight("default")).detach() for m in layers]
    before = stored(pm)
    with pytest.warns(Q.RoundingWarning, match=r"changed it by up to [0-9.e-]+ \(\|\|error\|\|/\|\|W \+ ΔW\|\| = "):
        pm.merge_adapter()
    for layer, target in zip(layers, targets, strict=True):
        max_err, rel = layer.merge_rounding_error
        assert (max_err, rel) == pytest.approx(Q.rounding_error(layer.base_layer, target))
        assert 0 < max_err <= NF4_HALF_GAP * float(target.abs().max()) * 1.02  # + double-quantized scales
        assert 0 < rel < 0.2
    merged = logits(pm, inputs)
    assert (merged - unmerged).abs().max() < (unmerged - base).abs().max()  # the delta is in, up to rounding
    pm.unmerge_adapter()
    after = stored(pm)
    assert all(torch.equal(before[k], after[k]) for k in before)  # unmerge restores the stored bytes exactly
    torch.testing.assert_close(logits(pm, inputs), unmerged, atol=0, rtol=0)


@pytest.mark.parametrize("quant", ["nf4", "int8", "torchao-int8"])
def test_merge_and_unload_keeps_the_quantized_format(saved, quant):
    pm = get_peft_model(load(saved, quant=quant), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    perturb(pm, scale=0.05)
    inputs = batch("llama")
    with pm.disable_adapter():
        base = logits(pm, inputs)
    unmerged = logits(pm, inputs)
    plain = pm.merge_and_unload()
    assert not any(isinstance(m, QuantizedLoraLinear) for m in plain.modules())
    q_proj = plain.model.layers[0].self_attn.q_proj
    assert Q.is_quantized(q_proj)
    assert (logits(plain, inputs) - unmerged).abs().max() < (unmerged - base).abs().max()


@pytest.mark.parametrize("safe_merge", [True, False])
def test_merge_refuses_a_non_finite_result_and_changes_nothing(saved, safe_merge):
    pm = get_peft_model(load(saved), LoraConfig(r=4, target_modules="all-linear"))
    perturb(pm)
    with torch.no_grad():
        pm.base_model.model.model.layers[1].mlp.up_proj.lora_B["default"].weight[0, 0] = float("nan")
    before = stored(pm)
    with pytest.raises(MergeError, match="non-finite"):
        pm.merge_and_unload(safe_merge=safe_merge)
    if safe_merge:  # every layer is back as it was (the core's safe_merge rollback)
        after = stored(pm)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not any(m.merged_adapters for m in pm.modules() if isinstance(m, QuantizedLoraLinear))
    assert not pm.base_model.model.model.layers[1].mlp.up_proj.merged_adapters  # the bad layer itself: untouched


# ---- per-row adapters, hot-swap, unload over quantized layers -----------------------------------------------------
@pytest.mark.parametrize("dora_b", [False, True])
def test_per_row_adapters_over_nf4(saved, dora_b):
    pm = get_peft_model(load(saved), LoraConfig(r=4, target_modules="all-linear"), adapter_name="a")
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "down_proj"], use_dora=dora_b))
    perturb(pm, "a", seed=1)
    perturb(pm, "b", seed=2)
    inputs = batch("llama")
    per_adapter = {}
    for name in ("a", "b"):
        pm.set_adapter(name)
        per_adapter[name] = logits(pm, inputs)
    with pm.disable_adapter():
        per_adapter["__base__"] = logits(pm, inputs)
    rows = ["b", "__base__", "a", "b"]
    pm.eval()
    mixed = logits(pm, inputs, adapter_names=rows)
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], per_adapter[name][i], atol=1e-5, rtol=1e-5)


def test_hotswap_and_unload_over_nf4(saved, tmp_path):
    from peftkit import hotswap_adapter

    donor = get_peft_model(load(saved), LoraConfig(r=4, target_modules="all-linear"))
    perturb(donor, seed=3)
    donor.save_pretrained(tmp_path)
    inputs = batch("llama")
    expected = logits(donor, inputs)
    pm = get_peft_model(load(saved), LoraConfig(r=4, target_modules="all-linear"))
    perturb(pm, seed=4)
    base_stored = stored(pm)
    hotswap_adapter(pm, tmp_path, "default")
    torch.testing.assert_close(logits(pm, inputs), expected, atol=1e-6, rtol=1e-6)
    plain = pm.unload()
    assert not any(isinstance(m, QuantizedLoraLinear) for m in plain.modules())
    after = list(stored(plain).values())  # the same layers in the same order, under their unwrapped names
    assert len(after) == len(base_stored) and all(map(torch.equal, base_stored.values(), after))
    torch.testing.assert_close(logits(plain, inputs), logits(load(saved), inputs), atol=0, rtol=0)


# ---- integrations/kbit.py: quantize a loaded model, prepare it, export merged without requantizing ---------------
@pytest.mark.parametrize("quant", ["nf4", "int8", "torchao-int8"])
def test_quantize_model_equals_the_transformers_quantized_load(saved, quant):
    from peftkit.integrations.kbit import quantize_model

    ours = exact_cpu_kernel(quantize_model(load(saved, quant=None), quant, torch.float32, double_quant=False))
    reference = load(saved, quant=quant)
    kinds = [Q.kind(m) for m in ours.modules() if Q.is_quantized(m)]
    assert len(kinds) == 14 and not Q.is_quantized(ours.lm_head)
    mine, theirs = stored(ours), stored(reference)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)  # the same bytes
    for name, module in ours.named_modules():
        if Q.is_quantized(module):
            torch.testing.assert_close(Q.dequantize(module), Q.dequantize(reference.get_submodule(name)))


def test_fake_quantize_and_merge_dequantized_are_exact(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftkit.integrations.kbit import fake_quantize, merge_dequantized

    inputs = batch("llama")
    quantized = load(saved, double=True)
    fake = fake_quantize(load(saved, quant=None), "nf4", double_quant=True)
    torch.testing.assert_close(logits(fake, inputs), logits(quantized, inputs), atol=1e-5, rtol=1e-5)
    pm = get_peft_model(quantized, LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    perturb(pm, scale=0.05)
    adapted = logits(pm, inputs)
    merged = merge_dequantized(pm, torch.float32)
    assert not any(Q.is_quantized(m) or isinstance(m, QuantizedLoraLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs), adapted, atol=1e-5, rtol=1e-5)  # no requantization error
    merged.save_pretrained(tmp_path)  # a plain transformers folder: no quantization_config left in it
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(Q.is_quantized(m) for m in again.modules())
    torch.testing.assert_close(logits(again, inputs), adapted, atol=1e-5, rtol=1e-5)


def test_prepare_model_for_kbit_training_on_a_real_4bit_model_matches_peft(saved):
    import peft

    import peftkit

    ours, theirs = load(saved, dtype=torch.bfloat16), load(saved, dtype=torch.bfloat16)
    for model in (ours, theirs):
        for p in model.parameters():  # norms and embeddings in bf16, as a bf16 checkpoint loads
            if p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
    peftkit.prepare_model_for_kbit_training(ours)
    peft.prepare_model_for_kbit_training(theirs)
    ours_dtypes = {n: (p.dtype, p.requires_grad) for n, p in ours.named_parameters()}
    assert ours_dtypes == {n: (p.dtype, p.requires_grad) for n, p in theirs.named_parameters()}
    assert ours.is_gradient_checkpointing and ours.model.norm.weight.dtype == torch.float32
    pm = get_peft_model(ours, LoraConfig(r=4, target_modules="all-linear"))
    pm.train()
    inputs = batch("llama")
    pm(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "lora_B" in n]  # B = 0 at init: A's gradient is zero
    assert len(grads) == 14 and all(g is not None and g.abs().sum() > 0 for g in grads)


# ---- (IA)3 over quantized layers ------------------------------------------------------------------------------------
IA3_ARGS = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])


def test_ia3_over_nf4_formula_training_and_merge(saved):
    from peftkit import IA3Config
    from peftkit.methods.ia3_quantized import QuantizedIA3Linear

    pm = get_peft_model(load(saved), IA3Config(**IA3_ARGS))
    perturb(pm, scale=0.3)
    attn, mlp = pm.base_model.model.model.layers[0].self_attn, pm.base_model.model.model.layers[0].mlp
    assert isinstance(attn.k_proj, QuantizedIA3Linear) and isinstance(mlp.down_proj, QuantizedIA3Linear)
    x, h = torch.randn(2, 3, 64), torch.randn(2, 3, 128)
    lk, ld = attn.k_proj.ia3_l["default"].reshape(-1), mlp.down_proj.ia3_l["default"].reshape(-1)
    with torch.no_grad():
        torch.testing.assert_close(attn.k_proj(x), (x @ Q.dequantize(attn.k_proj.base_layer).T) * lk, atol=1e-5, rtol=0)
        torch.testing.assert_close(
            mlp.down_proj(h), (h * ld) @ Q.dequantize(mlp.down_proj.base_layer).T, atol=1e-5, rtol=0
        )
    before = stored(pm)
    inputs = batch("llama")
    adapted = logits(pm, inputs)
    with pytest.warns(Q.RoundingWarning, match="changed it by up to"):
        pm.merge_adapter()
    assert (logits(pm, inputs) - adapted).abs().max() < 0.1 * adapted.abs().max()
    pm.unmerge_adapter()
    assert all(map(torch.equal, before.values(), stored(pm).values()))
    torch.testing.assert_close(logits(pm, inputs), adapted, atol=0, rtol=0)


def test_ia3_over_nf4_interop_with_peft(saved, tmp_path):
    import peft

    from peftkit import IA3Config

    ours = get_peft_model(load(saved), IA3Config(**IA3_ARGS))
    perturb(ours, scale=0.3)
    ours.save_pretrained(tmp_path / "ours")
    inputs = batch("llama")
    theirs = peft.PeftModel.from_pretrained(load(saved), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs, inputs), logits(ours, inputs), atol=1e-4, rtol=1e-4)
    theirs = peft.get_peft_model(load(saved), peft.IA3Config(**IA3_ARGS, init_ia3_weights=False))
    theirs.save_pretrained(tmp_path / "theirs")
    again = PeftModel.from_pretrained(load(saved), tmp_path / "theirs")
    torch.testing.assert_close(logits(again, inputs), logits(theirs, inputs), atol=1e-4, rtol=1e-4)


# ---- LoftQ (Li et al. 2023, Algorithm 1) ----------------------------------------------------------------------------
@pytest.mark.parametrize(("bits", "quant"), [(4, "nf4"), (8, "int8")])
def test_loftq_beats_plain_quantization_and_improves_with_iterations(bits, quant):
    from peftkit.methods.lora.loftq import loftq_factors

    w = tiny_llama(hidden_size=64, intermediate_size=128).model.layers[0].mlp.up_proj.weight.detach()
    plain = float((w - Q.roundtrip(w, quant)).norm())  # ||W - Q||
    errors = []
    for iters in (1, 2, 5):
        q, a, b = loftq_factors(w, bits, r=8, iters=iters, scaling=2.0)
        assert a.shape == (8, 64) and b.shape == (128, 8)
        if quant == "nf4":
            assert torch.equal(Q.roundtrip(q, quant), q)  # dequant(Q) is stored exactly by a 4-bit layer
        errors.append(float((w - (q + 2.0 * b @ a)).norm()))  # ||W - (Q + s B A)||
    assert errors[0] < plain
    assert errors[2] < errors[1] < errors[0]


# ---- the CLI: peftkit merge --dtype ----------------------------------------------------------------------------------
def test_cli_merge_dtype_exports_the_dequantized_merge(tmp_path, capsys):
    import tiny_runs as T
    from transformers import AutoModelForCausalLM

    from peftkit.cli.main import main
    from peftkit.integrations.kbit import quantize_model

    folder = tmp_path / "base"
    tok = T.tokenizer(folder)
    tiny_llama(vocab_size=len(tok), hidden_size=64, intermediate_size=128).save_pretrained(folder)
    tok.save_pretrained(folder)
    quantized = exact_cpu_kernel(quantize_model(AutoModelForCausalLM.from_pretrained(folder), "nf4", torch.float32))
    pm = get_peft_model(quantized, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    perturb(pm, scale=0.05)
    pm.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "train_config.yaml").write_text(f"model: {folder}\nquantize: nf4\n")  # as train records
    inputs = {"input_ids": torch.randint(5, 40, (3, 7), generator=torch.Generator().manual_seed(0))}
    expected = logits(pm.eval(), inputs)
    for dtype, tol in (("fp32", 1e-4), ("bf16", 5e-2)):
        with pytest.raises(SystemExit) as exit_info:
            main(["merge", str(tmp_path / "adapter"), str(tmp_path / dtype), "--dtype", dtype])
        assert exit_info.value.code == 0, capsys.readouterr().err[-2000:]
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / dtype, dtype="auto").eval()
        assert {p.dtype for p in merged.parameters()} == {torch.float32 if dtype == "fp32" else torch.bfloat16}
        assert not any(Q.is_quantized(m) for m in merged.modules())
        torch.testing.assert_close(logits(merged, inputs), expected, atol=tol, rtol=tol)


def test_loftq_init_through_the_config_then_a_4bit_base(saved, tmp_path):
    """peft's LoftQ recipe: initialise on the float model, save it, load it in 4 bits with the adapter; the
    quantized model with the LoftQ adapter is closer to the float model than the quantized model alone."""
    import json

    from transformers import AutoModelForCausalLM

    from peftkit.methods.lora.loftq import LoftQConfig

    config = LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="loftq",
        loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2),
    )  # fmt: skip
    float_model, inputs = load(saved, quant=None), batch("llama")
    reference = logits(float_model, inputs)
    pm = get_peft_model(float_model, config)
    torch.testing.assert_close(logits(pm, inputs), reference, atol=0.05, rtol=0)  # Q + s B A ~ W at init
    pm.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["loftq_config"] == {
        "loftq_bits": 4, "loftq_iter": 2
    }  # fmt: skip
    pm.unload().save_pretrained(tmp_path / "base")  # the base now holds dequant(Q): a 4-bit load stores it exactly
    from transformers import BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    quantized = exact_cpu_kernel(AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb))
    plain_q = exact_cpu_kernel(load(saved))
    with pytest.warns(UserWarning, match="already quantized"):  # A, B come from the file
        loftq_model = PeftModel.from_pretrained(quantized, tmp_path / "adapter")
    gap_loftq = float((logits(loftq_model, inputs) - reference).abs().mean())
    gap_plain = float((logits(plain_q, inputs) - reference).abs().mean())
    assert gap_loftq < gap_plain
    with pytest.raises(ConfigError, match="needs loftq_config"):
        LoraConfig(init_lora_weights="loftq")
    on_4bit = LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    with pytest.warns(UserWarning, match="already quantized"):
        get_peft_model(load(saved), on_4bit)


def test_cli_train_quantize_trains_adapters_on_a_4bit_base(tmp_path, capsys):
    import tiny_runs as T
    import yaml

    from peftkit.cli.main import main

    folder, data, out = T.bert_folder(tmp_path / "bert"), tmp_path / "rows.csv", tmp_path / "run"
    T.write_csv(data, T.sentiment_rows(48))
    args = ["train", "--model", folder, "--data", data, "--output-dir", out, "--threads", "1", "--no-progress",
            "--batch-size", "16", "--max-steps", "2", "--r", "4", "--target-modules", "query,value",
            "--quantize", "nf4"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 0, capsys.readouterr().err[-2000:]
    recorded = yaml.safe_load(next(out.rglob("train_config.yaml")).read_text())
    assert recorded["quantize"] == "nf4"
    adapter = next(p.parent for p in out.rglob("adapter_model.safetensors"))
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors and all("lora_" in k or "classifier" in k for k in tensors)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", str(folder), "--data", str(data), "--output-dir", str(tmp_path / "bad"),
              "--quantize", "nf3"])  # fmt: skip
    assert exit_info.value.code != 0
    assert "nf3" in capsys.readouterr().err


def test_replace_lora_weights_loftq_on_a_4bit_model(saved):
    from peftkit import replace_lora_weights_loftq

    inputs = batch("llama")
    reference, plain = logits(load(saved, quant=None), inputs), logits(load(saved), inputs)
    pm = get_peft_model(load(saved), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    asked = []
    replace_lora_weights_loftq(pm, callback=lambda model, name: asked.append(name) or False)  # every layer refused
    assert len(asked) == 14 and all(torch.count_nonzero(m.lora_B["default"].weight) == 0 for m in qlayers(pm))
    replace_lora_weights_loftq(pm)  # the weights from config._name_or_path's safetensors
    gap_loftq = float((logits(pm, inputs) - reference).abs().mean())
    assert gap_loftq < float((plain - reference).abs().mean())
    with pytest.raises(ConfigError, match=r"no \.safetensors file"):
        replace_lora_weights_loftq(pm, model_path="/nonexistent")


def qlayers(model: torch.nn.Module) -> list[QuantizedLoraLinear]:
    return [m for m in model.modules() if isinstance(m, QuantizedLoraLinear)]


def test_dora_merge_over_nf4_and_exact_unmerge(saved):
    pm = get_peft_model(load(saved), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], use_dora=True))
    perturb(pm, scale=0.05)
    inputs = batch("llama")
    with pm.disable_adapter():
        base = logits(pm, inputs)
    unmerged, before = logits(pm, inputs), stored(pm)
    pm.merge_adapter()
    assert all(m.merge_rounding_error is not None for m in qlayers(pm))
    assert (logits(pm, inputs) - unmerged).abs().max() < (unmerged - base).abs().max()
    pm.unmerge_adapter()
    assert all(map(torch.equal, before.values(), stored(pm).values()))
    torch.testing.assert_close(logits(pm, inputs), unmerged, atol=0, rtol=0)
