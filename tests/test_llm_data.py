"""LLM fine-tuning data (issue 17 item 1): files and saved data sets through ``datasets``, conversation formats,
the assistant-only loss mask through a chat template, column matching, the stratified dev split, the summary."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import tiny_runs as T

from models import DATA, needs_smollm2, smollm2_folder
from peftkit.errors import ConfigError
from peftkit.train import TrainConfig, chat
from peftkit.train import data as D

IGNORE = D.IGNORE
CONVERSATION = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "Thanks! Which one is bigger?"},
    {"role": "assistant", "content": "Paris has fewer people than Rome within its city limits."},
]


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder())


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return T.tokenizer(tmp_path_factory.mktemp("tok"))


def expected_chatml(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """SmolLM2's ChatML written out by hand: each turn '<|im_start|>role\\ncontent<|im_end|>\\n'; trained: an
    assistant's content and its '<|im_end|>' (not the header, not the newline after the turn)."""
    ids, trained = [], []
    for m in messages:
        head, body, tail = f"<|im_start|>{m['role']}\n", f"{m['content']}<|im_end|>", "\n"
        for text, on in ((head, False), (body, m["role"] == "assistant"), (tail, False)):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            trained += [on] * len(piece)
    return ids, trained


# ---- the loss mask, token by token ---------------------------------------------------------------------------
@needs_smollm2
def test_three_turn_conversation_trains_on_every_assistant_turn_and_nothing_else(smol_tokenizer):
    tok = smol_tokenizer
    enc = chat.encode_conversation(CONVERSATION, tok, max_length=512)
    ids, trained = expected_chatml(tok, CONVERSATION)
    assert enc["input_ids"] == ids == tok(tok.apply_chat_template(CONVERSATION, tokenize=False))["input_ids"]
    for position, (token, label, on) in enumerate(zip(enc["input_ids"], enc["labels"], trained)):
        assert label == (token if on else IGNORE), (position, tok.decode([token]))
    runs, run = [], []
    for token, label in zip(enc["input_ids"], enc["labels"]):
        if label != IGNORE:
            run.append(token)
        elif run:
            runs, run = [*runs, tok.decode(run)], []
    answers = [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"]
    assert runs == answers  # three runs, one per assistant turn, each the answer and its end-of-turn token
    cut = chat.encode_conversation(CONVERSATION, tok, max_length=20)
    assert cut["input_ids"] == ids[:20] and cut["labels"] == enc["labels"][:20]


def test_mask_with_a_template_of_the_tokenizers_own_tokens_and_without_offsets(tiny_tokenizer):
    """A template built from the tiny BERT vocabulary; the path for tokenizers without offsets (slow ones)
    tokenizes the pieces between turn edges and gives the same ids and labels here."""
    tok = tiny_tokenizer
    tok.chat_template = (
        "{% for m in messages %}{{ '[CLS] ' + m['role'] + ' ' + m['content'] + ' [SEP] ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[CLS] assistant ' }}{% endif %}"
    )
    messages = [
        {"role": "user", "content": "tell me about the movie"},
        {"role": "assistant", "content": "the movie was good"},
        {"role": "user", "content": "what about the plot"},
        {"role": "assistant", "content": "the plot is awful"},
    ]
    fast = chat.encode_conversation(messages, tok, 64)
    words = tok.convert_ids_to_tokens(fast["input_ids"])
    trained = [w for w, label in zip(words, fast["labels"]) if label != IGNORE]
    assert trained == ["the", "movie", "was", "good", "[SEP]", "the", "plot", "is", "awful", "[SEP]"]

    class Slow:  # the same tokenizer, seen as one without offset mappings
        is_fast = False

        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *args, **kwargs):
            return tok(*args, **kwargs)

    assert chat.encode_conversation(messages, Slow(), 64) == fast
    tok.chat_template = None
    plain = chat.encode_conversation(messages, tok, 64)  # the fallback "role: content" template, eos after answers
    assert tok.convert_ids_to_tokens([i for i in plain["labels"] if i != IGNORE])[-1] == "[SEP]"


# ---- formats -------------------------------------------------------------------------------------------------
def test_formats_are_detected_from_the_columns_and_give_the_same_conversation():
    cfg = TrainConfig()
    sharegpt = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    cases = {
        "messages": ({"Messages": messages}, "messages"),
        "sharegpt": ({"conversations": sharegpt}, "sharegpt"),
        "pairs": ({"prompt": "hi", "completion": "hello"}, "pairs"),
        "trl conversational pairs": ({"prompt": messages[:1], "completion": messages[1:]}, "pairs"),
    }
    for name, (row, fmt) in cases.items():
        cols = D.detect_columns([row], cfg)
        assert (cols.task, cols.format) == ("causal_lm", fmt), name
        assert D.conversation(row, cols) == messages, name
    alpaca = {"Instruction": "Add", "INPUT": "2 and 3", "Output": "5"}
    cols = D.detect_columns([alpaca], cfg)
    assert (cols.prompt, cols.extra_input, cols.response) == ("Instruction", "INPUT", "Output")
    assert D.conversation(alpaca, cols)[0]["content"] == "Add\n\n2 and 3"
    cols = D.detect_columns([{"question": "1+1?", "answer": "2\n#### 2"}], cfg)  # GSM8K
    assert (cols.task, cols.prompt, cols.response) == ("causal_lm", "question", "answer")
    cols = D.detect_columns([{"TEXT": "good", "Label": "1"}], cfg)  # names matched case-insensitively
    assert (cols.task, cols.text, cols.label) == ("classification", "TEXT", "Label")
    assert (
        D.detect_columns([{"Tweet": "a", "y": "1"}], TrainConfig(text_column="tweet", label_column="Y")).text == "Tweet"
    )


def test_tool_calls_are_kept_as_text_and_unknown_speakers_are_named():
    call = [{"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]
    turns = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": call},
        {"role": "tool", "content": [{"type": "text", "text": "18 C"}]},
        {"role": "assistant", "content": "18 degrees."},
    ]
    out = chat.openai_messages(turns, "row 1")
    assert out[1] == {"role": "assistant", "content": json.dumps(call)} and out[2]["content"] == "18 C"
    with pytest.raises(ConfigError, match=r"unknown ShareGPT speaker 'robot'.*'gpt'"):
        chat.sharegpt_messages([{"from": "robot", "value": "x"}], "row 3")
    with pytest.raises(ConfigError, match="row 2: expected a list of"):
        chat.openai_messages("hello", "row 2")


# ---- files and saved data sets -------------------------------------------------------------------------------
ROWS = [{"text": f"the movie {i}", "label": ["good", "bad"][i % 2]} for i in range(12)]


def test_every_local_format_reads_the_same_rows(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    T.write_csv(tmp_path / "rows.csv", ROWS)
    T.write_csv(tmp_path / "rows.tsv", ROWS, delimiter="\t")
    T.write_json(tmp_path / "rows.json", ROWS)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "rows.arrow").write_bytes(next((tmp_path / "saved").glob("*.arrow")).read_bytes())
    for name in ("rows.csv", "rows.tsv", "rows.json", "rows.jsonl", "rows.parquet", "rows.arrow"):
        assert D.read_rows(tmp_path / name) == ROWS, name
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match=r"--data '.*broken.parquet' cannot be read"):
        D.read_rows(tmp_path / "broken.parquet")
    train, dev = D.load_splits(TrainConfig(data=str(tmp_path / "saved"), dev_fraction=0.25))
    assert len(train) == 9 and len(dev) == 3 and sorted(map(str, train + dev)) == sorted(map(str, ROWS))


def test_a_saved_dataset_dict_and_its_splits(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(ROWS[:8]),
            "validation": datasets.Dataset.from_list(ROWS[8:10]),
            "test": datasets.Dataset.from_list(ROWS[10:]),
        }
    ).save_to_disk(str(folder))
    assert D.load_splits(TrainConfig(data=str(folder))) == (ROWS[:8], ROWS[8:10])
    assert D.load_splits(TrainConfig(data=str(folder), eval_split="test")) == (ROWS[:8], ROWS[10:])
    assert D.load_splits(TrainConfig(data=str(folder), train_split="validation", eval_split="test"))[0] == ROWS[8:10]
    with pytest.raises(ConfigError, match=r"--eval-split 'dev'.*'test', 'train', 'validation'"):
        D.load_splits(TrainConfig(data=str(folder), eval_split="dev"))
    (tmp_path / "files").mkdir()
    T.write_json(tmp_path / "files" / "train.json", ROWS[:8])
    T.write_json(tmp_path / "files" / "holdout.json", ROWS[8:])
    assert D.load_splits(TrainConfig(data=str(tmp_path / "files"), eval_split="holdout"))[1] == ROWS[8:]


def test_a_folder_in_a_hub_repository_layout(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "repo" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(ROWS[:8]).to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(ROWS[8:]).to_parquet(
        str(tmp_path / "repo" / "data" / "validation-00000-of-00001.parquet")
    )
    assert D.load_splits(TrainConfig(data=str(tmp_path / "repo"))) == (ROWS[:8], ROWS[8:])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is a folder without a train file"):
        D.load_splits(TrainConfig(data=str(tmp_path / "empty")))


def test_a_hub_name_is_looked_up_in_the_cache_only():
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"'no-such-owner/no-such-set' is neither a file.*local Hugging Face cache"):
        D.load_splits(TrainConfig(data="no-such-owner/no-such-set"))
    assert time.perf_counter() - start < 10  # offline: no network retries


def test_headerless_tsv_with_columns(tmp_path):
    lines = ["gj04\t1\t\tOur friends won't buy this analysis.", 'cj99\t0\t*\tThe "more" he reads.'] * 10
    (tmp_path / "cola.tsv").write_text("\n".join(lines))  # no final newline, as CoLA's dev.tsv
    cfg = TrainConfig(data=str(tmp_path / "cola.tsv"), columns="source,label,mark,sentence")
    train, dev = D.load_splits(cfg)
    rows = train + dev
    assert len(rows) == 20 and set(rows[0]) == {"source", "label", "mark", "sentence"}
    assert D.detect_columns(rows, cfg).text == "sentence" and {r["label"] for r in rows} == {"0", "1"}
    assert any(r["sentence"] == 'The "more" he reads.' for r in rows)  # quotes kept as they are
    with pytest.raises(ConfigError, match=r"line 1: 4 fields, but --columns names 3"):
        D.load_splits(cfg.replace(columns="source,label,sentence"))


def test_real_cola_loads_headerless():
    if not (DATA / "cola" / "train.tsv").is_file():
        pytest.skip(f"the CoLA copy is not in {DATA / 'cola'} (shared data absent)")
    cfg = TrainConfig(data=str(DATA / "cola"), columns="source,label,mark,sentence")
    train, dev = D.load_splits(cfg)
    assert (len(train), len(dev)) == (8551, 1043)
    assert D.label_names(train, "label") == ["0", "1"]


# ---- dev split, summary ---------------------------------------------------------------------------------------
def test_the_dev_split_keeps_the_class_balance(tmp_path):
    rows = [{"text": f"row {i}", "label": "rare" if i % 5 == 0 else "common"} for i in range(103)]  # 21 rare
    T.write_json(tmp_path / "rows.json", rows)
    cfg = TrainConfig(data=str(tmp_path / "rows.json"), dev_fraction=0.2)
    train, dev = D.load_splits(cfg)
    assert len(dev) == round(103 * 0.2) and len(train) + len(dev) == 103
    assert sum(r["label"] == "rare" for r in dev) == round(21 * 21 / 103)  # 21 rows x 21/103 = 4.3 -> 4
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in dev)
    assert D.load_splits(cfg) == (train, dev) and D.load_splits(cfg.replace(seed=1)) != (train, dev)


def test_the_summary_names_rows_columns_and_labels(tmp_path, tiny_tokenizer):
    T.write_csv(tmp_path / "rows.csv", [{"Sentence": r["text"], "LABEL": r["label"]} for r in ROWS])
    lines: list[str] = []
    encoded = D.prepare(TrainConfig(data=str(tmp_path / "rows.csv"), dev_fraction=0.25), tiny_tokenizer, lines.append)
    assert encoded.labels == ["bad", "good"]
    assert "9 training rows, 3 dev rows" in lines[0] and "text='Sentence'" in lines[0] and "label='LABEL'" in lines[0]
    assert (
        lines[1] == "labels (training rows): 'bad' 5, 'good' 4"
        or lines[1] == "labels (training rows): 'bad' 4, 'good' 5"
    )
    with pytest.raises(ConfigError, match="--packing is for causal_lm"):
        D.prepare(TrainConfig(data=str(tmp_path / "rows.csv"), packing=True), tiny_tokenizer)


# ---- the real instruction data ---------------------------------------------------------------------------------
def real_data(name: str) -> Path:
    folder = DATA / name
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (the shared data sets are not installed here)")
    return folder


@needs_smollm2
@pytest.mark.parametrize("name", ["alpaca_200", "gsm8k"])
def test_real_instruction_data_trains_on_the_answers(name, smol_tokenizer):
    folder = real_data(name)
    data = folder / "alpaca_200.json" if name == "alpaca_200" else folder
    lines: list[str] = []
    cfg = TrainConfig(data=str(data), max_length=512, max_train_rows=40, max_eval_rows=10)
    encoded = D.prepare(cfg, smol_tokenizer, lines.append)
    assert encoded.columns.format == "pairs" and len(encoded.train) == 40 and len(encoded.dev) == 10
    train_rows, _ = D.load_splits(cfg)
    answer = "output" if name == "alpaca_200" else "answer"
    for row, enc in list(zip(train_rows, encoded.train))[:5]:
        trained = [t for t in enc["labels"] if t != IGNORE]
        assert smol_tokenizer.decode(trained) == row[answer] + "<|im_end|>"
    assert "loss on" in lines[1]


# ---- the command line ---------------------------------------------------------------------------------------------
def test_cli_trains_on_a_chat_jsonl_with_packing(tmp_path, capsys):
    import yaml

    from peftkit.cli.main import main

    llama = T.llama_folder(tmp_path / "llama")
    rows = [
        {"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
        for r in T.instruction_rows(40)
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "--model", llama, "--data", data, "--output-dir", tmp_path / "run", "--packing",
            "--max-length", "64", "--max-steps", "3", "--threads", "1", "--no-progress", "--lr", "3e-2",
            "--r", "4", "--target-modules", "q_proj,v_proj"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args)])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert "36 training rows, 4 dev rows; task causal_lm (messages); columns: messages='messages'" in out
    assert "packing: 36 examples in" in out
    used = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert used["packing"] is True and used["group_by_length"] is False
