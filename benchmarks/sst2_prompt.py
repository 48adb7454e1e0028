"""Short SST-2 runs of prompt tuning and prefix tuning on the real MiniLM (both must beat the majority class).

    python benchmarks/sst2_prompt.py                              # both methods, 2,000 rows, one epoch
    python benchmarks/sst2_prompt.py --methods prompt --init random --lr 3e-1
    python benchmarks/sst2_prompt.py --methods prompt --rows 8000  # the budget that closes most of the gap

Same budget as benchmarks/sst2_ia3_bitfit.py: the first ``--rows`` shuffled rows of SST-2 train (seed 0),
``--epochs`` passes, batch 32, AdamW with a linear decay, max length 64; accuracy on the 872 dev sentences
(majority class: 50.9 %). task_type SEQ_CLS, so the classifier head trains too (a modules_to_save copy, as in
peft); the pooler stays frozen. One thread (another experiment runs on the other core). Reads
../shared/data/sst2 (or $PEFTKIT_DATA/sst2).

Measured (1 thread on a shared 2-core machine, so train seconds vary with load; torch 2.13, seed 0, P = 20;
text init = INIT_TEXT below, 11 tokens repeated to fill 20). Majority class 0.509; (IA)3 / BitFit on the same budget
0.753 / 0.750 (benchmarks/sst2_ia3_bitfit.py).

    command                                                       method  init    lr     rows  dev acc  train s
    --methods prompt --init random --lr 3e-2                      prompt  random  3e-02  2000    0.532    116.7
    --methods prompt --init random --lr 3e-1                      prompt  random  3e-01  2000    0.549    233.5
    --methods prompt --lr 1e-2                                    prompt  text    1e-02  2000    0.578     76.9
    --methods prompt                                              prompt  text    3e-02  2000    0.658    137.3
    --methods prompt --lr 1e-1 --batch 8 (250 steps)              prompt  text    1e-01  2000    0.580     69.7
    --methods prompt --lr 3e-1                                    prompt  text    3e-01  2000    0.592    172.3
    --methods prompt --rows 8000                                  prompt  text    3e-02  8000    0.742    316.5
    --methods prefix --lr 1e-2                                    prefix  flat    1e-02  2000    0.679     77.9
    --methods prefix                                              prefix  flat    3e-02  2000    0.698    111.3

Prompt tuning (7,680 prompt numbers + the 770-number head) barely beats the majority class from a random
init (53-55 %); initialising from the embeddings of a task description and lr 3e-2 gives 65.8 %, and four
times the data (8,000 rows, one epoch) gives 74.2 %, about what (IA)3 and BitFit reach with 2,000. Prefix
tuning (92,160 prefix numbers: a prefix at every layer) reaches 69.8 % on the short budget.
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
LEARNING_RATES = {"prompt": 3e-2, "prefix": 3e-2}  # the best of 1e-2, 3e-2, (1e-1,) 3e-1 below
INIT_TEXT = "Is the sentiment of this movie review positive or negative?"


def config_for(method: str, tokens: int, init: str, folder: Path, projection: bool):
    from peftkit import PrefixTuningConfig, PromptTuningConfig

    if method == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=tokens, prefix_projection=projection, task_type="SEQ_CLS")
    text = {"prompt_tuning_init_text": INIT_TEXT, "tokenizer_name_or_path": str(folder)} if init == "text" else {}
    return PromptTuningConfig(num_virtual_tokens=tokens, prompt_tuning_init=init, task_type="SEQ_CLS", **text)


def evaluate(pm, tok, texts: list[str], labels: list[int]) -> float:
    pm.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            enc = tok(texts[i : i + 64], padding=True, truncation=True, max_length=64, return_tensors="pt")
            correct += int((pm(**enc).logits.argmax(-1) == torch.tensor(labels[i : i + 64])).sum())
    return correct / len(texts)


def run(method: str, args: argparse.Namespace, folder: Path) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peftkit import get_peft_model

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    pm = get_peft_model(model, config_for(method, args.tokens, args.init, folder, args.projection))
    trainable, total = pm.get_nb_trainable_parameters()
    texts, labels = read_sst2(DATA / "train.tsv", args.rows)
    dev_texts, dev_labels = read_sst2(DATA / "dev.tsv")
    lr = args.lr or LEARNING_RATES[method]
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    steps = args.epochs * ((len(texts) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    start = time.perf_counter()
    pm.train()
    for _ in range(args.epochs):
        for i in range(0, len(texts), args.batch):
            enc = tok(texts[i : i + args.batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
            pm(**enc, labels=torch.tensor(labels[i : i + args.batch])).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    train_s = time.perf_counter() - start
    acc = evaluate(pm, tok, dev_texts, dev_labels)
    return {"trainable": trainable, "total": total, "acc": acc, "train_s": train_s, "lr": lr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["prompt", "prefix"], choices=sorted(LEARNING_RATES))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=20, help="num_virtual_tokens P")
    parser.add_argument("--init", default="text", choices=["random", "sample_vocab", "text"], help="prompt only")
    parser.add_argument("--projection", action="store_true", help="prefix only: prefix_projection=True")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: per method)")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"SST-2 not found at {DATA}; set PEFTKIT_DATA to the folder that holds sst2/.")
    folder = minilm_folder()
    torch.set_num_threads(1)
    _, dev_labels = read_sst2(DATA / "dev.tsv")
    majority = max(dev_labels.count(0), dev_labels.count(1)) / len(dev_labels)
    print(f"SST-2, MiniLM, {args.rows} rows x {args.epochs} epoch(s), batch {args.batch}, P={args.tokens}, ", end="")
    print(f"dev 872 rows (majority {majority:.3f})")
    print(f"{'method':<8} {'init':<12} {'lr':>7} {'trainable':>10} {'share':>7} {'dev acc':>8} {'train s':>8}")
    for method in args.methods:
        r = run(method, args, folder)
        share = 100 * r["trainable"] / r["total"]
        init = args.init if method == "prompt" else ("mlp" if args.projection else "flat")
        print(
            f"{method:<8} {init:<12} {r['lr']:>7.0e} {r['trainable']:>10,d} {share:>6.2f}% {r['acc']:>8.3f} "
            f"{r['train_s']:>8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
