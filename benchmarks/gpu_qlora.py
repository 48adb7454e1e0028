"""QLoRA on a CUDA device, peftkit vs Hugging Face peft over the same bitsandbytes NF4 base (bf16 compute).

    python benchmarks/gpu_qlora.py                   # SmolLM2-135M, batch 8 x 512, 10 repeats: a few minutes
    python benchmarks/gpu_qlora.py --rows 4 --length 256 --repeats 5

The CUDA counterpart of benchmarks/bench_qlora.py's step (prepared for a lent accelerator; not yet run: no device
was lent to the session that wrote it). Per contender: step time (median of alternating repeats, synchronised),
what one step adds to CUDA memory at its peak (max_memory_allocated minus what was resident: activations kept for
backward, gradients, temporaries) next to each model's resident bytes (base as stored + adapter + grads + AdamW),
and that both give the same logits. Then the byte table of bench_qlora.py (bitsandbytes' own tensors).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import bench_qlora  # noqa: E402  (contenders, bench_bytes)

from peftkit.integrations.kbit import quantize_model  # noqa: E402


def step_fn(model, batch, opt):
    def step() -> None:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device (bitsandbytes' CUDA kernels); on CPU run benchmarks/bench_qlora.py")
    from transformers import AutoModelForCausalLM

    from peftkit.train.models import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model("smollm2"), dtype=torch.bfloat16).to("cuda")
    base = quantize_model(base, "nf4", compute_dtype=torch.bfloat16, double_quant=True)
    models = {k: m.to("cuda") for k, m in bench_qlora.contenders(base, r=16).items()}
    del base
    ids = torch.randint(10, 49152, (args.rows, args.length), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        logits = {k: m(**batch).logits.float() for k, m in models.items()}
    gap = float((logits["peftkit"] - logits["peft"]).abs().max())
    steps, peaks, times = {}, {}, {k: [] for k in models}
    for name, model in models.items():
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        steps[name] = step_fn(model, batch, opt)
        steps[name]()  # warm-up (and the optimizer's state)
        resident = torch.cuda.memory_allocated()  # both models and this one's optimizer state
        torch.cuda.reset_peak_memory_stats()
        steps[name]()
        peaks[name] = (torch.cuda.max_memory_allocated() - resident) / 2**20  # what the step adds at its peak
    keys = list(models)
    for i in range(args.repeats):
        for name in keys[i % 2 :] + keys[: i % 2]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n## QLoRA step on SmolLM2-135M, CUDA ({torch.cuda.get_device_name()}), NF4 + dq, bf16 compute, batch "
          f"{args.rows} x {args.length}, r=16 all-linear; logits agree to {gap:.1e}\n")  # fmt: skip
    print("| contender | step ms | step peak MB | state MB | step / peft | peak / peft |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k in keys:
        print(f"| {k} | {median[k] * 1e3:.1f} | {peaks[k]:.0f} | {bench_qlora.state_mb(models[k]):.0f} | "
              f"{median[k] / median['peft']:.3f} | {peaks[k] / peaks['peft']:.3f} |")  # fmt: skip
    bench_qlora.bench_bytes(None)


if __name__ == "__main__":
    main()
