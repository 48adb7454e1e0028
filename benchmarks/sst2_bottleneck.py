"""Short SST-2 runs of Houlsby, Pfeiffer and Compacter adapters on the real MiniLM, with peftkit's trainer.

    python benchmarks/sst2_bottleneck.py                         # all three, 2,000 training rows, one epoch
    python benchmarks/sst2_bottleneck.py --methods houlsby --seeds 0 1 2                # seed spread, mean
    python benchmarks/sst2_bottleneck.py --methods pfeiffer --rows 4000
    python benchmarks/sst2_bottleneck.py --methods compacter --lr 3e-2 --set reduction_factor=8
    python benchmarks/sst2_bottleneck.py --methods compacter --model-dropout 0 \\
        --set "modules_to_save=[pooler,classifier]"

Measured results (learning-rate sweep, seeds, variants) are in docs/bottleneck.md, "Short SST-2 runs".

The budget of the other methods' SST-2 runs (benchmarks/sst2_ia3_bitfit.py): the first ``--rows`` training rows,
one epoch, batch 32, max length 64, AdamW with warmup and linear decay; accuracy on the 872 dev sentences. Reads
../shared/data/sst2 (or $PEFTKIT_DATA/sst2); writes each adapter under --out. The Houlsby run trains a two-layer
head (BERT's pooler and the classifier, as AdapterHub's default head), the others the classifier alone; ``--set
"modules_to_save=[...]"`` chooses.
"""

from __future__ import annotations

import argparse
import time

import yaml
from common import DATA_ROOT

from peftkit.train.config import TrainConfig
from peftkit.train.trainer import train

DATA = DATA_ROOT / "sst2"
# AdapterHub's default classification head has two layers (dense + tanh + linear) and trains both; BERT's pooler
# plus classifier is that head, so HEAD trains the pooler too (148 k parameters on MiniLM, d = 384).
HEAD = {"modules_to_save": ["pooler", "classifier"]}
RUNS = {  # name -> (method, method_args, default learning rate)
    "houlsby": ("bottleneck", {"preset": "houlsby", **HEAD}, 5e-3),
    "pfeiffer": ("bottleneck", {"preset": "pfeiffer"}, 5e-3),
    "compacter": ("compacter", {"preset": "compacter"}, 1e-2),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=None, help="learning rate for every method (default: per method)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the rows (the budget: 1)")
    parser.add_argument("--warmup-ratio", type=float, default=0.06, help="share of the steps warming the lr up")
    parser.add_argument("--model-dropout", type=float, default=None, help="the base model's dropout (0: off)")
    parser.add_argument(
        "--pooling", default="default", choices=["default", "mean"], help="the classifier reads [CLS] or the mean"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed; the mean is printed")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra adapter settings, e.g. phm_rank=2"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/sst2_bottleneck")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"SST-2 not found at {DATA}; set PEFTKIT_DATA to the folder that holds sst2/.")
    for name in args.methods:
        method, method_args, lr = RUNS[name]
        method_args = {**method_args, **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}}
        lr = args.lr or lr
        scores = []
        for seed in args.seeds:
            start = time.time()
            config = TrainConfig(
                model="minilm", data=str(DATA), method=method, method_args=method_args, output_dir=f"{args.out}/{name}",
                max_train_rows=args.rows, epochs=args.epochs, batch_size=args.batch, max_length=64, lr=lr,
                warmup_ratio=args.warmup_ratio, pooling=args.pooling, model_dropout=args.model_dropout,
                threads=args.threads, seed=seed,
                eval_before=False, progress=False,
            )  # fmt: skip
            result = train(config)
            scores.append(result.after["accuracy"])
            print(
                f"{name:<10} lr {lr:g}  seed {seed}  trainable {result.trainable_params:>8,d}  "
                f"dev accuracy {scores[-1]:.4f}  ({result.steps} steps, {time.time() - start:.0f} s)",
                flush=True,
            )
        if len(scores) > 1:
            print(f"{name:<10} lr {lr:g}  mean over seeds {args.seeds}: {sum(scores) / len(scores):.4f}", flush=True)


if __name__ == "__main__":
    main()
