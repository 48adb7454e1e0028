"""The learning-rate sweep behind LoRA's causal-LM default (``Training.causal_lm_learning_rate``).

LoRA (r=8, alpha=16, peftkit's default targets for Llama) on the built-in SmolLM2-135M-Instruct, Alpaca-200
(../shared/data/alpaca_200: 180 train rows, 20 held-out rows, loss on the answers only), a fixed budget of
``--steps`` steps of ``--batch-size`` rows (default 30 x 4), max length 128, seed 0, one thread. For each lr it
prints the held-out answer loss before and after, and the greedy answer to "What is the capital of France?".

    .venv/bin/python benchmarks/lr_sweep_smollm2.py --lrs 1e-4,2e-4,5e-4,1e-3,2e-3 --steps 30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from peftkit.train import TrainConfig, Trainer

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "alpaca_200" / "alpaca_200.json"


def answer(trainer: Trainer, question: str) -> str:
    tok = trainer.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    trainer.pm.eval()
    with torch.no_grad():
        out = trainer.pm.generate(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=24, do_sample=False
        )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lrs", default="1e-4,2e-4,5e-4,1e-3,2e-3")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", default="/tmp/peftkit_lr_sweep")
    args = parser.parse_args()
    rows = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        config = TrainConfig(
            model="smollm2",
            data=str(DATA),
            method="lora",
            method_args={"r": 8, "lora_alpha": 16},
            lr=lr,
            max_steps=args.steps,
            batch_size=args.batch_size,
            max_length=args.max_length,
            eval_batch_size=10,
            output_dir=f"{args.out}/lr{lr:g}",
            progress=False,
            threads=1,
        )
        start = time.perf_counter()
        trainer = Trainer(config)
        result = trainer.train()
        row = {
            "lr": lr,
            "loss_before": round(result.before["loss"], 4),
            "loss_after": round(result.after["loss"], 4),
            "best_step": result.best_step,
            "seconds": round(time.perf_counter() - start, 1),
            "france": answer(trainer, "What is the capital of France?"),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| lr | held-out loss before | after | 'What is the capital of France?' |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['lr']:g} | {r['loss_before']:.4f} | {r['loss_after']:.4f} | {r['france']!r} |")


if __name__ == "__main__":
    main()
