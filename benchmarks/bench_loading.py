"""LoRA injection and adapter loading on a ~1B-parameter Llama-shaped model, peftkit vs Hugging Face peft 0.21.

    python benchmarks/bench_loading.py            # 1.1B model (TinyLlama shape, bf16, 2.2 GB), 5 repeats
    python benchmarks/bench_loading.py --quick    # 3 repeats, no rank / model-size sweep

The base model is built on the meta device and given uninitialised CPU storage (``to_empty``): building it takes
a second instead of minutes of random init, and its weights' values do not matter for timing. One copy serves both
libraries: each run injects (or loads) and then unloads, alternating peftkit and peft, medians reported.

  inject  get_peft_model(model, LoraConfig(r=16, target_modules=q,k,v,o,gate,up,down))
  load    PeftModel.from_pretrained(model, folder): inject + read the safetensors file + copy the tensors
  add     load_adapter(folder, "second") on a model that already holds one adapter

The sweep shows what load time grows with: the same adapter (LoRA on q, v) on models whose MLPs differ 4x in size
(the adapter is identical), and adapters of rank 8, 32 and 128 on one model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import peft  # noqa: E402
import transformers  # noqa: E402

import peftkit  # noqa: E402

transformers.logging.set_verbosity_error()
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(intermediate: int = 5632, layers: int = 22) -> torch.nn.Module:
    """Llama-shaped, TinyLlama-1.1B's dimensions by default (hidden 2048, 32 heads, 4 key/value heads), bf16."""
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        torch_dtype=torch.bfloat16,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    return model.to_empty(device="cpu").eval()


def alternate(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of each run's own timing (each returns seconds), calls interleaved with a rotating order."""
    keys, times = list(runs), {k: [] for k in runs}
    for i in range(repeats + 1):  # the first round warms up
        for k in keys[i % len(keys) :] + keys[: i % len(keys)]:
            t = runs[k]()
            if i:
                times[k].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def timed(f: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = f()
    return time.perf_counter() - start, out


def save_adapter(model: torch.nn.Module, folder: Path, r: int, targets: list[str]) -> None:
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    pm.save_pretrained(folder)
    pm.unload()


def inject_runs(model, targets: list[str], r: int = 16) -> dict[str, Callable[[], float]]:
    def ours() -> float:
        t, pm = timed(lambda: peftkit.get_peft_model(model, peftkit.LoraConfig(r=r, target_modules=targets)))
        pm.unload()
        return t

    def theirs() -> float:
        t, pm = timed(lambda: peft.get_peft_model(model, peft.LoraConfig(r=r, target_modules=targets)))
        pm.unload()
        return t

    return {"peftkit": ours, "peft": theirs}


def load_runs(model, folder: Path) -> dict[str, Callable[[], float]]:
    def ours() -> float:
        t, pm = timed(lambda: peftkit.PeftModel.from_pretrained(model, folder))
        pm.unload()
        return t

    def theirs() -> float:
        t, pm = timed(lambda: peft.PeftModel.from_pretrained(model, folder))
        pm.unload()
        return t

    return {"peftkit": ours, "peft": theirs}


def add_runs(model, folder: Path) -> dict[str, Callable[[], float]]:
    def ours() -> float:
        pm = peftkit.PeftModel.from_pretrained(model, folder)
        t, _ = timed(lambda: pm.load_adapter(folder, adapter_name="second"))
        pm.unload()
        return t

    def theirs() -> float:
        pm = peft.PeftModel.from_pretrained(model, folder)
        t, _ = timed(lambda: pm.load_adapter(folder, adapter_name="second"))
        pm.unload()
        return t

    return {"peftkit": ours, "peft": theirs}


def row(label: str, t: dict[str, float]) -> None:
    print(f"{label:44} | {t['peftkit']:8.3f} {t['peft']:8.3f} | {t['peftkit'] / t['peft']:6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats, no sweep")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = build()
    n = sum(p.numel() for p in model.parameters())
    print(
        f"torch {torch.__version__}, peft {peft.__version__}, peftkit {peftkit.__version__}, threads {args.threads}, "
        f"repeats {repeats}; model {n / 1e9:.2f}B params (bf16), built in {time.perf_counter() - start:.1f} s"
    )
    print(f"{'what':44} | {'peftkit s':>8} {'peft s':>8} | {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "all16"
        save_adapter(model, folder, 16, ALL)
        mb = (folder / "adapter_model.safetensors").stat().st_size / 2**20
        row("inject r=16, all linear", alternate(inject_runs(model, ALL), repeats))
        row(f"from_pretrained r=16, all linear ({mb:.0f} MB)", alternate(load_runs(model, folder), repeats))
        row("load_adapter (second adapter), same file", alternate(add_runs(model, folder), repeats))
        if args.quick:
            return
        for r in (8, 32, 128):
            sweep = Path(tmp) / f"qv{r}"
            save_adapter(model, sweep, r, ["q_proj", "v_proj"])
            mb = (sweep / "adapter_model.safetensors").stat().st_size / 2**20
            row(f"from_pretrained q,v r={r} ({mb:.1f} MB), 1.1B model", alternate(load_runs(model, sweep), repeats))
        del model
        small = build(intermediate=1408)
        n = sum(p.numel() for p in small.parameters())
        sweep = Path(tmp) / "qv32"
        row(f"from_pretrained q,v r=32, {n / 1e9:.2f}B model (MLP / 4)", alternate(load_runs(small, sweep), repeats))


if __name__ == "__main__":
    main()
