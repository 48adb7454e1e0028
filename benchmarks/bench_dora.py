"""DoRA's cost over LoRA, in peftkit and in Hugging Face peft 0.21, side by side in one run.

    python benchmarks/bench_dora.py                            # Llama-shaped 4 x 256 and tiny 2 x 64, batch 8 x 128
    python benchmarks/bench_dora.py --sizes 6x512 --repeats 9  # the issue's larger shape
    python benchmarks/bench_dora.py --sizes minilm             # the real all-MiniLM-L6-v2 (SEQ_CLS), q/k/v/dense
    python benchmarks/bench_dora.py --device cuda
    flock /tmp/peftkit-bench.lock python benchmarks/bench_dora.py --sizes 6x512 minilm --threads 1  # the shared lock

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
MINILM_TARGETS = ["query", "key", "value", "dense"]


def build(size: str, batch: int, length: int, device: str) -> tuple[torch.nn.Module, list[str], dict]:
    """(base model, LoRA targets, one batch with labels) for a LAYERSxHIDDEN Llama or the real MiniLM."""
    if size == "minilm":
        import sys
        from pathlib import Path

        from transformers import AutoModelForSequenceClassification

        sys.path.insert(0, str(Path(__file__).parent))
        from common import minilm_folder

        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=2).to(device)
        ids = torch.randint(1000, 20000, (batch, length), device=device)
        return model, MINILM_TARGETS, {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), device=device)}
    layers, hidden = (int(v) for v in size.split("x"))
    ids = torch.randint(0, 1000, (batch, length), device=device)
    return llama(layers, hidden, device), TARGETS, {"input_ids": ids, "labels": ids}


def llama(layers: int, hidden: int, device: str) -> LlamaForCausalLM:
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


def contenders(base: torch.nn.Module, targets: list[str]) -> dict[str, torch.nn.Module]:
    out = {}
    for lib, (make, config_cls) in {
        "peftkit": (peftkit.get_peft_model, peftkit.LoraConfig),
        "peft": (peft.get_peft_model, peft.LoraConfig),
    }.items():
        for method, use_dora in (("lora", False), ("dora", True)):
            model = make(copy.deepcopy(base), config_cls(r=8, lora_alpha=16, target_modules=targets, use_dora=use_dora))
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


def timings(models: dict[str, torch.nn.Module], inputs: dict, repeats: int, device: str) -> dict[str, dict]:
    optimisers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()
    }

    def train_step(name: str) -> None:
        model = models[name].train()
        loss = model(**inputs).loss
        loss.backward()
        optimisers[name].step()
        optimisers[name].zero_grad(set_to_none=True)

    def infer(name: str) -> None:
        with torch.inference_mode():
            models[name].eval()(input_ids=inputs["input_ids"])

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
    print(f"\n== {'MiniLM (all-MiniLM-L6-v2)' if size == 'minilm' else f'Llama {size}'} ==")
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
    parser.add_argument("--sizes", nargs="+", default=["4x256", "2x64"], help="LAYERSxHIDDEN Llama shapes, or minilm")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, peft {peft.__version__}, device {args.device}, threads {threads}")
    print(f"batch {args.batch} x {args.length} tokens, r=8 on every projection, median of {args.repeats}")
    for size in args.sizes:
        base, targets, inputs = build(size, args.batch, args.length, args.device)
        report(size, timings(contenders(base, targets), inputs, args.repeats, args.device))


if __name__ == "__main__":
    main()
