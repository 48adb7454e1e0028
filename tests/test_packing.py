"""Packing and length-grouped batching (issue 17 item 2): a packed batch gives every example the logits, and so
the per-token loss, it has alone; --group-by-length keeps the seeded, resumable batch order and cuts padding."""

from __future__ import annotations

import random

import pytest
import tiny_runs as T
import torch
from torch import nn

from models import tiny_llama
from peftkit import LoraConfig, get_peft_model
from peftkit.errors import ConfigError
from peftkit.train import TrainConfig, packing, train
from peftkit.train import data as D

IGNORE = D.IGNORE


def examples(n: int, seed: int = 0, vocab: int = 100) -> list[dict]:
    """Encoded causal-LM rows of 2..24 tokens; the first 0..half of each is a prompt (IGNORE labels)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(1, vocab) for _ in range(rng.randint(2, 24))]
        prompt = rng.randint(0, len(ids) // 2)
        out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position next-token cross-entropy (0 where the next label is IGNORE), shape (B, T - 1)."""
    return nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none")


def test_rows_hold_whole_examples_with_positions_restarting():
    rows = examples(40)
    packed = packing.pack(rows, max_length=48)
    assert all(len(r["input_ids"]) <= 48 for r in packed) and len(packed) < len(rows) / 2
    pieces = []
    for r in packed:
        start = 0
        assert sum(r["seq_lens"]) == len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"])
        for n in r["seq_lens"]:
            assert r["position_ids"][start : start + n] == list(range(n))
            assert r["labels"][start] == IGNORE  # the previous example never predicts this one's first token
            pieces.append((tuple(r["input_ids"][start : start + n]), tuple(r["labels"][start + 1 : start + n])))
            start += n
    assert sorted(pieces) == sorted((tuple(e["input_ids"]), tuple(e["labels"][1:])) for e in rows)
    batch = packing.collate_packed(packed[:2], pad_id=0)
    mask = batch["attention_mask"]
    first = packed[0]["seq_lens"][0]
    assert mask.shape == (2, 1, batch["input_ids"].shape[1], batch["input_ids"].shape[1])
    assert mask[0, 0, first, first - 1] < -1e30 and mask[0, 0, first, first] == 0  # no look back into the last one
    assert mask[0, 0, 1, 2] < -1e30 and mask[0, 0, 2, 1] == 0  # causal inside an example


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_per_token_loss_equals_unpacked(attention):
    torch.manual_seed(0)
    model = get_peft_model(
        tiny_llama(attn_implementation=attention), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)  # a live adapter
    rows = examples(12, seed=1)
    packed_rows = packing.pack(rows, max_length=40)
    batch = D.collate(packed_rows, pad_id=0)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    packed_losses = token_losses(logits, batch["labels"])
    alone, packed = [], []
    by_ids = {tuple(e["input_ids"]): e for e in rows}
    for b, r in enumerate(packed_rows):
        start = 0
        for n in r["seq_lens"]:
            e = by_ids[tuple(r["input_ids"][start : start + n])]
            single = D.collate([e], pad_id=0)
            mine = token_losses(model(input_ids=single["input_ids"]).logits, single["labels"])[0]
            alone.append(mine)
            packed.append(packed_losses[b, start : start + n - 1])
            start += n
    assert len(alone) == len(rows)
    assert (torch.cat(packed) - torch.cat(alone)).abs().max() < 1e-5
    unpacked = D.collate(rows, pad_id=0)  # the same rows as one padded batch: the model's mean loss agrees too
    assert model(**batch).loss.item() == pytest.approx(model(**unpacked).loss.item(), abs=1e-5)
    model.zero_grad()
    model(**batch).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model(**unpacked).loss.backward()
    for name, grad in grads.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-5), name


# ---- --group-by-length ---------------------------------------------------------------------------------------
def test_group_by_length_covers_the_rows_with_less_padding():
    lengths = [random.Random(i).randint(3, 120) for i in range(1000)]
    plain = D.epoch_batches(1000, 16, epoch=2, seed=3)
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(3 * 1000 + 2)).tolist()
    assert plain == [order[i * 16 : (i + 1) * 16] for i in range(62)]  # unchanged without lengths (resume)
    grouped = D.epoch_batches(1000, 16, epoch=2, seed=3, lengths=lengths)
    flat = [i for b in grouped for i in b]
    assert len(grouped) == 62 and len(flat) == len(set(flat)) == 992

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(grouped) < 0.7 * padded(plain)
    assert grouped == D.epoch_batches(1000, 16, epoch=2, seed=3, lengths=lengths)
    assert grouped != D.epoch_batches(1000, 16, epoch=3, seed=3, lengths=lengths)
    ranks = [D.epoch_batches(1000, 8, epoch=2, seed=3, world=2, rank=r, lengths=lengths) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == grouped
    firsts = [max(lengths[i] for i in b) for b in grouped[:10]]
    assert firsts != sorted(firsts, reverse=True)  # the batches come in a shuffled order, not longest first


# ---- through the trainer -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    return {"llama": T.llama_folder(root / "llama"), "inst": T.write_json(root / "inst.json", T.instruction_rows(96))}


def lm_config(files, out, **changes) -> TrainConfig:
    settings = dict(
        model=str(files["llama"]), data=str(files["inst"]), output_dir=str(out), batch_size=4, lr=3e-2, max_steps=30,
        method_args={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, progress=False, threads=1,
        max_length=64,
    )  # fmt: skip
    return TrainConfig(**{**settings, **changes})


def test_packing_and_group_by_length_train(files, tmp_path):
    packed = train(lm_config(files, tmp_path / "packed", packing=True))
    assert packed.after["loss"] < packed.before["loss"] - 0.2
    grouped = train(lm_config(files, tmp_path / "grouped", group_by_length=True))
    assert grouped.after["loss"] < grouped.before["loss"] - 0.2
    assert grouped.before["loss"] == pytest.approx(packed.before["loss"])  # the dev set is never packed


def test_packing_refuses_classification_and_prompt_methods(files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(files["llama"])
    with pytest.raises(ConfigError, match=r"--packing with --method 'prefix_tuning'.*lora"):
        D.prepare(TrainConfig(data=str(files["inst"]), method="prefix_tuning", packing=True), tok)
    assert D.prepare(TrainConfig(data=str(files["inst"]), packing=True, max_length=64), tok).train[0]["seq_lens"]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_float32_mask_works_with_bf16_weights(attention):
    """--dtype bf16 loads the base in bf16: the float32 4-D mask must still apply. Each example's logits in the
    packed batch stay within bf16 rounding (0.1) of its logits alone; attending across examples moves them by ~6."""
    model = tiny_llama(attn_implementation=attention, initializer_range=0.2).to(torch.bfloat16)
    packed_rows = packing.pack(examples(6, seed=2), max_length=40)
    batch = D.collate(packed_rows, pad_id=0)
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
    for b, r in enumerate(packed_rows):
        start = 0
        for n in r["seq_lens"]:
            alone = model(input_ids=torch.tensor([r["input_ids"][start : start + n]])).logits[0].float()
            assert (logits[b, start : start + n] - alone).abs().max() < 0.1
            start += n
