"""Stable Diffusion LoHa / LoKr trained with examples/train_sd_lora.py's loop, written as a LyCORIS file
(integrations/lycoris.write_lycoris, kohya's key layout): peftkit's reader and the file's tensors merged by hand
reproduce the trained pipeline; diffusers 0.42 refuses the file (it reads LoKr only for Flux2 / Z-Image)."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from peftkit.errors import CheckpointError
from peftkit.integrations import diffusers as sd
from peftkit.integrations import kohya
from peftkit.integrations.lycoris import write_lycoris

pytest.importorskip("diffusers")
warnings.filterwarnings("ignore")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_sd_lora.py"
_spec = importlib.util.spec_from_file_location("train_sd_lora", EXAMPLE)
ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ex)

IDS = torch.randint(2, 100, (2, 16), generator=torch.Generator().manual_seed(0))
X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
T = torch.tensor([10, 500])
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(p) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        h = p.text_encoder(IDS).last_hidden_state
        return h, p.unet(X, T, encoder_hidden_states=h).sample


def fresh():
    return SimpleNamespace(unet=ex.tiny_unet(), text_encoder=ex.tiny_text_encoder())


@pytest.fixture(scope="module", params=["loha", "lokr"])
def trained(request, tmp_path_factory):
    """(method, the trained pipeline, its LyCORIS file, the eval losses) after 5 steps of the example's loop."""
    path = tmp_path_factory.mktemp(request.param) / f"sd_{request.param}.safetensors"
    result = ex.main(steps=5, rank=4, out=str(path), method=request.param, return_models=True)
    return request.param, result["pipe"], path, result


def by_hand(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW of one module from its file tensors: LyCORIS' formulas, alpha / r with r the factorised rank."""
    if "hada_w1_a" in parts:
        r = parts["hada_w1_b"].shape[0]
        return (
            (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"]) * parts["alpha"] / r
        )
    w2 = parts["lokr_w2"] if "lokr_w2" in parts else parts["lokr_w2_a"] @ parts["lokr_w2_b"].flatten(1)
    w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    w2 = w2.flatten(1)  # a kernel's (c, d, kh, kw) as (c, d · kh · kw): the same column order under kron
    scale = parts["alpha"] / parts["lokr_w2_b"].shape[0] if "lokr_w2_b" in parts else 1.0
    return torch.kron(w1, w2) * scale


def test_the_example_trains_and_the_file_has_kohya_lycoris_keys(trained):
    method, _, path, result = trained
    assert result["eval_after"] < result["eval_before"]
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    suffix = "hada_w1_a" if method == "loha" else "lokr_w1"
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q." + suffix in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj." + suffix in keys
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"])["algo"] == method


def test_the_file_merged_by_hand_reproduces_the_trained_pipeline(trained):
    _, pipe, path, _ = trained
    tensors, _ = kohya.read_file(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        head, _, suffix = key.partition(".")
        groups.setdefault(head, {})[suffix] = value
    target = fresh()
    names = {f"lora_unet_{kohya.path_to_stem(n)}": m for n, m in target.unet.named_modules()}
    for n, m in target.text_encoder.named_modules():  # kohya's keys keep CLIP's "text_model." (transformers 5 drops it)
        names[f"lora_te_{kohya.path_to_stem(n if n.startswith('text_model.') else 'text_model.' + n)}"] = m
    with torch.no_grad():
        for head, parts in groups.items():
            weight = names[head].weight
            weight += by_hand(parts).reshape(weight.shape)
    for ours, expected in zip(run(target), run(pipe), strict=True):
        torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)


def test_peftkit_s_reader_loads_the_file_to_the_trained_outputs(trained):
    _, pipe, path, _ = trained
    target = fresh()
    assert sorted(sd.load_lora(target, path)) == ["text_encoder", "unet"]
    for ours, expected in zip(run(target), run(pipe), strict=True):
        torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)
    sd.fuse_lora(target)  # and merged into the weights
    for ours, expected in zip(run(target), run(pipe), strict=True):
        torch.testing.assert_close(ours, expected, atol=TOL, rtol=0)


def test_diffusers_0_42_does_not_read_lycoris_files_for_stable_diffusion(trained):
    """diffusers' kohya converter renames lora_down / lora_up only (LoKr is read for Flux2 / Z-Image keys): it
    refuses the file rather than loading it wrongly. When a release reads it, compare its outputs here."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    _, _, path, _ = trained
    with pytest.raises(ValueError, match="have not been correctly renamed"):
        StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))


def test_a_lora_only_pipeline_is_refused_by_name(tmp_path):
    result = ex.main(steps=1, rank=2, method="lora", return_models=True)
    with pytest.raises(CheckpointError, match="No LoHa / LoKr adapter 'default'"):
        write_lycoris(result["pipe"], tmp_path / "x.safetensors")
