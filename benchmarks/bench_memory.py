"""Training memory, peftkit vs Hugging Face peft 0.21 side by side: bytes autograd keeps for backward and step time.

    python benchmarks/bench_memory.py                        # every case (several minutes on 2 cores)
    python benchmarks/bench_memory.py --quick                # smaller batches, 3 repeats: a smoke run
    python benchmarks/bench_memory.py --only lora --rows 4   # the LoRA cases only, batch 4 x 256

Cases (``--only``):
  lora  LoRA r=16 all-linear (lora_dropout 0 and 0.05) on a Llama-shaped model (6 layers, hidden 512, MLP 1536,
        batch 8 x 256) and on the real MiniLM (batch 32 x 128, dropout 0.05), next to the frozen-base floor (backward
        through every layer, no weight trains). Contenders: peft; peftkit (its LoRA backward,
        methods/lora/autograd.py, the default); peftkit with ``lora_backward(recompute_inputs=True)``.
  loss  a causal-LM step on SmolLM2-135M's shapes (hidden 576, 9 heads / 3 key-value heads, MLP 1536, tied 49,152-token
        vocabulary; 2 layers instead of 30 so that the LM head's share is the point), batch 4 x 512, LoRA r=16
        all-linear with dropout 0.05: peft with transformers' loss against peftkit with ``causal_lm_loss``
        (core/loss.py: the chunked cross-entropy, no full logits kept) and against peftkit with transformers' loss.

Method (benchmarks/bench_lora.py's): every contender gets its own copy of the same base and the same adapter values,
outputs are checked to agree, timed steps (forward + backward + AdamW) alternate between contenders with a rotating
order and the median is reported. Saved bytes count each storage autograd keeps for backward once
(``torch.autograd.graph.saved_tensors_hooks``), parameters and buffers left out. Ratios are printed next to the
numbers: on a shared machine they are what survives the load.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import time
import warnings
from collections.abc import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

import bench_lora as common  # noqa: E402  (the measuring helpers: alternate, saved_bytes, floor_model, models)
import peft  # noqa: E402
import transformers  # noqa: E402

import peftkit  # noqa: E402
from peftkit.core import io  # noqa: E402
from peftkit.core.loss import causal_lm_loss  # noqa: E402
from peftkit.methods.lora.autograd import lora_backward  # noqa: E402

transformers.logging.set_verbosity_error()


def pair(base, targets, task_type: str, dropout: float, r: int = 16, check: bool = True):
    """(peftkit model, peft model) over copies of ``base`` with the same random LoRA values, in train mode (``check``:
    their eval-mode outputs agree)."""
    kw = dict(r=r, lora_alpha=2 * r, target_modules=targets, task_type=task_type, lora_dropout=dropout)
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**kw, init_lora_weights=False))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    state = ours.adapter_state_dict("default")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, t in state.items():
            if ".lora_" in key:
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    peft.set_peft_model_state_dict(theirs, io.to_file_keys(state))
    ours.train()
    theirs.train()
    if not check:
        return ours, theirs
    with torch.no_grad():  # eval-mode outputs agree (no dropout draw in the comparison)
        ours.eval(), theirs.eval()
        probe = {k: v[:1, :16] for k, v in common.make_batch("llama", 1, 16, 100).items() if k != "labels"}
        if task_type == "SEQ_CLS":
            probe = {k: v.clamp(max=1000) for k, v in probe.items()}
        torch.testing.assert_close(ours(**probe)[0], theirs(**probe)[0], atol=1e-4, rtol=1e-4)
        ours.train(), theirs.train()
    return ours, theirs


def switched(step: Callable, **switches) -> Callable:
    """``step`` run under ``lora_backward(**switches)`` (``.forward`` too, for the saved-bytes pass)."""

    def run() -> None:
        with lora_backward(**switches):
            step()

    def forward() -> torch.Tensor:
        with lora_backward(**switches):
            return step.forward()

    run.forward = forward
    return run


def optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def report(label: str, steps: dict[str, Callable], models: dict[str, torch.nn.Module], repeats: int, ref: str) -> None:
    """Saved MB (one forward each) and median step time of every contender, with ratios to ``ref`` and the floor."""
    mb = {k: common.saved_bytes(models[k], steps[k].forward) / 2**20 for k in steps}
    seconds = common.alternate(steps, repeats) if repeats else None  # --repeats 0: saved bytes only
    for k in steps:
        floor = f" {mb[k] / mb['floor']:6.3f}" if "floor" in mb else ""
        timing = f"{seconds[k]:7.3f} s {seconds[k] / seconds[ref]:6.3f}" if seconds else "      -"
        print(f"{label:28} {k:22} | {mb[k]:8.1f} MB {mb[k] / mb[ref]:6.3f}{floor} | {timing}", flush=True)


def header(ref: str, floor: bool) -> None:
    print(f"{'case':28} {'contender':22} | {'saved':>11} {'/' + ref:>6}{' /floor' if floor else ''} | "
          f"{'step':>9} {'/' + ref:>6}")  # fmt: skip


def bench_lora(args) -> None:
    print("\n== LoRA r=16 all-linear: saved for backward and step time (fwd + bwd + AdamW) ==")
    header("peft", True)
    cases = [("llama", common.build_llama, "CAUSAL_LM", args.rows, args.length, 32000, (0.0, 0.05))]
    if not args.quick and "minilm" in args.models:
        cases.append(("minilm", common.build_minilm, "SEQ_CLS", 32, 128, 30522, (0.05,)))
    for kind, builder, task, rows, length, vocab, dropouts in cases:
        if kind not in args.models:
            continue
        base = builder()
        batch = common.make_batch(kind, rows, length, vocab)
        floor = common.floor_model(base)
        for dropout in dropouts:
            ours, theirs = pair(base, "all-linear", task, dropout)
            models = {"peft": theirs, "peftkit": ours, "peftkit recompute": ours, "floor": floor}
            steps = {
                "peft": common.train_step(theirs, batch, optimizer(theirs)),
                "peftkit": switched(common.train_step(ours, batch, optimizer(ours))),
                "floor": common.train_step(floor, batch),
            }
            steps["peftkit recompute"] = switched(
                common.train_step(ours, batch, optimizer(ours)), recompute_inputs=True
            )
            report(f"{kind} {rows}x{length} dropout {dropout}", steps, models, args.repeats, "peft")
            del ours, theirs, steps, models
            gc.collect()


def smollm2_shaped(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def loss_step(model, batch, opt, chunked: bool) -> Callable:
    def forward() -> torch.Tensor:
        return causal_lm_loss(model, batch) if chunked else model(**batch).loss

    def step() -> None:
        forward().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step.forward = forward
    return step


def bench_loss(args) -> None:
    rows, length = (2, 256) if args.quick else (4, 512)
    print(f"\n== causal-LM step, SmolLM2-135M shapes ({args.layers} layers, vocab 49152), batch {rows}x{length} ==")
    header("peft", False)
    base = smollm2_shaped(args.layers)
    batch = common.make_batch("llama", rows, length, 49152)
    ours, theirs = pair(base, "all-linear", "CAUSAL_LM", 0.05)
    with torch.no_grad():
        torch.testing.assert_close(causal_lm_loss(ours.eval(), batch), theirs.eval()(**batch).loss, atol=1e-4, rtol=0)
    ours.train(), theirs.train()
    steps = {
        "peft + hf loss": loss_step(theirs, batch, optimizer(theirs), chunked=False),
        "peftkit + chunked loss": loss_step(ours, batch, optimizer(ours), chunked=True),
        "peftkit + hf loss": loss_step(ours, batch, optimizer(ours), chunked=False),
    }
    models = dict.fromkeys(steps, ours) | {"peft + hf loss": theirs}
    report(f"smollm2-shaped {rows}x{length}", steps, models, args.repeats, "peft + hf loss")


SECTIONS = {"lora": bench_lora, "loss": bench_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 2 x 256, 3 repeats, no MiniLM: a smoke run")
    parser.add_argument("--only", choices=list(SECTIONS), action="append", help="run only these cases")
    parser.add_argument("--models", nargs="+", default=["llama", "minilm"], choices=["llama", "minilm"])
    parser.add_argument("--rows", type=int, default=None, help="Llama batch rows (default 8; quick 2)")
    parser.add_argument("--length", type=int, default=256, help="Llama sequence length")
    parser.add_argument("--layers", type=int, default=2, help="layers of the SmolLM2-shaped model")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per contender (default 5, quick 3; 0: saved bytes only)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process time (use --threads 1)")
    args = parser.parse_args()
    common.CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    args.rows = args.rows or (2 if args.quick else 8)
    args.repeats = (3 if args.quick else 5) if args.repeats is None else args.repeats
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, peft {peft.__version__}, threads {args.threads}, {args.clock} clock, "
        f"repeats {args.repeats}"
    )
    for name in args.only or list(SECTIONS):
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
