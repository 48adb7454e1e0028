"""Adversarial inputs to the Stable Diffusion integration (issue 15): bad scales, doubled module spellings,
malformed LyCORIS factors, oversized LoKr products, non-float and non-finite tensors.

Each test fails on the code before the fix: the error was a raw torch / Python exception, the adapter stayed
attached, one spelling silently won, or a LoKr file's Kronecker product was computed before its shape was checked.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from peftkit.errors import CheckpointError, ConfigError
from peftkit.integrations import diffusers as sd
from peftkit.integrations import kohya

pytest.importorskip("diffusers")
warnings.filterwarnings("ignore")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_sd_lora.py"
_spec = importlib.util.spec_from_file_location("train_sd_lora_reliability", EXAMPLE)
ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ex)

IDS = torch.randint(2, 100, (2, 16), generator=torch.Generator().manual_seed(0))
X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
T = torch.tensor([10, 500])
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 16 -> 16
Q_LDM = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"  # the same module, LDM spelling
Q1 = "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q"  # Linear 16 -> 16, second layer
TE_Q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # Linear 24 -> 24


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


def state(p) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(p, c).state_dict().items()}


def assert_untouched(p, before: dict[str, torch.Tensor]) -> None:
    after = state(p)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not sd.is_adapted(p.unet) and not sd.is_adapted(p.text_encoder)
    assert sd.list_adapters(p) == {}


def lora(stem: str, n_in: int, n_out: int, r: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{stem}.lora_down.weight": torch.randn(r, n_in, generator=g),
        f"{stem}.lora_up.weight": torch.randn(n_out, r, generator=g),
        f"{stem}.alpha": torch.tensor(float(r)),
    }


def write(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / f"{name}.safetensors"
    kohya.write_file(tensors, path, {})
    return path


# ---- (15) load_lora validates scale before attaching ------------------------------------------------------------
BAD_SCALES = [
    "strong",  # not a number
    float("nan"),
    {"unet": 1.0, "vae": 0.5},  # no such component
    {"unet": {"left": 1.0}},  # no such UNet block
    {"unet": {"down": {"blk_0": 0.5}}},  # misspelled block key (was silently ignored)
    {"unet": {"down": [0.5]}},  # one value per layer, but the block has two
    {"text_encoder": [1.0, 2.0]},  # a list is per-layer UNet syntax
]


@pytest.mark.parametrize("scale", BAD_SCALES, ids=[repr(s)[:30] for s in BAD_SCALES])
def test_load_lora_with_a_bad_scale_attaches_nothing(pipe, tmp_path, scale):
    path = write(tmp_path, "ok", {**lora(Q, 16, 16), **lora(Q1, 16, 16, seed=3), **lora(TE_Q, 24, 24, seed=1)})
    before = state(pipe)
    with pytest.raises(ConfigError, match=r"[Ss]cale"):
        sd.load_lora(pipe, path, "x", scale=scale)
    assert_untouched(pipe, before)


def test_a_bad_scale_on_a_second_load_keeps_the_first_adapter_as_it_was(pipe, tmp_path):
    sd.load_lora(pipe, write(tmp_path, "a", lora(Q, 16, 16)), "a", scale=0.5)
    with_a = run(pipe)
    with pytest.raises(ConfigError, match="not a finite number"):
        sd.load_lora(pipe, write(tmp_path, "b", lora(TE_Q, 24, 24, seed=2)), "b", scale=float("inf"))
    assert sd.list_adapters(pipe) == {"unet": ["a"]}
    assert sd.get_active_adapters(pipe) == ["a"]
    again = run(pipe)
    assert torch.equal(again[0], with_a[0]) and torch.equal(again[1], with_a[1])


def test_set_adapters_with_a_bad_weight_changes_no_scale(pipe, tmp_path):
    sd.load_lora(pipe, write(tmp_path, "a", {**lora(Q1, 16, 16), **lora(TE_Q, 24, 24, seed=1)}), "a")
    before = run(pipe)
    with pytest.raises(ConfigError, match=r"\[1\.0, 2\.0\].*not a finite number"):  # the UNet is set first
        sd.set_adapters(pipe, "a", {"unet": 0.0, "text_encoder": [1.0, 2.0]})
    after = run(pipe)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


# ---- (16) one module under two spellings ------------------------------------------------------------------------
def test_kohya_file_naming_one_module_twice_is_refused_naming_both_keys(pipe, tmp_path):
    path = write(tmp_path, "dup", {**lora(Q, 16, 16, seed=1), **lora(Q_LDM, 16, 16, seed=2)})
    before = state(pipe)
    with pytest.raises(CheckpointError, match=rf"{Q}\.\*.*{Q_LDM}\.\*.*two spellings"):
        sd.load_lora(pipe, path, "x")
    with pytest.raises(CheckpointError, match="two spellings"):  # the conversion path reads the same way
        sd.read_lora(path)
    assert_untouched(pipe, before)


def test_text_encoder_with_and_without_text_model_prefix_is_refused(pipe, tmp_path):
    short = "lora_te_encoder_layers_0_self_attn_q_proj"  # CLIP's 'text_model.' left out: the same module as TE_Q
    path = write(tmp_path, "dup", {**lora(TE_Q, 24, 24, seed=1), **lora(short, 24, 24, seed=2)})
    before = state(pipe)
    with pytest.raises(CheckpointError, match=r"'text_model\.encoder.*'encoder\.layers.*two spellings"):
        sd.load_lora(pipe, path, "x")
    assert_untouched(pipe, before)


def test_diffusers_file_naming_one_module_twice_is_refused(pipe, tmp_path):
    g = torch.Generator().manual_seed(0)
    p = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {
        f"{p}.lora_A.weight": torch.randn(2, 16, generator=g),
        f"{p}.lora_B.weight": torch.randn(16, 2, generator=g),
        f"{p}.lora.down.weight": torch.randn(2, 16, generator=g),
        f"{p}.lora.up.weight": torch.randn(16, 2, generator=g),
    }
    with pytest.raises(CheckpointError, match=r"(?=.*lora_A\.weight)(?=.*lora\.down\.weight).*two spellings"):
        sd.load_lora(pipe, write(tmp_path, "dup", tensors), "x")


# ---- (27) malformed kohya / LyCORIS tensors -----------------------------------------------------------------------
def test_non_scalar_alpha_is_a_checkpoint_error(pipe, tmp_path):
    tensors = {**lora(Q, 16, 16), f"{Q}.alpha": torch.tensor([1.0, 2.0])}
    with pytest.raises(CheckpointError, match=r"alpha has shape \(2,\).*one number"):
        sd.load_lora(pipe, write(tmp_path, "alpha", tensors), "x")


@pytest.mark.parametrize(
    ("tensors", "match"),
    [
        ({f"{Q}.lokr_w1": torch.randn(4), f"{Q}.lokr_w2": torch.randn(4, 16)}, r"lokr_w1 has shape \(4,\)"),
        ({f"{Q}.lokr_w1": torch.randn(2, 2), f"{Q}.lokr_w2_a": torch.randn(8), f"{Q}.lokr_w2_b": torch.randn(2, 8)},
         r"lokr_w2_a has shape \(8,\)"),
        ({f"{Q}.lokr_w1": torch.randn(2, 2), f"{Q}.lokr_w2_a": torch.randn(8, 3), f"{Q}.lokr_w2_b": torch.randn(2, 8)},
         r"the ranks differ"),
        ({f"{Q}.lora_down.weight": torch.randn(2, 16), f"{Q}.lora_up.weight": torch.randn(16)},
         r"lora_up has shape \(16,\)"),
    ],
    ids=["lokr-1d-w1", "lokr-1d-w2a", "lokr-rank", "lora-1d-up"],
)  # fmt: skip
def test_malformed_factors_are_checkpoint_errors(pipe, tmp_path, tensors, match):
    before = state(pipe)
    with pytest.raises(CheckpointError, match=match):
        sd.load_lora(pipe, write(tmp_path, "bad", tensors), "x")
    assert_untouched(pipe, before)


def test_mis_shaped_loha_tucker_core_is_a_checkpoint_error(pipe, tmp_path):
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # Conv2d 16 -> 16, 3x3
    tensors = {
        f"{conv}.hada_t1": torch.randn(3, 2, 3, 3),  # rank 3 here, rank 2 in the factors
        f"{conv}.hada_w1_a": torch.randn(2, 16), f"{conv}.hada_w1_b": torch.randn(2, 16),
        f"{conv}.hada_t2": torch.randn(2, 2, 3, 3),
        f"{conv}.hada_w2_a": torch.randn(2, 16), f"{conv}.hada_w2_b": torch.randn(2, 16),
    }  # fmt: skip
    with pytest.raises(CheckpointError, match=r"tucker core hada_t1 \(3, 2, 3, 3\) must be \(2, 2, kh, kw\)"):
        sd.load_lora(pipe, write(tmp_path, "tucker", tensors), "x")


@pytest.fixture
def no_kron(monkeypatch):
    """torch.kron that fails the test: a LoKr product must not be computed before its shape is checked."""

    def kron(*args, **kwargs):
        raise AssertionError("torch.kron ran before the LoKr shape was checked against the layer")

    monkeypatch.setattr(torch, "kron", kron)


def test_lokr_shape_is_checked_against_the_layer_before_the_product(pipe, tmp_path, no_kron):
    # kron((64, 64), (64, 64)) = (4096, 4096): 64 MiB for a 16 x 16 layer (scaled up, the 256 GiB)
    tensors = {f"{Q}.lokr_w1": torch.randn(64, 64), f"{Q}.lokr_w2": torch.randn(64, 64)}
    before = state(pipe)
    with pytest.raises(CheckpointError, match=r"does not fit.*\(4096, 4096\)"):
        sd.load_lora(pipe, write(tmp_path, "big", tensors), "x")
    assert_untouched(pipe, before)


def test_huge_lokr_product_is_refused_without_a_model_too(tmp_path, no_kron):
    # 2 MiB of factors asking for a (2**18, 2**18) delta: 256 GiB of float32
    tensors = {f"{Q}.lokr_w1": torch.randn(512, 512), f"{Q}.lokr_w2": torch.randn(512, 512)}
    with pytest.raises(CheckpointError, match=r"\(262144, 262144\) weight delta.*crafted or corrupt"):
        sd.kohya_to_peftkit(write(tmp_path, "huge", tensors), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_fitting_lokr_file_still_loads_to_the_kronecker_product(pipe, tmp_path):
    w1, w2 = torch.randn(4, 2), torch.randn(4, 8)
    sd.load_lora(pipe, write(tmp_path, "ok", {f"{Q}.lokr_w1": w1, f"{Q}.lokr_w2": w2}), "k")
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    original = layer.get_base_layer().weight.clone()
    sd.fuse_lora(pipe)
    torch.testing.assert_close(layer.get_base_layer().weight - original, torch.kron(w1, w2), atol=1e-5, rtol=1e-5)


# ---- (17) dtype and finiteness of file tensors --------------------------------------------------------------------
def _poisoned(kind: str) -> dict[str, torch.Tensor]:
    tensors = lora(Q, 16, 16)
    up = f"{Q}.lora_up.weight"
    if kind == "nan":
        tensors[up][0, 0] = float("nan")
    elif kind == "inf":
        tensors[up][3, 1] = float("-inf")
    elif kind == "int":
        tensors[up] = torch.randint(-3, 3, (16, 2))
    elif kind == "bool":
        tensors[f"{Q}.lora_down.weight"] = torch.ones(2, 16, dtype=torch.bool)
    else:  # a boolean alpha is no number either
        tensors[f"{Q}.alpha"] = torch.tensor(True)
    return tensors


@pytest.mark.parametrize(
    ("kind", "match"),
    [("nan", "NaN or infinite"), ("inf", "NaN or infinite"), ("int", "torch.int64"), ("bool", "torch.bool"),
     ("bool-alpha", "torch.bool")],
)  # fmt: skip
def test_kohya_file_with_non_float_or_non_finite_tensors_is_refused(pipe, tmp_path, kind, match):
    before = state(pipe)
    with pytest.raises(CheckpointError, match=match):
        sd.load_lora(pipe, write(tmp_path, kind, _poisoned(kind)), "x")
    assert_untouched(pipe, before)


def test_diffusers_file_with_inf_is_refused(pipe, base, tmp_path):
    p = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{p}.lora_A.weight": torch.randn(2, 16), f"{p}.lora_B.weight": torch.full((16, 2), float("inf"))}
    with pytest.raises(CheckpointError, match=r"lora_B\.weight.*NaN or infinite"):
        sd.load_lora(pipe, write(tmp_path, "inf", tensors), "x")
    with pytest.raises(CheckpointError, match="NaN or infinite"):  # the conversion path too
        sd.diffusers_to_kohya(tmp_path / "inf.safetensors", tmp_path / "out.safetensors")


def test_integer_alpha_of_older_kohya_files_still_loads(pipe, tmp_path):
    tensors = {**lora(Q, 16, 16), f"{Q}.alpha": torch.tensor(1)}  # int64, as kohya wrote alpha = rank
    sd.load_lora(pipe, write(tmp_path, "int_alpha", tensors), "x")
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert layer.scaling["x"] == pytest.approx(0.5)  # alpha 1 / rank 2
