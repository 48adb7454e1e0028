"""Short SST-2 runs of (IA)3, BitFit, layer freezing and diff pruning on the real MiniLM (dev accuracy >= 75 %).

    python benchmarks/sst2_ia3_bitfit.py                      # both methods, 2,000 training rows, one epoch
    python benchmarks/sst2_ia3_bitfit.py --methods freeze diff # last 2 blocks; diff pruning finalized at 0.5 %
    python benchmarks/sst2_ia3_bitfit.py --methods bitfit --rows 500

Same budget for every method: the first ``--rows`` shuffled rows of SST-2 train (seed 0), one epoch, batch 32,
AdamW with a linear decay, max length 64; accuracy on the 872 dev sentences. A plain torch loop, so the numbers
depend only on the method. Reads ../shared/data/sst2 (or $PEFTKIT_DATA/sst2).

Measured (2 CPU cores, quiet machine, torch 2.13, seed 0; `python benchmarks/sst2_ia3_bitfit.py --methods ia3 bitfit
freeze diff`). Diff pruning counts its delta and gates while training; after finalize it keeps 0.5 % of the entries.

    method        lr  trainable   share  dev acc  train s
    ia3        1e-02     16,898   0.07%    0.753     28.0
    bitfit     5e-03     26,882   0.12%    0.750     28.5
    freeze     5e-04  3,549,698  13.52%    0.784     24.1
    diff       1e-04 45,427,202  66.67%    0.765     73.3
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch
from common import DATA_ROOT, minilm_folder, read_sst2

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

DATA = DATA_ROOT / "sst2"
# (IA)3 and BitFit train few parameters: high rates, as in the papers' sweeps; freezing trains whole blocks.
LEARNING_RATES = {"ia3": 1e-2, "bitfit": 5e-3, "freeze": 5e-4, "diff": 1e-4}


def config_for(method: str):
    from peftkit import BitFitConfig, DiffPruningConfig, IA3Config, LayerFreezeConfig

    if method == "ia3":
        return IA3Config(task_type="SEQ_CLS")  # peft's BERT defaults: key, value, output.dense
    if method == "freeze":
        return LayerFreezeConfig(trainable_layers=2, task_type="SEQ_CLS")  # the last 2 of 6 blocks + the head
    if method == "diff":
        # every weight; finalized at 3/4 of the batches. stage2_lr=None: param_groups keeps the rate given below
        return DiffPruningConfig(target_density=0.005, stage2_lr=None, task_type="SEQ_CLS")
    return BitFitConfig(task_type="SEQ_CLS")  # every bias + the head


def run(method: str, rows: int, batch: int, folder: Path) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit import get_peft_model

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    pm = get_peft_model(model, config_for(method))
    trainable, total = pm.get_nb_trainable_parameters()
    texts, labels = read_sst2(DATA / "train.tsv", rows)
    dev_texts, dev_labels = read_sst2(DATA / "dev.tsv")
    params = [p for p in pm.parameters() if p.requires_grad]
    steps = (len(texts) + batch - 1) // batch
    if method == "diff":  # the gates learn at their own rate (gate_lr), as in the paper
        from peftkit.methods.diff_pruning import param_groups

        params = param_groups(pm, lr=LEARNING_RATES[method])
    opt = torch.optim.AdamW(params, lr=LEARNING_RATES[method], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    # diff pruning's two stages in one budget (paper, section 3.2): the first 3/4 of the batches with the L0 term,
    # then finalize to exactly 0.5 % of the entries and train the last 1/4 with that mask fixed.
    finalize_at = (3 * steps // 4) * batch if method == "diff" else None
    start = time.perf_counter()
    pm.train()
    for i in range(0, len(texts), batch):
        if i == finalize_at:
            pm.finalize(0.005)
            stage2 = 10 * LEARNING_RATES[method]  # 0.5 % of the entries: a sparse delta takes a larger step
            opt = torch.optim.AdamW(param_groups(pm, lr=stage2), lr=stage2)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (steps - 3 * steps // 4))
        enc = tok(texts[i : i + batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = pm(**enc, labels=torch.tensor(labels[i : i + batch])).loss + pm.auxiliary_loss()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    train_s = time.perf_counter() - start
    pm.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dev_texts), 64):
            enc = tok(dev_texts[i : i + 64], padding=True, truncation=True, max_length=64, return_tensors="pt")
            pred = pm(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor(dev_labels[i : i + 64])).sum())
    return {"trainable": trainable, "total": total, "acc": correct / len(dev_texts), "train_s": train_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["ia3", "bitfit"], choices=sorted(LEARNING_RATES))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="learning rate for every method (default: per method)")
    args = parser.parse_args()
    if args.lr is not None:
        LEARNING_RATES.update(dict.fromkeys(args.methods, args.lr))
    if not DATA.is_dir():
        raise SystemExit(f"SST-2 not found at {DATA}; set PEFTKIT_DATA to the folder that holds sst2/.")
    folder = minilm_folder()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(f"SST-2, MiniLM, {args.rows} training rows, 1 epoch, batch {args.batch}, dev 872 rows")
    print(f"{'method':<8} {'lr':>7} {'trainable':>10} {'share':>7} {'dev acc':>8} {'train s':>8}", flush=True)
    for method in args.methods:
        r = run(method, args.rows, args.batch, folder)
        share = 100 * r["trainable"] / r["total"]
        lr = LEARNING_RATES[method]
        print(
            f"{method:<8} {lr:>7.0e} {r['trainable']:>10,d} {share:>6.2f}% {r['acc']:>8.3f} {r['train_s']:>8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
