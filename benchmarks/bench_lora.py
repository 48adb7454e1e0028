"""peftkit vs Hugging Face peft 0.21, side by side: LoRA training steps, saved activations, inference, per-row.

    python benchmarks/bench_lora.py                      # everything (several minutes on 2 cores)
    python benchmarks/bench_lora.py --quick              # fewer repeats, smaller batches
    python benchmarks/bench_lora.py --only train --models llama
    python benchmarks/bench_lora.py --only rows --adapters 8

Sections (``--only``):
  train  training step time (forward + backward + AdamW step) and the bytes autograd saves for backward, for LoRA
         (q,v) and LoRA (all-linear), on the real MiniLM (sequence classification, batch 32 x 128) and on a
         Llama-shaped model (6 layers, hidden 512, batch 8 x 256), next to the floor: the frozen base model with
         backward through every layer (input embeddings require grad), the least any adapter method can cost.
  infer  inference time, unmerged and merged, over the base model (LoRA all-linear).
  rows   per-row batches (``adapter_names=``) with 1, 8 and 32 adapters on a 6-layer Llama-shaped model (hidden 512),
         batch 32 x 64, r=16 on all linear layers, over the base model, against peft's ``adapter_names``.

Method: every contender gets its own copy of the same base model and the same adapter values (copied from
peftkit into peft with peft's own ``set_peft_model_state_dict``), outputs are checked to agree, then timed runs
alternate between contenders (A B C, B C A, ...) and the median of the repeats is reported. Saved bytes count each
storage autograd keeps for backward once (``torch.autograd.graph.saved_tensors_hooks``), leaving out the model's
own parameters and buffers, which are held anyway; that is deterministic, unlike peak RSS.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time
import warnings
from collections.abc import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

import peft  # noqa: E402
import transformers  # noqa: E402
from common import minilm_folder  # noqa: E402

import peftkit  # noqa: E402
from peftkit.core import io  # noqa: E402

transformers.logging.set_verbosity_error()

MINILM_TARGETS = {"qv": ["query", "value"], "all": "all-linear"}
LLAMA_TARGETS = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}


# ---- models ---------------------------------------------------------------------------------------------------
def build_minilm():
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=3)


def build_llama(vocab: int = 32000):
    """Llama-shaped: 6 layers, hidden 512, 8 heads (4 key/value heads), MLP 1536."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def make_batch(kind: str, rows: int, length: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (rows, length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = torch.randint(0, 3, (rows,), generator=g) if kind == "minilm" else ids
    return batch


def lora_pair(base, targets, task_type: str, names: list[str], r: int = 8, alpha: int = 16):
    """(peftkit model, peft model) over two copies of ``base``, holding the same values for adapters ``names``."""
    kw = dict(r=r, lora_alpha=alpha, target_modules=targets, task_type=task_type, init_lora_weights=False)
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**kw), adapter_name=names[0])
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw), adapter_name=names[0])
    for name in names[1:]:
        ours.add_adapter(name, peftkit.LoraConfig(**kw))
        theirs.add_adapter(name, peft.LoraConfig(**kw))
    g = torch.Generator().manual_seed(3)
    for name in names:
        state = ours.adapter_state_dict(name)
        with torch.no_grad():
            for key, t in state.items():
                if ".lora_" in key:  # non-trivial LoRA values; modules_to_save copies keep the base values
                    t.copy_(torch.randn(t.shape, generator=g) * 0.02)
        peft.set_peft_model_state_dict(theirs, io.to_file_keys(state), adapter_name=name)
    ours.set_adapter(names[0])
    theirs.set_adapter(names[0])
    return ours, theirs


# ---- measuring ------------------------------------------------------------------------------------------------
CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process; steadier on a shared machine)


def alternate(runs: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each run, calls interleaved with a rotating order."""
    keys = list(runs)
    for _ in range(warmup):
        for k in keys:
            runs[k]()
    times: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(repeats):
        order = keys[i % len(keys) :] + keys[: i % len(keys)]
        for k in order:
            gc.collect()
            start = CLOCK()
            runs[k]()
            times[k].append(CLOCK() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def saved_bytes(model: torch.nn.Module, step: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd keeps for backward during ``step()`` (parameters left out)."""
    held = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held and storage.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def train_step(model, batch, optimizer=None) -> Callable[[], None]:
    def forward() -> torch.Tensor:
        return model(**batch).loss

    def step() -> None:
        loss = forward()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)

    step.forward = forward
    return step


def floor_model(base):
    """The frozen base with backward through every layer: input embeddings require grad, no weight trains."""
    model = copy.deepcopy(base).train()
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    return model


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:6.3f}"


# ---- sections -------------------------------------------------------------------------------------------------
def bench_train(args) -> None:
    specs = []
    if "minilm" in args.models:
        rows, length = (8, 64) if args.quick else (32, 128)
        specs.append(("minilm", build_minilm, MINILM_TARGETS, "SEQ_CLS", rows, length, 30522))
    if "llama" in args.models:
        rows, length = (4, 128) if args.quick else (8, 256)
        specs.append(("llama", build_llama, LLAMA_TARGETS, "CAUSAL_LM", rows, length, 32000))
    print("\n== train: step time (fwd + bwd + AdamW) and bytes saved for backward ==")
    print(
        f"{'model':8} {'target':4} {'batch':>7} | {'peftkit s':>9} {'peft s':>8} {'floor s':>8} | "
        f"{'t/peft':>6} {'t/floor':>7} | {'kit MB':>7} {'peft MB':>7} {'floor MB':>8} | {'b/peft':>6} {'b/floor':>7}"
    )
    for kind, builder, targets, task, rows, length, vocab in specs:
        base = builder()
        batch = make_batch(kind, rows, length, vocab)
        floor = floor_model(base)
        floor_step = train_step(floor, batch)
        floor_bytes = saved_bytes(floor, floor_step.forward)
        for label, target in targets.items():
            ours, theirs = lora_pair(base, target, task, ["default"])
            ours.train()
            theirs.train()
            steps, nbytes = {}, {}
            for name, model in (("peftkit", ours), ("peft", theirs)):
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                steps[name] = train_step(model, batch, opt)
                nbytes[name] = saved_bytes(model, steps[name].forward)
            steps["floor"] = floor_step
            t = alternate(steps, args.repeats)
            mb = {k: v / 2**20 for k, v in {**nbytes, "floor": floor_bytes}.items()}
            print(
                f"{kind:8} {label:4} {rows:>3}x{length:<3} | {t['peftkit']:9.3f} {t['peft']:8.3f} {t['floor']:8.3f} | "
                f"{fmt_ratio(t['peftkit'], t['peft'])} {fmt_ratio(t['peftkit'], t['floor']):>7} | "
                f"{mb['peftkit']:7.1f} {mb['peft']:7.1f} {mb['floor']:8.1f} | "
                f"{fmt_ratio(mb['peftkit'], mb['peft'])} {fmt_ratio(mb['peftkit'], mb['floor']):>7}",
                flush=True,
            )
            del ours, theirs, steps
            gc.collect()


def bench_infer(args) -> None:
    specs = []
    if "minilm" in args.models:
        rows, length = (8, 64) if args.quick else (32, 128)
        specs.append(("minilm", build_minilm, MINILM_TARGETS["all"], "SEQ_CLS", rows, length, 30522))
    if "llama" in args.models:
        rows, length = (4, 128) if args.quick else (8, 256)
        specs.append(("llama", build_llama, LLAMA_TARGETS["all"], "CAUSAL_LM", rows, length, 32000))
    print("\n== infer: LoRA all-linear, time over the base model (eval, no_grad) ==")
    print(
        f"{'model':8} {'batch':>7} | {'base s':>7} | {'kit unmerged':>12} {'peft unmerged':>13} | "
        f"{'kit merged':>10} {'peft merged':>11}"
    )
    for kind, builder, target, task, rows, length, vocab in specs:
        base = builder().eval()
        batch = {k: v for k, v in make_batch(kind, rows, length, vocab).items() if k != "labels"}
        ours, theirs = lora_pair(base, target, task, ["default"])
        ours.eval()
        theirs.eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, atol=1e-4, rtol=1e-4)
        kit_m, peft_m = copy.deepcopy(ours), copy.deepcopy(theirs)
        kit_m.merge_adapter()
        peft_m.merge_adapter()

        def runner(model, batch=batch):
            def run() -> None:
                with torch.no_grad():
                    model(**batch)

            return run

        models = {"base": base, "kit": ours, "peft": theirs, "kit_m": kit_m, "peft_m": peft_m}
        t = alternate({k: runner(m) for k, m in models.items()}, args.repeats)
        over = {k: t[k] / t["base"] for k in t}
        print(
            f"{kind:8} {rows:>3}x{length:<3} | {t['base']:7.3f} | {over['kit']:12.3f} {over['peft']:13.3f} | "
            f"{over['kit_m']:10.3f} {over['peft_m']:11.3f}",
            flush=True,
        )
        del ours, theirs, kit_m, peft_m
        gc.collect()


def bench_rows(args) -> None:
    rows, length = (8, 32) if args.quick else (32, 64)
    print(f"\n== rows: per-row adapter_names, Llama-shaped 6 x 512, batch {rows} x {length}, r=16 all-linear ==")
    print(
        f"{'adapters':>8} | {'base s':>7} {'peftkit s':>9} {'peft s':>8} | {'kit over':>8} {'peft over':>9} "
        f"| {'over ratio':>10}"
    )
    base = build_llama().eval()
    batch = {k: v for k, v in make_batch("llama", rows, length, 32000).items() if k != "labels"}
    for n in args.adapters:
        names = [f"a{i}" for i in range(n)]
        ours, theirs = lora_pair(base, "all-linear", "CAUSAL_LM", names, r=16, alpha=32)
        ours.eval()
        theirs.eval()
        per_row = [names[i % n] for i in range(rows)]
        with torch.no_grad():
            torch.testing.assert_close(
                ours(**batch, adapter_names=per_row).logits,
                theirs(**batch, adapter_names=per_row).logits,
                atol=1e-4,
                rtol=1e-4,
            )

        def runner(model, **kw):
            def run() -> None:
                with torch.no_grad():
                    model(**batch, **kw)

            return run

        t = alternate(
            {
                "base": runner(base),
                "kit": runner(ours, adapter_names=per_row),
                "peft": runner(theirs, adapter_names=per_row),
            },
            args.repeats,
        )
        kit_over, peft_over = t["kit"] / t["base"] - 1, t["peft"] / t["base"] - 1
        ratio = kit_over / peft_over if peft_over > 0 else float("nan")
        print(
            f"{n:8d} | {t['base']:7.3f} {t['kit']:9.3f} {t['peft']:8.3f} | {kit_over:+8.1%} {peft_over:+9.1%} "
            f"| {ratio:10.2f}",
            flush=True,
        )
        del ours, theirs
        gc.collect()


SECTIONS = {"train": bench_train, "infer": bench_infer, "rows": bench_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats and smaller batches: a smoke run")
    parser.add_argument("--only", choices=list(SECTIONS), action="append", help="run only these sections")
    parser.add_argument("--models", nargs="+", default=["minilm", "llama"], choices=["minilm", "llama"])
    parser.add_argument("--adapters", nargs="+", type=int, default=[1, 8, 32], help="adapter counts for 'rows'")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per contender (default 7, quick 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process time (use --threads 1)")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    args.repeats = args.repeats or (3 if args.quick else 7)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, peft {peft.__version__}, peftkit {peftkit.__version__}, "
        f"threads {args.threads}, {args.clock} clock, repeats {args.repeats}{', quick' if args.quick else ''}"
    )
    for name in args.only or list(SECTIONS):
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
