"""peftkit train vs TRL's SFTTrainer + peft on the same model, data, steps and seed (packing off and on).

Model: the built-in SmolLM2-135M-Instruct (float32, CPU). Data: Alpaca-200 (../shared/data/alpaca_200) as chat
conversations (one user turn: instruction [+ input]; one assistant turn: output), 20 rows held out by a seeded
shuffle. Both sides: LoRA r=8, alpha=16 on q/k/v/o_proj, dropout 0, AdamW at lr 1e-3, linear decay without warmup,
``--steps`` steps of ``--batch-size`` rows (packed rows of ``--max-length`` tokens with packing), seed 0, one
thread, activation checkpointing at each trainer's default unless ``--gradient-checkpointing on|off`` sets it on
both sides (both default to it on for causal LMs: TRL's SFTConfig, and peftkit since issue 17). peftkit trains
on the assistant turn only (its chat mask); TRL on the completion only (prompt-completion format, TRL's
completion_only_loss), packing with TRL's default "bfd" strategy. ``--packings off|on`` runs one half (to split a
long measurement).

Measured per run, each in a fresh process (so that peak memory is the run's own): tokens/s (non-padding tokens
fed to the model over the training wall-clock time: peftkit's train loop, TRL's ``trainer.train()``), peak memory
(resident set size growth over the same span, sampled every 20 ms by peftkit's MemoryMonitor), and
the held-out answer loss after training, computed for both models by the same function on the same encoded rows
(peftkit's encoding of the held-out conversations). Runs alternate (peftkit, TRL, peftkit, TRL, ...) and the
medians over ``--repeats`` are reported, because the machine is shared and its load changes between runs.

    flock /tmp/peftkit-bench.lock .venv/bin/python benchmarks/sft_smollm2.py --steps 8 --batch-size 4 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import DATA_ROOT  # benchmarks/ is on sys.path when this script runs

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
HELD_OUT = 20
CHECKPOINTING = {"default": None, "on": True, "off": False}  # None: the trainer's own default


def conversations() -> tuple[list[dict], list[dict]]:
    rows = json.loads((DATA_ROOT / "alpaca_200" / "alpaca_200.json").read_text())
    random.Random(0).shuffle(rows)
    chats = []
    for r in rows:
        prompt = r["instruction"] + (f"\n\n{r['input']}" if r["input"].strip() else "")
        chats.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["output"]}]})
    return chats[HELD_OUT:], chats[:HELD_OUT]


def data_folder(root: Path) -> Path:
    train, dev = conversations()
    for name, rows in (("train", train), ("dev", dev)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def settings(args: argparse.Namespace, folder: Path, packing: bool, out: Path):
    from peftkit.train import TrainConfig

    return TrainConfig(
        model="smollm2",
        data=str(folder),
        method="lora",
        method_args={"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS},
        lr=args.lr,
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        packing=packing,
        warmup_ratio=0.0,
        eval_before=False,
        progress=False,
        threads=1,
        seed=0,
        gradient_checkpointing=CHECKPOINTING[args.gradient_checkpointing],
        output_dir=str(out),
    )


@torch.no_grad()
def held_out_loss(model, dev_rows: list[dict], pad_id: int) -> float:
    from peftkit.train import data as D
    from peftkit.train.evaluation import lm_loss_sum

    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(dev_rows), 10):
        batch = D.collate(dev_rows[start : start + 10], pad_id)
        labels = batch.pop("labels")
        batch_loss, batch_tokens = lm_loss_sum(model(**batch).logits.float(), labels)
        total, tokens = total + batch_loss, tokens + batch_tokens
    return total / tokens


def encoded_dev(config, tokenizer) -> list[dict]:
    from peftkit.train import data as D

    return D.prepare(config.replace(packing=False), tokenizer).dev


def run_peftkit(args: argparse.Namespace, folder: Path, packing: bool, out: Path) -> dict:
    from peftkit.train import Trainer

    counted = {"tokens": 0}

    class Counting(Trainer):
        def _step(self, micro):
            loss = super()._step(micro)
            counted["tokens"] += self.tokens
            return loss

    config = settings(args, folder, packing, out)
    trainer = Counting(config)
    result = trainer.train()  # its train_seconds and peak memory cover the steps, not the final evaluation and save
    dev = encoded_dev(config, trainer.tokenizer)
    loss = held_out_loss(trainer.pm, dev, trainer.tokenizer.pad_token_id)
    seconds = result.train_seconds
    return {
        "tokens_per_s": counted["tokens"] / seconds,
        "peak_mb": result.peak_memory_mb,
        "loss": loss,
        "seconds": seconds,
    }


def run_trl(args: argparse.Namespace, folder: Path, packing: bool, out: Path) -> dict:
    import datasets
    import peft
    import trl
    from transformers import AutoConfig, AutoModelForCausalLM

    from peftkit.train.models import load_tokenizer, resolve_model
    from peftkit.train.result import MemoryMonitor

    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2")
    folder_model = resolve_model("smollm2")
    model_config = AutoConfig.from_pretrained(folder_model)
    if hasattr(model_config, "quantization_config"):  # the GGUF it was converted from (float32 weights now):
        del model_config.quantization_config  # transformers' Trainer refuses a model marked as GGUF-quantized
    model = AutoModelForCausalLM.from_pretrained(folder_model, config=model_config, dtype=torch.float32)
    train_rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    pairs = [{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in train_rows]
    checkpointing = CHECKPOINTING[args.gradient_checkpointing]
    own = {} if checkpointing is None else {"gradient_checkpointing": checkpointing}  # TRL's default: on
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    config = trl.SFTConfig(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=args.max_length,
        packing=packing,
        seed=0,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **own,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(pairs),
        processing_class=tokenizer,
        peft_config=lora,
    )
    with MemoryMonitor(torch.device("cpu")) as memory:
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    tokens = max((log.get("num_tokens", 0) for log in trainer.state.log_history), default=0)
    dev = encoded_dev(settings(args, folder, packing, out), tokenizer)
    loss = held_out_loss(trainer.model, dev, tokenizer.pad_token_id)
    return {"tokens_per_s": tokens / seconds, "peak_mb": memory.megabytes, "loss": loss, "seconds": seconds}


def one(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    folder = Path(args.folder)
    out = Path(tempfile.mkdtemp(prefix="sft_bench_"))
    runner = run_peftkit if args.one == "peftkit" else run_trl
    print("RESULT " + json.dumps(runner(args, folder, args.packing, out)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one", choices=["peftkit", "trl"])
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--packings", choices=["both", "off", "on"], default="both", help="Split long runs.")
    parser.add_argument("--folder")
    parser.add_argument("--gradient-checkpointing", choices=list(CHECKPOINTING), default="default")
    args = parser.parse_args()
    if args.one:
        one(args)
        return
    folder = data_folder(Path(tempfile.mkdtemp(prefix="sft_data_")))
    results: dict[tuple[str, bool], list[dict]] = {}
    common = ["--steps", args.steps, "--batch-size", args.batch_size, "--max-length", args.max_length, "--lr", args.lr]
    common += ["--gradient-checkpointing", args.gradient_checkpointing]
    for _ in range(args.repeats):
        for packing in [p for p in (False, True) if args.packings in ("both", "on" if p else "off")]:
            for side in ("peftkit", "trl"):  # alternate, so that load changes hit both sides alike
                command = [sys.executable, __file__, "--one", side, "--folder", folder, *common]
                command += ["--packing"] if packing else []
                done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"{side} packing={packing} failed:\n{done.stderr[-3000:]}")
                results.setdefault((side, packing), []).append(json.loads(line[7:]))
                print(side, "packing" if packing else "no packing", results[(side, packing)][-1], flush=True)
    checkpointing = args.gradient_checkpointing
    print(f"\n{args.steps} steps x {args.batch_size} rows, max length {args.max_length}, checkpointing {checkpointing}")
    print(f"medians of {args.repeats} alternating runs")
    print("| packing | trainer | tokens/s | peak MB | held-out loss |")
    print("|---|---|---|---|---|")
    for (side, packing), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in ("tokens_per_s", "peak_mb", "loss")}
        print(f"| {'on' if packing else 'off'} | {side} | {med['tokens_per_s']:.0f} | {med['peak_mb']:.0f} | "
              f"{med['loss']:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
