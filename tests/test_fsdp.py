"""FSDP2 (src/peftkit/train/fsdp.py) on CPU: 2 processes with gloo shard a LoRA model per transformer block and
follow one plain process on the same global batch; the gathered adapter saves and reloads like an unsharded one;
`peftkit train --fsdp` under torchrun matches a one-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_runs as T
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import models as M
from peftkit import LoraConfig, PeftModel, get_peft_model
from peftkit.errors import ConfigError
from peftkit.train import TrainConfig, Trainer, train

WORLD, ROWS, LENGTH, STEPS, LR, CLIP = 2, 8, 12, 4, 5e-2, 0.2
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "task_type": "SEQ_CLS"}


def make_model() -> PeftModel:
    # Tiny BERT: BertEmbeddings and BertLayer are its blocks; each BertLayer unit mixes frozen base weights with
    # trainable LoRA weights, and the root unit mixes the frozen pooler with the trainable classifier head.
    # eval(): no dropout, so both runs compute the same function.
    return get_peft_model(M.tiny_bert(), LoraConfig(**LORA)).eval()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(1, M.VOCAB, (ROWS, LENGTH), generator=g), torch.randint(0, 3, (ROWS,), generator=g)


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def run_steps(pm: PeftModel, rows: slice) -> tuple[list[float], list[float]]:
    """AdamW with gradient clipping on ``rows`` of each global batch; the mean loss over processes per step."""
    params = [p for p in pm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    losses, norms = [], []
    for step in range(STEPS):
        ids, labels = batch(step)
        loss = pm(input_ids=ids[rows], attention_mask=torch.ones_like(ids[rows]), labels=labels[rows]).loss
        loss.backward()
        norms.append(float(full(torch.nn.utils.clip_grad_norm_(params, CLIP))))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        if dist.is_initialized():
            dist.all_reduce(total)  # gloo has no AVG
            total /= dist.get_world_size()
        losses.append(float(total))
    return losses, norms


def logits(pm: PeftModel) -> torch.Tensor:
    ids, _ = batch(0)
    with torch.no_grad():
        return pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _worker(rank: int, store: str, out: Path) -> None:
    from peftkit.train import fsdp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"file://{store}")
    try:
        pm = fsdp.shard(make_model())
        with fsdp.gathered_adapter(pm):
            initial = {k: v.detach().clone() for k, v in pm.adapter_state_dict("default").items()}
        per = ROWS // WORLD
        losses, norms = run_steps(pm, slice(rank * per, (rank + 1) * per))
        with fsdp.gathered_adapter(pm):
            trained = {k: v.detach().clone() for k, v in pm.adapter_state_dict("default").items()}
        local = pm.adapter_state_dict("default")["bert.encoder.layer.0.attention.self.query.lora_B.weight"]
        fsdp.save_pretrained(pm, out / f"rank{rank}")  # each rank names its own folder: only rank 0's may appear
        # Loading whole tensors into the shards: back to the initial adapter gives the untrained model's outputs.
        fsdp.load_adapter_tensors(pm.adapter_state_dict("default"), initial)
        reloaded = logits(pm)  # a sharded forward: both ranks run it
        try:  # LoRA's bias="all" keeps references to base biases, which sharding replaces
            fsdp.shard(get_peft_model(M.tiny_bert(), LoraConfig(**LORA, bias="all")))
            refused = ""
        except ConfigError as err:
            refused = str(err)
        if rank == 0:
            result = {"losses": losses, "norms": norms, "trained": trained, "reloaded_logits": reloaded}
            result["refused"] = refused
            torch.save({**result, "local_shape": tuple(local.to_local().shape)}, out / "result.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("fsdp")
    # fork: the children inherit the imports (spawn re-imports torch and transformers: ~10 s more).
    mp.start_processes(_worker, args=(str(out / "store"), out), nprocs=WORLD, join=True, start_method="fork")
    return out, torch.load(out / "result.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, PeftModel, torch.Tensor, list[float], list[float]]:
    """One plain process, the whole global batch at every step."""
    out = tmp_path_factory.mktemp("reference")
    pm = make_model()
    before = logits(pm)
    losses, norms = run_steps(pm, slice(0, ROWS))
    pm.save_pretrained(out)
    return out, pm, before, losses, norms


def test_two_sharded_processes_follow_one_process(sharded, reference):
    (_, got), (_, pm, _, losses, norms) = sharded, reference
    assert got["local_shape"] == (16, 4)  # lora_B (32, 4) split along dim 0 over 2 processes: really sharded
    assert got["losses"] == pytest.approx(losses, abs=1e-5)
    # The norms pin the gradients' scale (AdamW alone would hide a sum instead of a mean over processes).
    assert got["norms"] == pytest.approx(norms, rel=1e-5)
    assert norms[0] > CLIP  # the clipping acted, on the norm over both processes' shards
    expected = pm.adapter_state_dict("default")
    assert set(got["trained"]) == set(expected)
    assert {k for k in expected if "lora_A" in k} and {"classifier.weight", "classifier.bias"} <= set(expected)
    for key, value in expected.items():
        # AdamW divides by the gradient's running scale, so rounding in tiny early gradients shows at ~1e-6.
        torch.testing.assert_close(got["trained"][key], value.detach(), atol=1e-5, rtol=0, msg=key)
    assert min(v.abs().max() for k, v in expected.items() if "lora_B" in k) > 0.1  # trained away from B = 0


def test_rank_zero_saves_the_full_adapter_that_reloads(sharded, reference):
    (out, got), (ref_dir, pm, before, _, _) = sharded, reference
    assert (out / "rank0" / "adapter_model.safetensors").is_file() and not (out / "rank1").exists()
    saved, expected = (
        load_file(out / "rank0" / "adapter_model.safetensors"),
        load_file(ref_dir / "adapter_model.safetensors"),
    )
    assert set(saved) == set(expected)
    for key in expected:
        torch.testing.assert_close(saved[key], expected[key], atol=1e-5, rtol=0, msg=key)
    config = json.loads((out / "rank0" / "adapter_config.json").read_text())
    assert config == json.loads((ref_dir / "adapter_config.json").read_text())
    reloaded = PeftModel.from_pretrained(M.tiny_bert(), out / "rank0")
    torch.testing.assert_close(logits(reloaded), logits(pm), atol=1e-5, rtol=1e-5)
    # load_adapter_tensors put the initial adapter back into the shards: the untrained outputs again.
    torch.testing.assert_close(got["reloaded_logits"], before, atol=1e-5, rtol=1e-5)


def test_adapters_holding_base_parameters_are_refused(sharded):
    assert "'default'" in sharded[1]["refused"] and "without FSDP" in sharded[1]["refused"]


# ---- peftkit train --fsdp -------------------------------------------------------------------------------------------
RUN = {"method": "lora", "method_args": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}}
BUDGET = {"max_steps": 6, "lr": 1e-1, "eval_steps": 2, "threads": 1, "progress": False}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp_train")
    return {"bert": T.bert_folder(root / "bert"), "csv": T.write_csv(root / "sentiment.csv", T.sentiment_rows(240))}


def test_train_with_fsdp_matches_one_process(files, tmp_path):
    """torchrun, 2 processes x 4 rows, sharded, equals one unsharded process x 8 rows: losses, every evaluation and
    the adapter written. The best evaluation is step 2 of 6
    (lr 1e-1; since the stratified dev split, 3e-2 peaks at the last step), so the best adapter is saved from the
    shards, read back
    into them at the end and written again as the final adapter."""
    (tmp_path / "run.yaml").write_text(json.dumps(RUN))  # method settings in YAML: see test_train's DDP test
    args = ["--config", str(tmp_path / "run.yaml"), "--model", str(files["bert"]), "--data", str(files["csv"]),
            "--max-steps", "6", "--lr", "1e-1", "--eval-steps", "2", "--no-progress", "--threads", "1"]  # fmt: skip
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "peftkit.cli.main"]
    done = subprocess.run(
        [*command, "train", *args, "--fsdp", "--batch-size", "4", "--output-dir", str(tmp_path / "fsdp")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    single = train(TrainConfig(model=str(files["bert"]), data=str(files["csv"]), batch_size=8,
                               output_dir=str(tmp_path / "one"), **RUN, **BUDGET))  # fmt: skip
    multi = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert single.best_step == multi["best_step"] == 2
    assert multi["history"]["train_loss"] == pytest.approx(single.history["train_loss"], abs=1e-5)
    assert [e["accuracy"] for e in multi["history"]["eval"]] == [e["accuracy"] for e in single.history["eval"]]
    assert multi["trainable_params"] == single.trainable_params  # counted over the shards, not one shard
    saved = load_file(tmp_path / "fsdp" / "adapter_model.safetensors")
    expected = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert set(saved) == set(expected)
    for key in expected:
        torch.testing.assert_close(saved[key], expected[key], atol=1e-5, rtol=0, msg=key)
    assert TrainConfig.from_yaml(tmp_path / "fsdp" / "train_config.yaml").fsdp


def test_fsdp_refusals_name_the_fix(files, tmp_path, monkeypatch):
    settings = {"model": str(files["bert"]), "data": str(files["csv"]), "output_dir": str(tmp_path), **RUN, **BUDGET}
    with pytest.raises(ConfigError, match="torchrun"):  # one process without a process group
        Trainer(TrainConfig(**settings, fsdp=True))
    with pytest.raises(ConfigError, match="drop --save-steps"):
        Trainer(TrainConfig(**settings, fsdp=True, save_steps=2))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="pass --fsdp"):
        Trainer(TrainConfig(**settings))
