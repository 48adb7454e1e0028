"""Short SST-2 runs of Houlsby, Pfeiffer, Compacter and Compacter++ adapters on the real MiniLM, with peftkit's trainer.

    python benchmarks/sst2_bottleneck.py --seeds 0 1 2          # each method with its recipe, three seeds, the mean
    python benchmarks/sst2_bottleneck.py --methods pfeiffer --rows 4000
    python benchmarks/sst2_bottleneck.py --methods compacter --pooling default --batch 32 --lr 1e-2
    python benchmarks/sst2_bottleneck.py --methods houlsby --set "modules_to_save=[classifier]"

Measured results (the recipes, learning-rate sweeps, seeds, variants) are in docs/bottleneck.md, "Short SST-2 runs".

The budget of the other methods' SST-2 runs (benchmarks/sst2_ia3_bitfit.py): the first ``--rows`` training rows,
one pass, max length 64, AdamW with warmup and linear decay; accuracy on the 872 dev sentences. Each method has a
recipe (RUNS: learning rate, rows per step, ``--pooling`` and the base model's dropout) that the flags override.
The Houlsby run trains a two-layer head (BERT's pooler and the classifier, as AdapterHub's default head) on [CLS];
the others read the mean of the tokens (``--pooling mean``) with the classifier alone, Compacter also training
the model's LayerNorms. Reads ../shared/data/sst2 (or $PEFTKIT_DATA/sst2); writes each adapter under --out.
"""

from __future__ import annotations

import argparse
import time

import yaml
from common import DATA_ROOT

from peftkit.train.config import POOLINGS, TrainConfig
from peftkit.train.trainer import train

DATA = DATA_ROOT / "sst2"
# AdapterHub's default classification head has two layers (dense + tanh + linear) and trains both; BERT's pooler
# plus classifier is that head, so HEAD trains the pooler too (148 k parameters on MiniLM, d = 384).
HEAD = {"modules_to_save": ["pooler", "classifier"]}
# name -> (method, method_args, recipe). A recipe holds the training settings that differ from TrainConfig's
# defaults; every flag below overrides it. The recipes are the steadiest found over seeds 0 / 1 / 2 on the
# budget (docs/bottleneck.md, "Short SST-2 runs"): the same 2,000 rows, one pass, in steps of 32, 16 or 8 rows.
RUNS = {
    "houlsby": ("bottleneck", {"preset": "houlsby", **HEAD}, {"lr": 5e-3, "batch": 32}),
    "pfeiffer": ("bottleneck", {"preset": "pfeiffer"}, {"lr": 5e-3, "batch": 16, "pooling": "mean"}),
    "compacter": (  # with its LayerNorms trained, as Houlsby et al. 2019 (section 2.1) do
        "compacter",
        {"preset": "compacter", "modules_to_save": ["LayerNorm", "classifier"]},
        {"lr": 3e-3, "batch": 8, "pooling": "mean", "model_dropout": 0.0},
    ),
    "compacter++": (
        "compacter",
        {"preset": "compacter++"},
        {"lr": 5e-3, "batch": 8, "pooling": "mean", "model_dropout": 0.0},
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: the method's recipe)")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default: the method's recipe)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the rows (the budget: 1)")
    parser.add_argument("--warmup-ratio", type=float, default=0.06, help="share of the steps warming the lr up")
    parser.add_argument(
        "--model-dropout", type=float, default=None, help="the base model's dropout (0: off; default: the recipe)"
    )
    parser.add_argument("--pooling", default=None, choices=POOLINGS, help="[CLS] or the mean (default: the recipe)")
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
        method, method_args, recipe = RUNS[name]
        method_args = {**method_args, **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}}
        given = {"lr": args.lr, "batch": args.batch, "pooling": args.pooling, "model_dropout": args.model_dropout}
        run = {**recipe, **{k: v for k, v in given.items() if v is not None}}
        lr = run["lr"]
        scores = []
        for seed in args.seeds:
            start = time.time()
            config = TrainConfig(
                model="minilm", data=str(DATA), method=method, method_args=method_args, output_dir=f"{args.out}/{name}",
                max_train_rows=args.rows, epochs=args.epochs, batch_size=run["batch"], max_length=64, lr=lr,
                warmup_ratio=args.warmup_ratio, pooling=run.get("pooling", "default"),
                model_dropout=run.get("model_dropout"),
                threads=args.threads, seed=seed,
                eval_before=False, progress=False,
            )  # fmt: skip
            result = train(config)
            scores.append(result.after["accuracy"])
            print(
                f"{name:<11} {describe(run)}  seed {seed}  trainable {result.trainable_params:>8,d}  "
                f"dev accuracy {scores[-1]:.4f}  ({result.steps} steps, {time.time() - start:.0f} s)",
                flush=True,
            )
        if len(scores) > 1:
            mean = sum(scores) / len(scores)
            print(f"{name:<11} {describe(run)}  mean over seeds {args.seeds}: {mean:.4f}", flush=True)


def describe(run: dict) -> str:
    dropout = "" if run.get("model_dropout") is None else f"  model dropout {run['model_dropout']:g}"
    return f"lr {run['lr']:g}  batch {run['batch']}  pooling {run.get('pooling', 'default')}{dropout}"


if __name__ == "__main__":
    main()
