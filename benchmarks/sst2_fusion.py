"""AdapterFusion on the real MiniLM: Pfeiffer adapters trained on SST-2 and MRPC, fused and trained on SST-2.

    python benchmarks/sst2_fusion.py                    # defaults below, one thread, about 4 minutes
    python benchmarks/sst2_fusion.py --sst2-rows 2000 --fusion-rows 960 --threads 2

Steps (Pfeiffer et al. 2021, AdapterFusion, section 3): a Pfeiffer adapter "sst2" with its own head on the first
``--sst2-rows`` SST-2 training rows; a Pfeiffer adapter "mrpc" with its own head on the first ``--mrpc-rows`` MRPC
sentence pairs; each one epoch, batch 32, AdamW with a linear decay. Then the fusion
``BottleneckConfig(fusion_of=["sst2", "mrpc"])`` under ``Fusion("sst2", "mrpc")``: its head copy starts from the
trained SST-2 head and only the fusion layers and that head train, on the first ``--fusion-rows`` of the SST-2 rows
the sst2 adapter already saw (no new data). Reports dev accuracy of sst2 alone and of the fusion (872 sentences),
checks that both fused adapters stay bit-identical, saves the PeftModel, reloads it with
``PeftModel.from_pretrained`` on a fresh base model and compares the logits. Reads ../shared/data/{sst2,mrpc} (or
$PEFTKIT_DATA); writes the checkpoint under --out.

Measured (1 thread on 2 shared CPU cores, torch 2.13, seed 0; `python benchmarks/sst2_fusion.py`):

    MiniLM, batch 32, threads 1; dev: SST-2 872, MRPC 408
    stage     rows steps      lr  trainable  loss first->last  train s  dev accuracy
    sst2      2000    63   5e-03    113,810    0.697->0.459        48.9  SST-2 0.7523
    mrpc      1000    32   5e-03    113,810    0.653->0.623        51.8  MRPC 0.6838 (majority 0.6838)
    fusion     960    30   5e-04  2,661,890    0.517->0.398        36.9  SST-2 0.7798
    SST-2 dev accuracy: sst2 alone 0.7523, Fusion('sst2', 'mrpc') 0.7798 (+2.75 points)
    fused adapters bit-identical after fusion training: True
    saved runs/sst2_fusion: composition.json, mrpc, sst2, sst2,mrpc
    reloaded: composition Fusion('sst2', 'mrpc', name='sst2,mrpc'), active ['sst2', 'mrpc', 'sst2,mrpc']
    logits identical on 872 dev sentences: True (max |diff| 0.00e+00)
    control    960    30   5e-04    113,810    0.431->0.393        24.0  SST-2 0.7810
    control: sst2 alone after the fusion's extra steps 0.7810, Fusion 0.7798 (-0.11 points)

The fusion's +2.75 points over sst2 alone are the extra 30 steps, not the fusion: the control (the sst2 adapter and
its head trained on the same 960 rows at the same rate) reaches 78.10 %. The MRPC adapter, after one epoch on 1,000
pairs, predicts the majority class, so it has little to offer; the run shows that a fusion trains, leaves the fused
adapters untouched, saves and reloads, not that MRPC helps SST-2. Repeated runs give the same numbers (seed 0).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import time
import warnings
from pathlib import Path

import torch
from common import DATA_ROOT, minilm_folder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

DATA = DATA_ROOT
Row = tuple[str, str | None, int]  # (sentence or first of a pair, second of a pair or None, label)


def read_sst2(path: Path, limit: int | None = None) -> list[Row]:
    """The first ``limit`` rows of an SST-2 file (columns sentence, label)."""
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["sentence"], None, int(r["label"])) for r in rows[:limit]]


def read_mrpc(path: Path, limit: int | None = None) -> list[Row]:
    """The first ``limit`` sentence pairs of an MRPC file (GLUE layout, UTF-8 with a BOM, literal quotes)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["#1 String"], r["#2 String"], int(r["Quality"])) for r in rows[:limit]]


def encode(tok, rows: list[Row], max_length: int) -> dict[str, torch.Tensor]:
    first = [r[0] for r in rows]
    second = [r[1] for r in rows] if rows[0][1] is not None else None
    return tok(first, second, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def train(pm, tok, rows: list[Row], lr: float, batch: int, max_length: int, seed: int = 0) -> list[float]:
    """One epoch over ``rows`` (shuffled with ``seed``) on the parameters that require grad; the batch losses."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    params = [p for p in pm.parameters() if p.requires_grad]
    steps = (len(rows) + batch - 1) // batch
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    losses = []
    pm.train()
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        loss = pm(**encode(tok, chunk, max_length), labels=torch.tensor([r[2] for r in chunk])).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def predict(pm, tok, rows: list[Row], max_length: int, batch: int = 64) -> torch.Tensor:
    pm.eval()
    return torch.cat([pm(**encode(tok, rows[i : i + batch], max_length)).logits for i in range(0, len(rows), batch)])


def accuracy(logits: torch.Tensor, rows: list[Row]) -> float:
    return (logits.argmax(-1) == torch.tensor([r[2] for r in rows])).float().mean().item()


def snapshot(pm, name: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pm.adapter_state_dict(name).items()}


def trainable_count(pm) -> int:
    return sum(p.numel() for p in pm.parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sst2-rows", type=int, default=2000)
    parser.add_argument("--mrpc-rows", type=int, default=1000)
    parser.add_argument("--fusion-rows", type=int, default=960, help="the first rows of the SST-2 training rows")
    parser.add_argument("--adapter-lr", type=float, default=5e-3)
    parser.add_argument("--fusion-lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/sst2_fusion")
    parser.add_argument(
        "--no-control", dest="control", action="store_false",
        help="skip the control run (the sst2 adapter alone trained on the fusion's rows at the fusion's rate)",
    )  # fmt: skip
    args = parser.parse_args()
    missing = [str(DATA / d) for d in ("sst2", "mrpc") if not (DATA / d).is_dir()]
    if missing:
        raise SystemExit(
            f"needs the data folders {missing}; set PEFTKIT_DATA to the folder that holds sst2/ and mrpc/."
        )
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    from peftkit import BottleneckConfig, Fusion, PeftModel, get_peft_model

    folder = minilm_folder()
    logging.set_verbosity_error()  # the load report of the fresh classifier head
    logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(folder)
    pm = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2),
        BottleneckConfig(preset="pfeiffer", task_type="SEQ_CLS"),
        adapter_name="sst2",
    )
    sst2_train = read_sst2(DATA / "sst2" / "train.tsv", args.sst2_rows)
    sst2_dev = read_sst2(DATA / "sst2" / "dev.tsv")
    mrpc_train = read_mrpc(DATA / "mrpc" / "train.tsv", args.mrpc_rows)
    mrpc_dev = read_mrpc(DATA / "mrpc" / "dev.tsv")
    majority = max(sum(r[2] for r in mrpc_dev), sum(1 - r[2] for r in mrpc_dev)) / len(mrpc_dev)
    print(f"MiniLM, batch {args.batch}, threads {args.threads}; dev: SST-2 {len(sst2_dev)}, MRPC {len(mrpc_dev)}")
    print(f"{'stage':<8} {'rows':>5} {'steps':>5} {'lr':>7} {'trainable':>10} {'loss first->last':>17} "
          f"{'train s':>8}  dev accuracy")  # fmt: skip

    def report(stage: str, rows: int, lr: float, losses: list[float], seconds: float, result: str) -> None:
        head, tail = sum(losses[:5]) / len(losses[:5]), sum(losses[-5:]) / len(losses[-5:])
        print(f"{stage:<8} {rows:>5} {len(losses):>5} {lr:>7.0e} {trainable_count(pm):>10,d} "
              f"{head:>8.3f}->{tail:<8.3f} {seconds:>8.1f}  {result}", flush=True)  # fmt: skip

    start = time.perf_counter()
    losses = train(pm, tok, sst2_train, args.adapter_lr, args.batch, 64)
    seconds = time.perf_counter() - start
    sst2_alone = accuracy(predict(pm, tok, sst2_dev, 64), sst2_dev)
    report("sst2", len(sst2_train), args.adapter_lr, losses, seconds, f"SST-2 {sst2_alone:.4f}")

    pm.add_adapter("mrpc", BottleneckConfig(preset="pfeiffer", task_type="SEQ_CLS"))
    pm.set_adapter("mrpc")
    start = time.perf_counter()
    losses = train(pm, tok, mrpc_train, args.adapter_lr, args.batch, 128)
    seconds = time.perf_counter() - start
    mrpc_acc = accuracy(predict(pm, tok, mrpc_dev, 128), mrpc_dev)
    report("mrpc", len(mrpc_train), args.adapter_lr, losses, seconds, f"MRPC {mrpc_acc:.4f} (majority {majority:.4f})")

    frozen = {name: snapshot(pm, name) for name in ("sst2", "mrpc")}
    pm.add_adapter("sst2,mrpc", BottleneckConfig(fusion_of=["sst2", "mrpc"], task_type="SEQ_CLS"))
    head = pm.get_base_model().classifier
    head.modules_to_save["sst2,mrpc"].load_state_dict(head.modules_to_save["sst2"].state_dict())  # the SST-2 head
    pm.set_adapter(Fusion("sst2", "mrpc"))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    if not all("bottleneck_fusion" in n or "modules_to_save.sst2,mrpc." in n for n in trainable):
        raise SystemExit(f"unexpected trainable parameters under the fusion: {trainable}")
    start = time.perf_counter()
    losses = train(pm, tok, sst2_train[: args.fusion_rows], args.fusion_lr, args.batch, 64)
    seconds = time.perf_counter() - start
    fused_logits = predict(pm, tok, sst2_dev, 64)
    fused = accuracy(fused_logits, sst2_dev)
    report("fusion", min(args.fusion_rows, len(sst2_train)), args.fusion_lr, losses, seconds, f"SST-2 {fused:.4f}")
    unchanged = all(
        torch.equal(before[k], now) for name, before in frozen.items() for k, now in snapshot(pm, name).items()
    )
    print(f"SST-2 dev accuracy: sst2 alone {sst2_alone:.4f}, Fusion('sst2', 'mrpc') {fused:.4f} "
          f"({100 * (fused - sst2_alone):+.2f} points)\n"
          f"fused adapters bit-identical after fusion training: {unchanged}")  # fmt: skip

    out = Path(args.out)
    pm.save_pretrained(out)
    print(f"saved {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    loaded = PeftModel.from_pretrained(base, out)
    reloaded = predict(loaded, tok, sst2_dev, 64)
    print(f"reloaded: composition {loaded._composition!r}, active {loaded.active_adapters}\nlogits identical on "
          f"{len(sst2_dev)} dev sentences: {torch.equal(reloaded, fused_logits)} (max |diff| "
          f"{(reloaded - fused_logits).abs().max().item():.2e})")  # fmt: skip

    if args.control:  # the same extra steps for the sst2 adapter and its head alone: is the gain the fusion's?
        pm.set_adapter("sst2")
        start = time.perf_counter()
        losses = train(pm, tok, sst2_train[: args.fusion_rows], args.fusion_lr, args.batch, 64)
        seconds = time.perf_counter() - start
        control = accuracy(predict(pm, tok, sst2_dev, 64), sst2_dev)
        report(
            "control", min(args.fusion_rows, len(sst2_train)), args.fusion_lr, losses, seconds, f"SST-2 {control:.4f}"
        )
        print(f"control: sst2 alone after the fusion's extra steps {control:.4f}, Fusion {fused:.4f} "
              f"({100 * (fused - control):+.2f} points)")  # fmt: skip


if __name__ == "__main__":
    main()
