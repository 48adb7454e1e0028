"""Stable Diffusion LoRA (integrations/diffusers.py, integrations/kohya.py) on tiny SD-1.5 / SDXL-shaped models.

References: base weights merged by hand (W + alpha/r up @ down), diffusers' own load_lora_weights, and LyCORIS'
LoHa / LoKr formulas written out with loops and tensordot.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peftkit.errors import AdapterNameError, CheckpointError, ConfigError, MergeError
from peftkit.integrations import diffusers as sd
from peftkit.integrations import kohya
from peftkit.integrations.kohya import ModuleLora

pytest.importorskip("diffusers")
warnings.filterwarnings("ignore")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_sd_lora.py"
_spec = importlib.util.spec_from_file_location("train_sd_lora", EXAMPLE)
ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ex)

IDS = torch.randint(2, 100, (2, 16), generator=torch.Generator().manual_seed(0))
X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
T = torch.tensor([10, 500])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tiny models run fastest on one thread; on a loaded 2-core machine a second thread mostly spins."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base():
    return ex.tiny_unet(), ex.tiny_text_encoder()


@pytest.fixture
def pipe(base):
    return SimpleNamespace(unet=copy.deepcopy(base[0]), text_encoder=copy.deepcopy(base[1]))


def run(p) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        h = p.text_encoder(IDS).last_hidden_state
        return h, p.unet(X, T, encoder_hidden_states=h).sample


def random_parts(p, unet_preset: str = "sd-unet-full", seed: int = 0, scale: float = 0.1) -> dict:
    """Random factors for every module a preset targets: rank 4 (alpha 2), 3x3 convs rank 2 (alpha 1)."""
    gen = torch.Generator().manual_seed(seed)
    parts = {}
    for c, preset in (("unet", unet_preset), ("text_encoder", "sd-text-encoder")):
        mods = {}
        for name, m in getattr(p, c).named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and re.fullmatch(sd.PRESETS[preset], name):
                k = tuple(m.weight.shape[2:])
                r = 2 if k == (3, 3) else 4
                down = torch.randn(r, m.weight.shape[1], *k, generator=gen) * scale
                up = torch.randn(m.weight.shape[0], r, *(1,) * len(k), generator=gen) * scale
                mods[name] = ModuleLora(down, up, r / 2)
        parts[c] = mods
    return parts


def merged_by_hand(p, parts: dict, weight: float = 1.0):
    """A copy of the pipeline with W += weight * alpha / r * up @ down written into the plain weights."""
    q = SimpleNamespace(unet=copy.deepcopy(p.unet), text_encoder=copy.deepcopy(p.text_encoder))
    with torch.no_grad():
        for c, mods in parts.items():
            for name, mod in mods.items():
                w = getattr(q, c).get_submodule(name).weight
                delta = mod.up.flatten(1) @ mod.down.flatten(1) * (mod.alpha / mod.rank)
                w += weight * delta.reshape(w.shape)
    return q


def state(p) -> dict:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(p, c).state_dict().items()}


def assert_unchanged(p, before: dict, atol: float = 0.0) -> None:
    after = state(p)
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=atol, rtol=0)
    assert not sd.is_adapted(p.unet) and not sd.is_adapted(p.text_encoder)
    assert sd.list_adapters(p) == {}


# ---- presets -------------------------------------------------------------------------------------------------------
def test_presets_target_the_sd_modules(base):
    unet, te = base
    names = {n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}

    def hits(preset):
        return {n for n in names if re.fullmatch(sd.PRESETS[preset], n)}

    attn = hits("sd-unet-attn")
    assert len(attn) == 6 * 8  # transformer blocks: 2 down + 1 mid + 3 up; x (attn1, attn2) x (q, k, v, out)
    assert all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in attn)
    transformer = hits("sd-unet-transformer")
    assert attn < transformer and "mid_block.attentions.0.proj_in" in transformer
    full = hits("sd-unet-full")
    assert {
        "down_blocks.0.resnets.0.conv1",
        "up_blocks.0.upsamplers.0.conv",
        "mid_block.resnets.1.time_emb_proj",
    } < full
    assert "conv_in" not in full and "conv_out" not in full
    te_names = [n for n, m in te.named_modules() if isinstance(m, nn.Linear)]
    assert len([n for n in te_names if re.fullmatch(sd.PRESETS["sd-text-encoder"], n)]) == 6 * 2
    config = sd.sd_lora_config("sd-unet-full", r=8, alpha=4, conv_r=2, conv_alpha=1)
    assert (
        config.rank_for("down_blocks.0.resnets.0.conv1") == 2 and config.rank_for("mid_block.attentions.0.proj_in") == 8
    )
    assert config.alpha_for("up_blocks.0.upsamplers.0.conv") == 1 and config.lora_alpha == 4
    with pytest.raises(ConfigError, match="sd-unet-attn"):
        sd.sd_lora_config("sd-unet-everything")


# ---- kohya files ---------------------------------------------------------------------------------------------------
def test_loaded_lora_equals_hand_merged_weights_and_kohya_round_trip(pipe, base, tmp_path):
    parts = random_parts(pipe)
    expected = run(merged_by_hand(pipe, parts))
    assert sd.load_lora(pipe, parts, "a") == ["unet", "text_encoder"]
    got = run(pipe)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)

    path = tmp_path / "a.safetensors"
    sd.save_lora(pipe, path, "a", title="tiny")
    tensors, meta = kohya.read_file(path)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert tensors[f"{stem}.lora_down.weight"].shape == (4, 16) and tensors[f"{stem}.alpha"].item() == 2.0
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 16, 3, 3)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.title"] == "tiny"

    fresh = SimpleNamespace(unet=copy.deepcopy(base[0]), text_encoder=copy.deepcopy(base[1]))
    sd.load_lora(fresh, path, "a")
    again = run(fresh)
    assert torch.equal(again[0], got[0]) and torch.equal(again[1], got[1])


def test_diffusers_load_lora_weights_reads_peftkit_files(pipe, base, tmp_path):
    """Independent check: diffusers' own loader (kohya conversion + peft) gives peftkit's outputs."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline

    sd.load_lora(pipe, random_parts(pipe), "a")
    ours = run(pipe)
    sd.save_lora(pipe, tmp_path / "k.safetensors", "a", format="kohya")
    sd.save_lora(pipe, tmp_path / "d", "a", format="diffusers")
    vae = AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    for source in (tmp_path / "k.safetensors", tmp_path / "d"):
        unet, te = copy.deepcopy(base[0]), copy.deepcopy(base[1])
        kwargs = dict(tokenizer=None, scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None)
        theirs = StableDiffusionPipeline(vae=vae, text_encoder=te, unet=unet, requires_safety_checker=False, **kwargs)
        theirs.load_lora_weights(str(source), adapter_name="a")
        got = run(SimpleNamespace(unet=unet, text_encoder=te))
        torch.testing.assert_close(got[0], ours[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], ours[1], atol=1e-5, rtol=1e-5)
    # and peftkit reads the diffusers layout back to the same outputs
    fresh = SimpleNamespace(unet=copy.deepcopy(base[0]), text_encoder=copy.deepcopy(base[1]))
    sd.load_lora(fresh, tmp_path / "d", "a")
    torch.testing.assert_close(run(fresh)[1], ours[1], atol=1e-6, rtol=1e-6)


def test_conversion_functions_round_trip(pipe, tmp_path):
    parts = random_parts(pipe, "sd-unet-attn")
    sd.write_kohya(parts, tmp_path / "k.safetensors")
    # with the components given, paths are resolved on them (transformers 5's CLIPTextModel has no 'text_model.')
    sd.kohya_to_peftkit(tmp_path / "k.safetensors", tmp_path / "pk", unet=pipe.unet, text_encoder=pipe.text_encoder)
    assert (tmp_path / "pk" / "unet" / "adapter_config.json").is_file()
    sd.peftkit_to_diffusers(tmp_path / "pk", tmp_path / "d.safetensors")
    sd.diffusers_to_kohya(tmp_path / "d.safetensors", tmp_path / "k2.safetensors", unet=pipe.unet)
    a, _ = kohya.read_file(tmp_path / "k.safetensors")
    b, _ = kohya.read_file(tmp_path / "k2.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the peftkit folders are ordinary save_pretrained output: PeftModel.from_pretrained gives the hand-merged model
    from peftkit import PeftModel

    expected = run(merged_by_hand(pipe, parts))
    loaded = SimpleNamespace(
        unet=PeftModel.from_pretrained(copy.deepcopy(pipe.unet), tmp_path / "pk" / "unet"),
        text_encoder=PeftModel.from_pretrained(copy.deepcopy(pipe.text_encoder), tmp_path / "pk" / "text_encoder"),
    )
    got = run(loaded)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)


def test_older_diffusers_keys_with_alpha_tensors(pipe, tmp_path):
    """diffusers' pre-peft text encoder keys (.lora_linear_layer.down / .up) with network-alpha tensors."""
    parts = random_parts(pipe, "sd-unet-attn")
    tensors = {}
    for path, mod in parts["text_encoder"].items():
        key = f"text_encoder.text_model.{path}"
        tensors[f"{key}.lora_linear_layer.down.weight"] = mod.down
        tensors[f"{key}.lora_linear_layer.up.weight"] = mod.up
        tensors[f"{key}.alpha"] = torch.tensor(mod.alpha)
    kohya.write_file(tensors, tmp_path / "old.safetensors", {})
    expected = run(merged_by_hand(pipe, {"text_encoder": parts["text_encoder"]}))
    assert sd.load_lora(pipe, tmp_path / "old.safetensors", "old") == ["text_encoder"]
    torch.testing.assert_close(run(pipe)[0], expected[0], atol=1e-5, rtol=1e-5)


def test_ldm_names_map_both_ways():
    names = {
        "down_blocks.1.attentions.0.proj_in": "input_blocks.4.1.proj_in",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
        "up_blocks.0.resnets.2.conv_shortcut": "output_blocks.2.0.skip_connection",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.1.conv",
        "conv_in": "input_blocks.0.0",
    }
    mapped = kohya.ldm_unet_names(list(names), 2, {0: True, 1: False})
    assert mapped == names
    assert {kohya.ldm_to_diffusers_path(v, 2) for v in names.values()} == set(names)
    assert kohya.stem_to_path("output_blocks_2_0_skip_connection") == "output_blocks.2.0.skip_connection"


def test_sdxl_kohya_uses_ldm_names_te1_te2_and_diffusers_agrees(tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=2,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32,
        norm_num_groups=8,
    ).eval()
    te_cfg = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    te1 = CLIPTextModel(CLIPTextConfig(**te_cfg, max_position_embeddings=16)).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg, projection_dim=16, max_position_embeddings=16)).eval()
    base = (unet, te1, te2)

    def make():
        u, a, b = (copy.deepcopy(m) for m in base)
        return SimpleNamespace(unet=u, text_encoder=a, text_encoder_2=b)

    def out(p):
        with torch.no_grad():
            h = torch.cat([p.text_encoder(IDS).last_hidden_state, p.text_encoder_2(IDS).last_hidden_state], -1)
            cond = {"text_embeds": torch.ones(2, 16), "time_ids": torch.ones(2, 6)}
            return p.unet(X, T, encoder_hidden_states=h, added_cond_kwargs=cond).sample

    p = make()
    gen = torch.Generator().manual_seed(3)
    parts = {}
    for c, pattern in (
        ("unet", sd.PRESETS["sd-unet-full"]),
        ("text_encoder", sd.PRESETS["sd-text-encoder"]),
        ("text_encoder_2", ".*(out_proj|fc1)"),
    ):
        parts[c] = {
            n: ModuleLora(
                torch.randn(2, m.weight.shape[1], *m.weight.shape[2:], generator=gen) * 0.1,
                torch.randn(m.weight.shape[0], 2, *(1,) * (m.weight.dim() - 2), generator=gen) * 0.1,
                1.0,
            )
            for n, m in getattr(p, c).named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and re.fullmatch(pattern, n)
        }
    sd.load_lora(p, parts, "x")
    ours = out(p)
    path = tmp_path / "xl.safetensors"
    sd.save_lora(p, path, "x")
    tensors, meta = kohya.read_file(path)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in tensors
    assert "lora_unet_input_blocks_3_0_op.lora_down.weight" in tensors
    assert "lora_unet_output_blocks_2_2_conv.lora_up.weight" in tensors
    assert any(k.startswith("lora_te1_text_model_encoder") for k in tensors)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_mlp_fc1") for k in tensors)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"

    q = make()
    sd.load_lora(q, path, "x")
    torch.testing.assert_close(out(q), ours, atol=1e-6, rtol=1e-6)
    r = make()  # diffusers' own SDXL reading of the LDM names
    theirs = StableDiffusionXLPipeline.__new__(StableDiffusionXLPipeline)
    theirs.__dict__.update(unet=r.unet, text_encoder=r.text_encoder, text_encoder_2=r.text_encoder_2)
    state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=r.unet.config)
    StableDiffusionXLPipeline.load_lora_into_unet(state_dict, alphas, unet=r.unet, adapter_name="x")
    for prefix, te in (("text_encoder", r.text_encoder), ("text_encoder_2", r.text_encoder_2)):
        StableDiffusionXLPipeline.load_lora_into_text_encoder(
            state_dict, alphas, text_encoder=te, prefix=prefix, adapter_name="x"
        )
    torch.testing.assert_close(out(r), ours, atol=1e-5, rtol=1e-5)


# ---- LyCORIS -------------------------------------------------------------------------------------------------------
def test_loha_and_lokr_merge_to_the_hand_computed_delta(pipe, base, tmp_path):
    g = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 16 -> 16
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # Conv2d 16 -> 16, 3x3
    fc1 = "lora_te_text_model_encoder_layers_1_mlp_fc1"  # Linear 24 -> 48
    k_proj = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"  # Linear 24 -> 24
    t = {
        # LoHa on a Linear: rank 2, alpha 1
        f"{q}.hada_w1_a": rnd(16, 2), f"{q}.hada_w1_b": rnd(2, 16), f"{q}.hada_w2_a": rnd(16, 2),
        f"{q}.hada_w2_b": rnd(2, 16), f"{q}.alpha": torch.tensor(1.0),
        # LoHa with tucker cores on a 3x3 conv: rank 2, alpha 4
        f"{conv}.hada_t1": rnd(2, 2, 3, 3), f"{conv}.hada_w1_a": rnd(2, 16), f"{conv}.hada_w1_b": rnd(2, 16),
        f"{conv}.hada_t2": rnd(2, 2, 3, 3), f"{conv}.hada_w2_a": rnd(2, 16), f"{conv}.hada_w2_b": rnd(2, 16),
        f"{conv}.alpha": torch.tensor(4.0),
        # LoKr: w1 full (4, 3), w2 = w2_a w2_b (12, 2) @ (2, 8), alpha 1 -> scale 1/2
        f"{fc1}.lokr_w1": rnd(4, 3), f"{fc1}.lokr_w2_a": rnd(12, 2), f"{fc1}.lokr_w2_b": rnd(2, 8),
        f"{fc1}.alpha": torch.tensor(1.0),
        # LoKr with both factors full: no alpha scaling
        f"{k_proj}.lokr_w1": rnd(2, 3), f"{k_proj}.lokr_w2": rnd(12, 8), f"{k_proj}.alpha": torch.tensor(7.0),
    }  # fmt: skip
    path = tmp_path / "lyco.safetensors"
    kohya.write_file(t, path, {"ss_network_module": "lycoris.kohya"})

    def tucker(core, a, b):  # W[p, q, k, l] = sum_ij core[i, j, k, l] a[i, p] b[j, q]
        return torch.tensordot(torch.tensordot(core, a, dims=([0], [0])), b, dims=([0], [0])).permute(2, 3, 0, 1)

    def kron(a, b):  # block (i, j) = a[i, j] * b
        return torch.cat([torch.cat([a[i, j] * b for j in range(a.shape[1])], 1) for i in range(a.shape[0])], 0)

    hand = {
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"): (
            (t[f"{q}.hada_w1_a"] @ t[f"{q}.hada_w1_b"]) * (t[f"{q}.hada_w2_a"] @ t[f"{q}.hada_w2_b"]) * 0.5
        ),
        ("unet", "down_blocks.0.resnets.0.conv1"): (
            tucker(t[f"{conv}.hada_t1"], t[f"{conv}.hada_w1_a"], t[f"{conv}.hada_w1_b"])
            * tucker(t[f"{conv}.hada_t2"], t[f"{conv}.hada_w2_a"], t[f"{conv}.hada_w2_b"])
            * 2.0
        ),
        ("text_encoder", "encoder.layers.1.mlp.fc1"): (
            kron(t[f"{fc1}.lokr_w1"], t[f"{fc1}.lokr_w2_a"] @ t[f"{fc1}.lokr_w2_b"]) * 0.5
        ),
        ("text_encoder", "encoder.layers.0.self_attn.k_proj"): kron(t[f"{k_proj}.lokr_w1"], t[f"{k_proj}.lokr_w2"]),
    }  # fmt: skip
    before = state(pipe)
    sd.load_lora(pipe, path, "lyco")
    unfused = run(pipe)
    sd.fuse_lora(pipe)
    for (c, name), delta in hand.items():
        layer = getattr(pipe, c).get_submodule(name)
        got = layer.get_base_layer().weight - before[f"{c}.{name}.weight"]
        torch.testing.assert_close(got, delta, atol=1e-5, rtol=1e-4)
    fused = run(pipe)
    torch.testing.assert_close(fused[1], unfused[1], atol=1e-5, rtol=1e-5)
    sd.unload_lora(pipe)  # unfuses first: the base weights come back to float tolerance
    assert_unchanged(pipe, before, atol=1e-6)


def test_lokr_conv_kron_with_decomposed_w2(pipe, tmp_path):
    g = torch.Generator().manual_seed(6)
    stem = "lora_unet_up_blocks_1_resnets_0_conv2"  # Conv2d 16 -> 16, 3x3
    w1, w2a, w2b = torch.randn(4, 2, generator=g), torch.randn(4, 3, generator=g), torch.randn(3, 8 * 9, generator=g)
    kohya.write_file(
        {f"{stem}.lokr_w1": w1, f"{stem}.lokr_w2_a": w2a, f"{stem}.lokr_w2_b": w2b, f"{stem}.alpha": torch.tensor(1.5)},
        tmp_path / "k.safetensors",
        {},
    )
    w2 = (w2a @ w2b).reshape(4, 8, 3, 3)
    hand = torch.zeros(16, 16, 3, 3)
    for i in range(4):
        for j in range(2):
            hand[i * 4 : (i + 1) * 4, j * 8 : (j + 1) * 8] = w1[i, j] * w2
    original = pipe.unet.up_blocks[1].resnets[0].conv2.weight.clone()
    sd.load_lora(pipe, tmp_path / "k.safetensors", "k")
    sd.fuse_lora(pipe)
    got = pipe.unet.up_blocks[1].resnets[0].conv2.get_base_layer().weight - original
    torch.testing.assert_close(got, hand * 0.5, atol=1e-5, rtol=1e-4)


# ---- scales, fuse / unfuse, several adapters -----------------------------------------------------------------------
def test_scale_zero_is_base_and_fuse_unfuse_round_trip(pipe):
    base_out, before = run(pipe), state(pipe)
    sd.load_lora(pipe, random_parts(pipe), "a", scale=0.0)
    h, y = run(pipe)
    torch.testing.assert_close(y, base_out[1], atol=0, rtol=0)
    torch.testing.assert_close(h, base_out[0], atol=0, rtol=0)
    sd.set_adapters(pipe, "a", 1.0)
    unfused = run(pipe)
    assert (unfused[1] - base_out[1]).abs().max() > 1e-2
    sd.fuse_lora(pipe)
    fused = run(pipe)
    torch.testing.assert_close(fused[1], unfused[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(MergeError, match="fused"):
        sd.set_adapters(pipe, "a", 0.5)
    sd.unfuse_lora(pipe)
    now = state(pipe)
    for key, value in before.items():  # base weights back to float tolerance
        base_key = (
            key if key in now else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        torch.testing.assert_close(now[base_key], value, atol=1e-6, rtol=0)
    sd.unload_lora(pipe)
    assert_unchanged(pipe, before, atol=1e-6)


def test_several_adapters_weights_and_block_scales(pipe, base):
    plain = SimpleNamespace(unet=base[0], text_encoder=base[1])
    pa, pb = random_parts(pipe, seed=1), random_parts(pipe, "sd-unet-attn", seed=2)
    sd.load_lora(pipe, pa, "a")
    sd.load_lora(pipe, pb, "b")
    assert sd.get_active_adapters(pipe) == ["a", "b"]
    sd.set_adapters(pipe, ["a", "b"], [0.5, 1.0])
    ref = merged_by_hand(merged_by_hand(plain, pa, 0.5), pb, 1.0)
    torch.testing.assert_close(run(pipe)[1], run(ref)[1], atol=1e-5, rtol=1e-5)

    # per-block: the down blocks off, the up block 1's three layers 0 / 1 / 0.5, the text encoder at 0
    weights = {"unet": {"down": 0.0, "up": {"block_1": [0.0, 1.0, 0.5]}}, "text_encoder": 0.0}
    sd.set_adapters(pipe, ["a"], [weights])
    kept = {}
    for name, mod in pa["unet"].items():
        if name.startswith("down_blocks"):
            continue
        m = re.match(r"up_blocks\.1\.(?:attentions|resnets)\.(\d)\.", name)
        w = [0.0, 1.0, 0.5][int(m.group(1))] if m else 1.0  # (up block 1 is the last: no upsampler)
        kept[name] = ModuleLora(mod.down, mod.up, mod.alpha * w)
    ref = merged_by_hand(plain, {"unet": kept})
    torch.testing.assert_close(run(pipe)[1], run(ref)[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="'down', 'mid', 'up'"):
        sd.set_adapters(pipe, ["a"], [{"unet": {"middle": 1.0}}])
    sd.unload_lora(pipe, "b")
    assert sd.list_adapters(pipe) == {"unet": ["a"], "text_encoder": ["a"]}


# ---- bad input -----------------------------------------------------------------------------------------------------
def _kohya(path, tensors):
    kohya.write_file(tensors, path, {})
    return path


def test_bad_files_raise_clear_errors_and_leave_the_model_unchanged(pipe, tmp_path):
    before = state(pipe)
    g = torch.Generator().manual_seed(0)
    other = _kohya(  # an SDXL-sized file: block 3 and a 640-wide projection do not exist here
        tmp_path / "other.safetensors",
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 16, 1, 1, generator=g),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(16, 4, 1, 1, generator=g),
            "lora_unet_down_blocks_3_attentions_1_proj_in.lora_down.weight": torch.randn(4, 640, generator=g),
            "lora_unet_down_blocks_3_attentions_1_proj_in.lora_up.weight": torch.randn(640, 4, generator=g),
        },
    )
    with pytest.raises(CheckpointError, match=r"match no module.*another architecture"):
        sd.load_lora(pipe, other, "x")
    rank = _kohya(
        tmp_path / "rank.safetensors",
        {
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 24),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(24, 8),
        },
    )
    with pytest.raises(CheckpointError, match=r"rank mismatch.*rank 4.*rank 8"):
        sd.load_lora(pipe, rank, "x")
    wide = _kohya(
        tmp_path / "wide.safetensors",
        {
            "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(4, 1280, 1, 1),
            "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(1280, 4, 1, 1),
        },
    )
    with pytest.raises(CheckpointError, match="does not fit"):
        sd.load_lora(pipe, wide, "x")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(rank.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="corrupt"):
        sd.load_lora(pipe, corrupt, "x")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        sd.load_lora(pipe, tmp_path / "junk.safetensors", "x")
    with pytest.raises(CheckpointError, match="DoRA"):
        sd.load_lora(pipe, _kohya(tmp_path / "dora.safetensors", {"lora_unet_conv_in.dora_scale": torch.ones(3)}))
    assert_unchanged(pipe, before)


def test_a_failed_second_load_keeps_the_first_adapter(pipe, base):
    sd.load_lora(pipe, random_parts(pipe, "sd-unet-attn"), "a")
    with_a = run(pipe)
    bad = {
        "unet": {
            "down_blocks.0.attentions.0.proj_in": ModuleLora(torch.randn(4, 16, 1, 1), torch.randn(16, 4, 1, 1), 4.0)
        }
    }
    bad["text_encoder"] = {"encoder.layers.0.mlp.fc1": ModuleLora(torch.randn(4, 99), torch.randn(48, 4), 4.0)}
    with pytest.raises(CheckpointError, match="does not fit"):
        sd.load_lora(pipe, bad, "b")
    with pytest.raises(AdapterNameError, match="already has an adapter 'a'"):
        sd.load_lora(pipe, random_parts(SimpleNamespace(unet=base[0], text_encoder=base[1]), "sd-unet-attn"), "a")
    with pytest.raises(CheckpointError, match="no LoRA modules"):
        sd.load_lora(pipe, {"unet": {}}, "c")
    assert sd.list_adapters(pipe) == {"unet": ["a"], "text_encoder": ["a"]}
    again = run(pipe)
    assert torch.equal(again[1], with_a[1]) and torch.equal(again[0], with_a[0])


# ---- the training example ------------------------------------------------------------------------------------------
def test_training_example_lowers_the_diffusion_loss(tmp_path, base):
    result = ex.main(steps=12, out=str(tmp_path / "trained.safetensors"))
    losses = result["losses"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert result["eval_after"] < result["eval_before"] - 0.03
    tensors, _ = kohya.read_file(tmp_path / "trained.safetensors")
    assert any(k.startswith("lora_unet_") for k in tensors) and any(k.startswith("lora_te_") for k in tensors)
    p = SimpleNamespace(unet=copy.deepcopy(base[0]), text_encoder=copy.deepcopy(base[1]))
    sd.load_lora(p, tmp_path / "trained.safetensors", "trained")
    assert (run(p)[1] - run(SimpleNamespace(unet=base[0], text_encoder=base[1]))[1]).abs().max() > 1e-4
