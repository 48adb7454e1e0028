"""`peftkit serve` against the real `openai` client: a tiny Llama with a byte-level tokenizer and a chat template, three
LoRA adapters, a uvicorn server in a thread on a free port. Every answer is checked against `peftkit generate` (greedy)
with the same adapter, alone."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

from models import perturb, tiny_gpt2, tiny_llama  # noqa: E402
from peftkit import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model  # noqa: E402
from peftkit.serve.batch import KVBatch, decode_step, prefill  # noqa: E402
from peftkit.serve.protocol import Limits  # noqa: E402
from peftkit.serve.sampling import SamplingParams, TextStream, make_generator, next_tokens, top_p_filter  # noqa: E402
from peftkit.serve.server import build_state  # noqa: E402
from peftkit.train.models import load_model, load_tokenizer  # noqa: E402

KEY = "test-key"
ADAPTERS = ("alpha", "beta", "gamma")
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges over printable ASCII and newline, with ChatML's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {s: i for i, s in enumerate(["<pad>", "<|im_start|>", "<|im_end|>"])}
    for b in [10, *range(32, 127)]:  # GPT-2's byte -> character map for these bytes
        vocab[chr(b) if 33 <= b <= 126 else chr(256 + b)] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tok.chat_template = CHAT
    return tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A uvicorn server in a thread."""

    def __init__(self, state) -> None:
        import uvicorn

        from peftkit.serve.app import create_app

        self.state, self.port = state, free_port()
        config = uvicorn.Config(create_app(state), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started and time.time() < deadline:
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The base model folder, three adapters under the allowed root, a fourth there for runtime loading and one
    outside the root."""
    tmp = tmp_path_factory.mktemp("serve")
    tok = byte_tokenizer()
    config = dict(vocab_size=len(tok), max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    tiny_llama(**config).save_pretrained(tmp / "tiny")
    tok.save_pretrained(tmp / "tiny")
    out = {"model": tmp / "tiny", "root": tmp / "root"}
    for seed, name in enumerate([*ADAPTERS, "delta", "outside"], start=1):
        pm = get_peft_model(tiny_llama(**config), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
        perturb(pm, "default", seed, 0.3)
        out[name] = (tmp / "elsewhere" / name) if name == "outside" else (out["root"] / name)
        pm.save_pretrained(out[name])
    prompt = get_peft_model(tiny_llama(**config), PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    prompt.save_pretrained(out["root"] / "prompt")  # hooks the inputs: refused by the server
    (out["root"] / "link").symlink_to(out["outside"])  # inside the root by name, outside once resolved
    return out


@pytest.fixture(scope="module")
def server(folders):
    state = build_state(
        load_model(str(folders["model"]), "causal_lm"),
        load_tokenizer(str(folders["model"])),
        {name: folders[name] for name in ADAPTERS},
        base_name="tiny",
        adapter_root=folders["root"],
        max_loaded=3,
        max_batch=16,
        limits=Limits(max_tokens=64, max_body_bytes=4096),
        api_key=KEY,
    )
    running = Running(state)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)


def cli_generate(folders, adapter: str, prompt: str, tokens: int) -> str:
    """What `peftkit generate ADAPTER --prompt PROMPT --max-new-tokens N --model MODEL` prints (greedy)."""
    from typer.testing import CliRunner

    from peftkit.cli.main import app

    args = ["generate", str(folders[adapter]), "--prompt", prompt, "--max-new-tokens", str(tokens)]
    result = CliRunner().invoke(app, [*args, "--model", str(folders["model"])])
    assert result.exit_code == 0, result.output
    return result.stdout.rstrip("\n")


def templated(prompt: str) -> str:
    """The prompt as `peftkit generate` feeds it (the chat template, assistant turn opened)."""
    return byte_tokenizer().apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                add_generation_prompt=True)  # fmt: skip


def complete(client, model: str, prompt: str, tokens: int = 12, **kw) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0, **kw).choices[0].text


# ---- the API ------------------------------------------------------------------------------------------------
def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "tiny" and set(ADAPTERS) <= set(ids)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_completions_and_chat_equal_peftkit_generate(client, folders, adapter):
    prompt = f"Tell {adapter} a story"
    expected = cli_generate(folders, adapter, prompt, 12)
    text = complete(client, adapter, templated(prompt))
    chat = client.chat.completions.create(
        model=adapter, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0
    )
    assert text.strip() == expected
    assert chat.choices[0].message.content.strip() == expected
    assert chat.usage.prompt_tokens == len(byte_tokenizer()(templated(prompt))["input_ids"])


def test_adapters_and_base_differ(client):
    """The adapters are not the identity: each gives another answer than the base model (routing is not a no-op)."""
    answers = {name: complete(client, name, templated("same prompt"), 16) for name in ("tiny", *ADAPTERS)}
    assert len(set(answers.values())) == 4


def test_streaming_equals_the_whole_answer(client):
    whole = complete(client, "beta", templated("stream me"), 20)
    pieces = list(client.completions.create(model="beta", prompt=templated("stream me"), max_tokens=20,
                                            temperature=0, stream=True))  # fmt: skip
    assert len(pieces) > 2 and "".join(p.choices[0].text for p in pieces) == whole
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    chat = client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "stream me"}],
                                          max_tokens=20, temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chat) == whole


def test_a_request_that_does_not_stream_gets_one_event_with_the_whole_text(server):
    """engine.py: per-token events wake the caller's event loop; a non-streaming request gets only the last one,
    holding everything a streaming request would have been sent, piece by piece."""
    from peftkit.serve.engine import Request

    tok = server.state.tokenizer
    prompt = tok.encode(templated("count with me"))
    got: dict[bool, list] = {True: [], False: []}
    for streaming in (True, False):
        params = SamplingParams(max_tokens=24, temperature=0, stop=("zz",))
        server.state.engine.submit(Request(prompt, "alpha", params, got[streaming].append, tok, streaming))
        deadline = time.time() + 10
        while not (got[streaming] and got[streaming][-1].finish_reason) and time.time() < deadline:
            time.sleep(0.01)
    assert len(got[False]) == 1 and len(got[True]) > 2
    assert got[False][0].text == "".join(e.text for e in got[True]) != ""
    assert got[False][0].completion_tokens == got[True][-1].completion_tokens


def test_concurrent_mixed_adapters_each_equal_its_solo_run(client, server):
    jobs = [(name, f"prompt {i} for {name}") for i in range(3) for name in (*ADAPTERS, "tiny")]
    solo = {job: complete(client, job[0], templated(job[1]), 16) for job in jobs}
    engine = server.state.engine
    engine.max_rows_seen = 0
    orders, sort_rows = [], engine._sort_rows
    engine._sort_rows = lambda rank: (sort_rows(rank), orders.append([r.adapter for r in engine._running]))
    hold = engine.call(lambda: time.sleep(0.5))  # the engine pauses: every request below queues, then all join at once
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            together = dict(zip(jobs, pool.map(lambda job: complete(client, job[0], templated(job[1]), 16), jobs)))
        hold.result()
    finally:
        del engine._sort_rows
    assert together == solo
    assert engine.max_rows_seen > 4  # the requests shared forward passes
    rank = {name: k for k, name in enumerate(server.state.registry.model.peft_config)}  # the stacks' slot order
    ranks = [[rank.get(name, -1) for name in order] for order in orders]
    assert any(len(set(r)) > 1 for r in ranks) and all(r == sorted(r) for r in ranks)  # rows sit by adapter


def test_a_client_that_goes_away_frees_its_row(server):
    engine, registry = server.state.engine, server.state.registry
    dropped = engine.dropped
    body = {"model": "beta", "prompt": "bye", "max_tokens": 64, "temperature": 0, "stream": True}
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"})
    with http, http.stream("POST", "/v1/completions", json=body) as answer:
        next(line for line in answer.iter_lines() if line.startswith("data:"))
        hold = engine.call(lambda: time.sleep(0.3))  # the row is still running when the connection closes
    hold.result()
    deadline = time.time() + 5
    while engine.dropped == dropped and time.time() < deadline:
        time.sleep(0.01)
    assert engine.dropped == dropped + 1 and not registry.in_use.get("beta")


def test_seed_repeats_and_stop_cuts(client):
    def sample(seed: int) -> str:
        return client.completions.create(model="gamma", prompt="abc", max_tokens=16, temperature=1.0, top_p=0.9,
                                         seed=seed).choices[0].text  # fmt: skip

    assert sample(7) == sample(7) and sample(7) != sample(8)
    whole = complete(client, "alpha", "stop test", 24)
    stop = whole[5:7]
    cut = client.completions.create(model="alpha", prompt="stop test", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == whole[: whole.find(stop)] and cut.choices[0].finish_reason == "stop"
    out = client.completions.create(model="alpha", prompt="stop test", max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5


def test_load_unload_at_run_time_and_lru(client, server, folders):
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"})
    soft = http.post("/v1/adapters", json={"name": "soft", "path": "prompt"})
    assert soft.status_code == 400 and "hooks the model's inputs" in soft.json()["error"]["message"]
    assert http.post("/v1/adapters", json={"name": "delta", "path": "delta"}).status_code == 201
    registry = server.state.registry
    assert len(registry.resident) <= 3 and "delta" in registry.resident  # LRU cap: one of the others left memory
    assert complete(client, "delta", templated("hi")).strip() == cli_generate(folders, "delta", "hi", 12)
    evicted = next(n for n in ADAPTERS if n not in registry.resident)
    assert complete(client, evicted, templated("hi")).strip() == cli_generate(folders, evicted, "hi", 12)
    assert http.delete("/v1/adapters/delta").status_code == 200
    assert "delta" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        complete(client, "delta", "hi")


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("post", "/v1/adapters", {"name": "escape", "path": "../elsewhere/outside"}, 403),
        ("post", "/v1/adapters", {"name": "../escape", "path": "alpha"}, 400),
        ("post", "/v1/adapters", {"name": "x", "path": "/etc"}, 403),
        ("post", "/v1/adapters", {"name": "linked", "path": "link"}, 403),
        ("post", "/v1/adapters", {"name": "empty", "path": "."}, 400),
        ("post", "/v1/adapters", {"name": "soft", "path": "prompt"}, 400),
        ("post", "/v1/adapters", {"name": "alpha", "path": "alpha"}, 400),
        ("delete", "/v1/adapters/nope", None, 404),
        ("post", "/v1/completions", {"model": "nope", "prompt": "hi"}, 404),
        ("post", "/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": -1}, 400),
        ("post", "/v1/completions", {"model": "alpha", "prompt": "hi", "max_tokens": 100000}, 400),
        ("post", "/v1/completions", {"model": "alpha", "prompt": "x" * 5000}, 413),
        ("post", "/v1/completions", {"model": "alpha"}, 400),
        ("post", "/v1/completions", {"model": "alpha", "prompt": "hi", "temperature": "hot"}, 400),
        ("post", "/v1/completions", {"model": "alpha", "prompt": [5, 100000]}, 400),
        ("post", "/v1/chat/completions", {"model": "alpha", "messages": []}, 400),
    ],
)
def test_bad_requests_are_4xx_and_the_server_stays_up(client, server, method, path, body, status):
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"})
    answer = http.request(method.upper(), path, json=body)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["message"]
    assert http.get("/health").status_code == 200
    assert complete(client, "alpha", "still up", 3)


def test_bad_json_wrong_key_and_openai_errors(client, server):
    http = httpx.Client(base_url=server.url)
    assert http.post("/v1/completions", json={"model": "alpha", "prompt": "hi"}).status_code == 401
    wrong = http.post("/v1/completions", json={"model": "alpha"}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    broken = http.post("/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="alpha", prompt="hi", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="unknown", messages=[{"role": "user", "content": "hi"}])


def test_graceful_shutdown_finishes_running_requests(folders):
    state = build_state(load_model(str(folders["model"]), "causal_lm"), load_tokenizer(str(folders["model"])),
                        {"alpha": folders["alpha"]}, base_name="tiny")  # fmt: skip
    running = Running(state)
    local = openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0, timeout=30)
    hold = state.engine.call(lambda: time.sleep(0.5))  # the request below is still queued when shutdown starts
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(local.completions.create, model="alpha", prompt="long", max_tokens=40, temperature=0)
        time.sleep(0.2)
        running.stop()
        out = answer.result()
    hold.result()
    assert out.usage.completion_tokens == 40 or out.choices[0].finish_reason == "stop"
    assert not running.thread.is_alive() and not state.engine.alive


# ---- the pieces ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "config"),
    [
        (tiny_llama, lambda: LoraConfig(r=4, target_modules="all-linear")),
        (tiny_gpt2, lambda: LoraConfig(r=4, target_modules="all-linear")),
        (tiny_llama, lambda: IA3Config(task_type="CAUSAL_LM")),
    ],
    ids=["llama-lora", "gpt2-lora", "llama-ia3"],
)
def test_rows_joining_and_leaving_match_each_row_alone(build, config):
    """batch.py: two rows prefilled together, two more joining mid-way, rows leaving: each equals its own run
    (Llama: rotary positions, grouped-query attention; GPT-2: learned positions, Conv1D layers; (IA)3 as well)."""
    pm = get_peft_model(build(), config(), "a")
    pm.add_adapter("b", config())
    perturb(pm, "a", 1, 0.5), perturb(pm, "b", 2, 0.5)
    pm.eval()
    prompts, names, steps = [[5, 6, 7, 8], [10, 11], [3, 4, 5, 6, 7, 8, 9], [20]], ["a", "b", "__base__", "a"], 6

    def alone(i: int) -> list[int]:
        logits, kv = prefill(pm, [prompts[i]], [names[i]], 0)
        out = [int(logits.argmax())]
        while len(out) < steps:
            logits, kv = decode_step(pm, kv, [out[-1]], [names[i]])
            out.append(int(logits.argmax()))
        return out

    logits, kv = prefill(pm, prompts[:2], names[:2], 0)
    out, rows = {0: [int(logits[0].argmax())], 1: [int(logits[1].argmax())]}, [0, 1]
    for step in range(3 * steps):
        if step == 2:
            logits, more = prefill(pm, prompts[2:], names[2:], 0)
            out.update({2: [int(logits[0].argmax())], 3: [int(logits[1].argmax())]})
            kv, rows = kv.stack(more), [*rows, 2, 3]
        keep = [k for k, r in enumerate(rows) if len(out[r]) < steps - (r == 1)]  # row 1 leaves one step early
        kv, rows = kv.keep(keep), [rows[k] for k in keep]
        if not rows:
            break
        logits, kv = decode_step(pm, kv, [out[r][-1] for r in rows], [names[r] for r in rows])
        for r, t in zip(rows, logits.argmax(-1).tolist()):
            out[r].append(t)
    assert all(out[i] == alone(i)[: len(out[i])] for i in range(4))
    assert KVBatch().keep([]).size == 0


def test_the_cache_grows_in_place_and_two_steps_from_one_cache_keep_their_own_entries():
    """batch.py ``Columns``: a decoding step writes its column into spare room (no copy of the whole cache per token)
    and equals a fresh prefill of the whole sequences (transformers' own cache); two steps taken from one cache each
    keep their own entries."""
    model = tiny_llama().eval()
    with torch.no_grad():
        _, kv = prefill(model, [[5, 6, 7], [8, 9]], None, 0)
        _, kv1 = decode_step(model, kv, [1, 2], None)
        second, kv2 = decode_step(model, kv1, [3, 4], None)
        assert kv2.layers[0][0].data_ptr() == kv1.layers[0][0].data_ptr()  # the same buffer: nothing copied
        other, _ = decode_step(model, kv1, [7, 7], None)  # from kv1 again: kv2's column 4 must survive
        again, _ = decode_step(model, kv2, [5, 5], None)
        for got, rows in [
            (second, [[5, 6, 7, 1, 3], [8, 9, 2, 4]]),
            (other, [[5, 6, 7, 1, 7], [8, 9, 2, 7]]),
            (again, [[5, 6, 7, 1, 3, 5], [8, 9, 2, 4, 5]]),
        ]:
            torch.testing.assert_close(got, prefill(model, rows, None, 0)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("adapters", "tokens"),
    [
        ([0, 1, 2, 1, 0, 2], 1),
        ([2, 2, 0, 2, 1, 2], 3),
        ([0, 0, 0, 0, 0, 1], 1),
        ([0, 0, 0, 0, 0, 0, 1, 2], 4),
        ([0, 0, 1, 1, 2, 2], 3),  # already in layout order: no rows moved, also at several tokens per row
        ([1, 1, 1, 1], 2),
    ],
)
def test_grouped_rows_equal_each_row_through_its_own_factors(adapters, tokens):
    """methods/lora/rows.py: s_k B_k A_k x_i + c_k + bias per row, by hand; very uneven use falls back (None) to the
    gathered path, which gives the same values."""
    from peftkit.core.layer import Routing
    from peftkit.methods.lora.rows import FactorStack, gathered_delta, grouped_delta, segments

    g = torch.Generator().manual_seed(0)
    a, b, c = torch.randn(3, 5, 2, generator=g), torch.randn(3, 2, 4, generator=g), torch.randn(3, 4, generator=g)
    x, bias = torch.randn(len(adapters), tokens, 5, generator=g), torch.randn(4, generator=g)
    routing = Routing(("p", "q", "r"), torch.tensor(adapters))
    stack = FactorStack({"p": 0, "q": 1, "r": 2}, a, b, c)
    want = torch.stack([x[i] @ a[k] @ b[k] + c[k] + bias for i, k in enumerate(adapters)])
    got, layout = grouped_delta(routing, x, stack, bias)
    plan = segments(torch.tensor(adapters), 3)
    grouped = layout.segments
    if not grouped.in_place and len(layout.used) * grouped.width * tokens > len(adapters) * 2:
        assert got is None  # moving the rows would move more than gathering the factors
    else:
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(gathered_delta(x, stack, layout, bias), want)
    assert sorted(plan.back.tolist()) == plan.back.unique().tolist()  # every row has its own slot
    assert all(plan.gather[slot] == row for row, slot in enumerate(plan.back.tolist()))
    assert grouped.in_place == (adapters == sorted(adapters) and len(set(map(adapters.count, adapters))) == 1)


def test_greedy_rows_pick_argmax_first_maximum_ties_and_nan_included():
    """sampling.py reads greedy tokens with ``max(-1).indices`` (faster than argmax on CPU): the same index."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    logits[1, [3, 9]] = 9.0  # a tie: the first
    logits[2, [4, 30]] = float("nan")  # NaN counts as the maximum, as in argmax
    logits[3] = 0.0
    rows = len(logits)
    got = next_tokens(logits, [SamplingParams(max_tokens=1, temperature=0)] * rows, [make_generator(None)] * rows)
    assert got == logits.argmax(-1).tolist() and got[1:4] == [3, 4, 0]


def test_top_p_keeps_the_nucleus_and_stop_strings_are_held_back():
    probs = torch.tensor([0.125, 0.5, 0.25, 0.125])
    assert top_p_filter(probs, 0.7).tolist() == [0.0, 0.5, 0.25, 0.0]
    assert top_p_filter(probs, 0.4).tolist() == [0.0, 0.5, 0.0, 0.0]
    tok = byte_tokenizer()
    stream = TextStream(tok, ("XY",))
    ids = tok("abcX")["input_ids"]
    assert stream.push(ids) == "abc"  # "X" may start the stop string
    assert stream.push(ids + tok("Yz")["input_ids"][:1]) == "" and stream.stopped


def test_cli_serve_is_registered_and_names_its_extra():
    from typer.testing import CliRunner

    from peftkit.cli.main import app, extra_of
    from peftkit.cli.serve import parse_adapters

    assert extra_of("fastapi") == "serve" and extra_of("uvicorn") == "serve"
    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0 and "--adapter-root" in result.output and "127.0.0.1" in result.output
    assert parse_adapters(["a=x", "b=y"]) == {"a": "x", "b": "y"}
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_adapters(["oops"])
