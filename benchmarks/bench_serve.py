"""`peftkit serve` throughput: 64 concurrent clients over 1, 8 and 32 distinct LoRA adapters, against the same server
answering for the base model alone.

    python benchmarks/bench_serve.py                       # SmolLM2-135M and the Llama-shaped model (a few minutes)
    python benchmarks/bench_serve.py --models llama --rounds 3 --tokens 32

Method: one server (uvicorn in a thread, the real HTTP path: JSON bodies, the engine's continuous batching) holds
all 32 adapters (LoRA r=16 on every linear layer, random non-zero values); ``--clients`` asynchronous clients each
send one /v1/completions request (a ``--prompt``-token prompt of random ids, greedy, ``max_tokens=--tokens``), client
i naming adapter i mod k (or the base model). Throughput = generated tokens (the usage field) / wall time of the
whole wave. The four settings (base, 1, 8, 32 adapters) alternate within each round in a rotating order; the table
gives the median throughput and the median of the per-round ratios to the base model, which survive a machine
loaded by other work better than absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import httpx  # noqa: E402
import transformers  # noqa: E402
import uvicorn  # noqa: E402

from peftkit import LoraConfig, get_peft_model  # noqa: E402
from peftkit.serve.app import create_app  # noqa: E402
from peftkit.serve.protocol import Limits  # noqa: E402
from peftkit.serve.server import build_state  # noqa: E402
from peftkit.train.models import load_model, load_tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()
SETTINGS = (0, 1, 8, 32)  # 0: the base model


def llama_shaped(vocab: int) -> torch.nn.Module:
    """bench_lora.py's Llama-shaped model: 6 layers, hidden 512, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=512, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def base_model(name: str, tokenizer) -> torch.nn.Module:
    return load_model("smollm2", "causal_lm") if name == "smollm2" else llama_shaped(len(tokenizer))


def save_adapters(model: torch.nn.Module, folder: Path, count: int) -> dict[str, Path]:
    """``count`` LoRA adapters (r=16, all linear layers, non-zero B) saved under ``folder``; the model is left bare."""
    config = LoraConfig(
        r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, count):
        torch.manual_seed(i)
        peft_model.add_adapter(f"a{i}", config)
    peft_model.save_pretrained(folder)
    peft_model.unload()  # the base model's own layers back in place
    return {f"a{i}": folder / f"a{i}" for i in range(count)}


class Server:
    def __init__(self, state) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(state), port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


async def wave(port: int, names: list[str], prompts: list[list[int]], tokens: int) -> tuple[int, float]:
    """All clients at once; (generated tokens, seconds)."""
    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600, limits=limits) as client:

        async def one(i: int) -> int:
            body = {"model": names[i % len(names)], "prompt": prompts[i], "max_tokens": tokens, "temperature": 0}
            answer = await client.post("/v1/completions", json=body)
            answer.raise_for_status()
            return answer.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        return sum(counts), time.perf_counter() - start


def run_model(name: str, args: argparse.Namespace) -> None:
    tokenizer = load_tokenizer("smollm2")
    model = base_model(name, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        adapters = save_adapters(model, Path(tmp), max(SETTINGS))
        state = build_state(
            model, tokenizer, adapters, base_name="base", max_loaded=max(SETTINGS), max_batch=args.clients,
            limits=Limits(max_tokens=args.tokens),
        )  # fmt: skip
        print(f"{name}: {len(adapters)} adapters saved and loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        server = Server(state)
        g = torch.Generator().manual_seed(0)
        vocab = len(tokenizer)
        prompts = [torch.randint(100, vocab, (args.prompt,), generator=g).tolist() for _ in range(args.clients)]
        asyncio.run(wave(server.port, ["a0"], prompts[:4], min(4, args.tokens)))  # warm-up
        speed: dict[int, list[float]] = {k: [] for k in SETTINGS}
        for r in range(args.rounds):
            order = SETTINGS[r % len(SETTINGS) :] + SETTINGS[: r % len(SETTINGS)]
            for k in order:
                names = ["base"] if k == 0 else [f"a{i}" for i in range(k)]
                count, seconds = asyncio.run(wave(server.port, names, prompts, args.tokens))
                speed[k].append(count / seconds)
                print(f"  round {r} adapters={k:2d}: {count} tokens in {seconds:.2f} s", flush=True)
        server.stop()
        steps = decode_steps(state, args.clients, 2 * args.rounds + 1)
    report(name, args, speed)
    bandwidth = read_bandwidth()
    print(
        f"| adapters (one routed decoding step, no HTTP) | ms (median) | vs base model | factors read per step (MB) "
        f"| floor: base + MB / {bandwidth / 1e9:.1f} GB/s (this core's read bandwidth) |"
    )
    print("| --- | --- | --- | --- | --- |")
    base = statistics.median(steps[0])
    for k in SETTINGS:
        label = "base model" if k == 0 else str(k)
        moved = factor_bytes(state.registry.model, k)
        floor = base + moved / bandwidth
        print(
            f"| {label} | {1000 * statistics.median(steps[k]):.1f} | {statistics.median(steps[k]) / base:.3f}x "
            f"| {moved / 1e6:.0f} | {1000 * floor:.1f} ms = {floor / base:.3f}x (at best {base / floor:.3f}x the "
            "base model's throughput) |"
        )
    sys.stdout.flush()


def factor_bytes(model: torch.nn.Module, k: int) -> int:
    """Bytes of LoRA factors a decoding step must read with rows over k distinct adapters: every adapter's A and B
    in every adapted layer, once per step (they do not fit in this CPU's caches, see ``read_bandwidth``)."""
    per_adapter = 0
    for module in model.modules():
        if hasattr(module, "lora_A") and "a0" in module.lora_A:
            a, b = module.lora_A["a0"].weight, module.lora_B["a0"].weight
            per_adapter += a.numel() * a.element_size() + b.numel() * b.element_size()
    return k * per_adapter


def read_bandwidth(megabytes: int = 256) -> float:
    """Bytes per second one pass over a tensor larger than the factors reads (the median of 5 sums): what reading
    the adapters' factors once per step costs at least."""
    data = torch.ones(megabytes * 2**20 // 4)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times[1:])


def decode_steps(state, batch: int, repeats: int) -> dict[int, list[float]]:
    """In-process, no HTTP: seconds of one decoding step (batch rows, one token each) over a cache of 32 tokens and
    growing, rows routed over k adapters (k = 0: the base model) and sorted by adapter as the engine keeps them,
    alternating the settings; what the per-row layers cost."""
    from peftkit.core.layer import BASE, fixed_weights
    from peftkit.serve.batch import decode_step, prefill

    model = state.registry.model
    prompts = [[100 + i] * 32 for i in range(batch)]
    times: dict[int, list[float]] = {k: [] for k in SETTINGS}
    with torch.inference_mode(), fixed_weights():  # as the engine runs its steps
        _, kv = prefill(model, prompts, [BASE] * batch, 0)
        chains = dict.fromkeys(SETTINGS, kv)  # each setting grows its own copy of the cache, as a running batch does
        for r in range(repeats + 1):  # round 0: warm-up (each chain's first step allocates its room to grow in)
            for k in SETTINGS[r % len(SETTINGS) :] + SETTINGS[: r % len(SETTINGS)]:
                names = [BASE] * batch if k == 0 else [f"a{i * k // batch}" for i in range(batch)]  # by adapter
                start = time.perf_counter()
                _, chains[k] = decode_step(model, chains[k], [5] * batch, names)
                if r:
                    times[k].append(time.perf_counter() - start)
    return times


def report(name: str, args: argparse.Namespace, speed: dict[int, list[float]]) -> None:
    setting = f"{args.clients} clients, prompt {args.prompt} tokens, {args.tokens} generated, {args.rounds} rounds"
    print(f"\n{name}: {setting}")
    print("| adapters | tokens/s (median) | vs base model (median of per-round ratios) |")
    print("| --- | --- | --- |")
    for k in SETTINGS:
        ratios = [s / b for s, b in zip(speed[k], speed[0])]
        label = "base model" if k == 0 else str(k)
        print(f"| {label} | {statistics.median(speed[k]):.1f} | {statistics.median(ratios):.3f}x |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama", "smollm2"], choices=["llama", "smollm2"])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of each request")
    parser.add_argument("--prompt", type=int, default=8, help="prompt length in tokens")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for name in args.models:
        run_model(name, args)


if __name__ == "__main__":
    main()
