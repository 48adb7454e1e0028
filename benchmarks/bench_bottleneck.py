"""Inference latency that bottleneck adapters add, on the real MiniLM, next to LoRA unmerged and merged.

    python benchmarks/bench_bottleneck.py                 # batch 32 x 128, 15 repeats
    python benchmarks/bench_bottleneck.py --quick         # batch 8 x 64, 7 repeats
    python benchmarks/bench_bottleneck.py --batch 1 --length 32

Bottleneck adapters (Houlsby, Pfeiffer, parallel) and Compacter add layers that cannot be merged into the weights,
so they always cost time; LoRA costs time only until it is merged. Every contender is its own copy of the same
base model (AutoModel, feature extraction) with its adapter perturbed away from the identity; the timed forward
passes alternate between contenders (A B C ..., B C ... A, ...) under torch.inference_mode, and each row reports
the median over the repeats and its ratio to the base model's median (and the fastest run, which is steadier on a
shared machine). Parameter counts are the adapters' only.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

from common import minilm_folder  # noqa: E402

from peftkit import BottleneckConfig, CompacterConfig, LoraConfig, get_peft_model  # noqa: E402


def contenders(base: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, int]]:
    """name -> (model to time, trainable adapter parameters)."""
    configs = {
        "pfeiffer": BottleneckConfig(preset="pfeiffer"),
        "houlsby": BottleneckConfig(preset="houlsby"),
        "parallel": BottleneckConfig(preset="parallel"),
        "compacter++": CompacterConfig(preset="compacter++"),
        "compacter": CompacterConfig(preset="compacter"),
        "lora (q,v r=8)": LoraConfig(r=8, target_modules=["query", "value"]),
    }
    out: dict[str, tuple[torch.nn.Module, int]] = {"base": (base, 0)}
    for name, config in configs.items():
        pm = get_peft_model(copy.deepcopy(base), config).eval()
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for tensor in pm.adapter_state_dict("default").values():
                tensor.add_(torch.randn(tensor.shape, generator=g) * 0.01)
        out[name] = (pm, pm.get_nb_trainable_parameters()[0])
        if name.startswith("lora"):
            merged = copy.deepcopy(pm)
            merged.merge_adapter()
            out["lora merged"] = (merged, out[name][1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="batch 8 x 64, 7 repeats")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.length, args.repeats = 8, 64, 7
    torch.set_num_threads(args.threads)
    from transformers import AutoModel

    base = AutoModel.from_pretrained(minilm_folder(), dtype=torch.float32).eval()
    models = contenders(base)
    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(1000, 20000, (args.batch, args.length), generator=g)}
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for model, _ in models.values():  # warm-up
            model(**inputs)
        for rep in range(args.repeats):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                start = time.perf_counter()
                models[name][0](**inputs)
                times[name].append(time.perf_counter() - start)
    base_ms = statistics.median(times["base"]) * 1e3
    print(
        f"MiniLM (BERT, 6 layers, d=384), batch {args.batch} x {args.length}, {args.threads} threads, "
        f"median of {args.repeats}, torch {torch.__version__}"
    )
    print(f"{'contender':<16} {'adapter params':>14} {'median ms':>10} {'x base':>7} {'min ms':>8} {'x base':>7}")
    base_min = min(times["base"]) * 1e3
    for name in names:
        ms, fastest = statistics.median(times[name]) * 1e3, min(times[name]) * 1e3
        print(
            f"{name:<16} {models[name][1]:>14,d} {ms:>10.1f} {ms / base_ms:>7.3f} {fastest:>8.1f} "
            f"{fastest / base_min:>7.3f}"
        )


if __name__ == "__main__":
    main()
