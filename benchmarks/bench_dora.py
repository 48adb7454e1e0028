"""DoRA's cost over LoRA, in peftkit and in Hugging Face peft 0.21, side by side in one run.

    python benchmarks/bench_dora.py                            # Llama-shaped 4 x 256 and tiny 2 x 64, batch 8 x 128
    python benchmarks/bench_dora.py --sizes 6x512 --repeats 9  # the issue's larger shape
    python benchmarks/bench_dora.py --device cuda

Four contenders on copies of the same randomly initialised LlamaForCausalLM (built from a config, nothing
downloaded), r=8 on every projection (q, k, v, o, gate, up, down): peftkit LoRA, peftkit DoRA, peft LoRA, peft DoRA.
Adapters are perturbed away from their initial values. Two timings, alternating between contenders (A B C D, B C D A,
...), median over the repeats:
  - train step: forward, backward of the LM loss, AdamW step (the norm must be recomputed after each step);
  - inference: an unmerged forward under torch.inference_mode (peftkit's cached norm, peft's default: no cache).
Ratios: DoRA / LoRA within each library, and peftkit / peft for the same method.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit

warnings.filterwarnings("ignore")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(layers: int, hidden: int, device: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
    )
    return LlamaForCausalLM(config).to(device)


def contenders(base: torch.nn.Module) -> dict[str, torch.nn.Module]:
    out = {}
    for lib, (make, config_cls) in {
        "peftkit": (peftkit.get_peft_model, peftkit.LoraConfig),
        "peft": (peft.get_peft_model, peft.LoraConfig),
    }.items():
        for method, use_dora in (("lora", False), ("dora", True)):
            model = make(copy.deepcopy(base), config_cls(r=8, lora_alpha=16, target_modules=TARGETS, use_dora=use_dora))
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.01)
            out[f"{lib} {method}"] = model
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timings(models: dict[str, torch.nn.Module], ids: torch.Tensor, repeats: int, device: str) -> dict[str, dict]:
    optimisers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()
    }

    def train_step(name: str) -> None:
        model = models[name].train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimisers[name].step()
        optimisers[name].zero_grad(set_to_none=True)

    def infer(name: str) -> None:
        with torch.inference_mode():
            models[name].eval()(input_ids=ids)

    names = list(models)
    result = {n: {"train": [], "infer": []} for n in names}
    for kind, fn in (("train", train_step), ("infer", infer)):
        for name in names:  # warm-up (and peftkit's norm cache for inference)
            fn(name)
        for k in range(repeats):
            for name in names[k % len(names) :] + names[: k % len(names)]:
                _sync(device)
                start = time.perf_counter()
                fn(name)
                _sync(device)
                result[name][kind].append(time.perf_counter() - start)
    return {n: {kind: statistics.median(v) for kind, v in r.items()} for n, r in result.items()}


def report(size: str, t: dict[str, dict]) -> None:
    print(f"\n== Llama {size} ==")
    print(f"{'contender':<14} {'train step ms':>14} {'inference ms':>13}")
    for name, row in t.items():
        print(f"{name:<14} {row['train'] * 1e3:>14.2f} {row['infer'] * 1e3:>13.2f}")
    for kind in ("train", "infer"):
        kit = t["peftkit dora"][kind] / t["peftkit lora"][kind]
        ref = t["peft dora"][kind] / t["peft lora"][kind]
        vs = t["peftkit dora"][kind] / t["peft dora"][kind]
        print(f"{kind:>5}: DoRA/LoRA peftkit {kit:.3f}x, peft {ref:.3f}x; peftkit DoRA / peft DoRA {vs:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["4x256", "2x64"], help="LAYERSxHIDDEN shapes")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, peft {peft.__version__}, device {args.device}, threads {threads}")
    print(f"batch {args.batch} x {args.length} tokens, r=8 on {', '.join(TARGETS)}, median of {args.repeats}")
    for size in args.sizes:
        layers, hidden = (int(v) for v in size.split("x"))
        base = build(layers, hidden, args.device)
        ids = torch.randint(0, 1000, (args.batch, args.length), device=args.device)
        report(size, timings(contenders(base), ids, args.repeats, args.device))


if __name__ == "__main__":
    main()
