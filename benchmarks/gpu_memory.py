"""bench_memory.py's cases on a GPU in bf16, with peak CUDA memory: a prepared script for a session lent a device.

    python benchmarks/gpu_memory.py                 # CUDA: Llama-shaped 8 x 256 and SmolLM2-shaped 4 x 512, bf16
    python benchmarks/gpu_memory.py --device cpu --rows 1 --length 32 --repeats 1   # a smoke run of the script

Each contender runs on its own copy of the same bf16 base with fp32 LoRA factors (peft's default,
``autocast_adapter_dtype=True``, and peftkit's): the bytes autograd keeps for backward (bench_memory.py's count),
the peak memory of one training step above the memory held before it (``torch.cuda.max_memory_allocated``), and the
median step time (``torch.cuda.synchronize`` around each step), contenders alternating. Not yet run: no GPU was lent
while it was written (docs/benchmarks.md, "Training memory").
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import bench_memory as bm
import torch

common = bm.common


def peak_bytes(device: torch.device, step: Callable[[], None]) -> int:
    """Peak allocated bytes during ``step()`` above what was allocated before it (0 off CUDA)."""
    if device.type != "cuda":
        step()
        return 0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def timed(device: torch.device, runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per call, calls alternating with a rotating order (one warm-up each)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    keys, times = list(runs), {k: [] for k in runs}
    for k in keys:
        runs[k]()
    for i in range(repeats):
        for k in keys[i % len(keys) :] + keys[: i % len(keys)]:
            sync()
            start = time.perf_counter()
            runs[k]()
            sync()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def compare(label: str, device: torch.device, steps: dict, models: dict, repeats: int, ref: str) -> None:
    saved = {k: common.saved_bytes(models[k], steps[k].forward) / 2**20 for k in steps}
    peak = {k: peak_bytes(device, steps[k]) / 2**20 for k in steps}
    seconds = timed(device, steps, repeats)
    for k in steps:
        print(
            f"{label:26} {k:26} | saved {saved[k]:8.1f} MB {saved[k] / saved[ref]:6.3f} | "
            f"peak {peak[k]:8.1f} MB {peak[k] / max(peak[ref], 1e-9):6.3f} | {seconds[k] * 1e3:8.1f} ms "
            f"{seconds[k] / seconds[ref]:6.3f}",
            flush=True,
        )


def lora_case(args, device: torch.device, dropout: float) -> None:
    base = common.build_llama().to(torch.bfloat16)
    batch = {k: v.to(device) for k, v in common.make_batch("llama", args.rows, args.length, 32000).items()}
    ours, theirs = (m.to(device) for m in bm.pair(base, "all-linear", "CAUSAL_LM", dropout, check=False))
    floor = common.floor_model(base).to(device)
    steps = {
        "peft": common.train_step(theirs, batch, bm.optimizer(theirs)),
        "peftkit": bm.switched(common.train_step(ours, batch, bm.optimizer(ours))),
        "peftkit recompute": bm.switched(common.train_step(ours, batch, bm.optimizer(ours)), recompute_inputs=True),
        "floor": common.train_step(floor, batch),
    }
    models = {"peft": theirs, "peftkit": ours, "peftkit recompute": ours, "floor": floor}
    compare(f"llama {args.rows}x{args.length} p={dropout}", device, steps, models, args.repeats, "peft")


def loss_case(args, device: torch.device) -> None:
    base = bm.smollm2_shaped(args.layers).to(torch.bfloat16)
    rows, length = args.loss_rows, args.loss_length
    batch = {k: v.to(device) for k, v in common.make_batch("llama", rows, length, 49152).items()}
    ours, theirs = (m.to(device) for m in bm.pair(base, "all-linear", "CAUSAL_LM", 0.05, check=False))
    steps = {
        "peft + hf loss": bm.loss_step(theirs, batch, bm.optimizer(theirs), chunked=False),
        "peftkit + chunked loss": bm.loss_step(ours, batch, bm.optimizer(ours), chunked=True),
        "peftkit + hf loss": bm.loss_step(ours, batch, bm.optimizer(ours), chunked=False),
    }
    models = dict.fromkeys(steps, ours) | {"peft + hf loss": theirs}
    compare(f"smollm2 {rows}x{length}", device, steps, models, args.repeats, "peft + hf loss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=8, help="Llama batch rows")
    parser.add_argument("--length", type=int, default=256, help="Llama sequence length")
    parser.add_argument("--loss-rows", type=int, default=4)
    parser.add_argument("--loss-length", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2, help="layers of the SmolLM2-shaped model")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, peft {bm.peft.__version__}, {name}, bf16 base, fp32 LoRA factors")
    for dropout in (0.0, 0.05):
        lora_case(args, device, dropout)
    loss_case(args, device)


if __name__ == "__main__":
    main()
