"""Conversations for causal-LM fine-tuning: the row formats, and the loss mask over the assistant's turns.

Three formats are read, detected from the columns (``peftkit.train.data.detect_columns``):

- OpenAI-style ``messages``: ``[{"role": "system" | "user" | "assistant" | "tool", "content": ...}, ...]``, any
  number of turns; an assistant's ``tool_calls`` are kept as JSON text after its content;
- ShareGPT ``conversations``: ``[{"from": "human" | "gpt" | "system" | ..., "value": ...}, ...]``;
- prompt / completion pairs (``instruction`` [+ ``input``] / ``output``, ``question`` / ``answer``, ...): one user
  turn and one assistant turn.

Every row becomes OpenAI messages and is rendered by the tokenizer's chat template. The labels are the input ids
on the tokens the assistant's turns add (their content and the template's end-of-turn token) and IGNORE (-100)
everywhere else: system and user turns, tool results, the role headers. An assistant turn's text is found by
rendering the conversation up to the turn with the generation prompt (``before``) and through the turn
(``through``): the turn is ``through[len(before):]``, less trailing whitespace. A token is trained when its first
character lies inside a turn.
"""

from __future__ import annotations

import json
from typing import Any

from peftkit.errors import ConfigError, choices

IGNORE = -100
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system",
    "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool",
}  # fmt: skip
TRAINED_ROLES = ("assistant",)

# For tokenizers without a chat template: "role: content" lines, the assistant's followed by the eos token.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


# ---- rows -> messages ------------------------------------------------------------------------------------
def content_text(message: dict[str, Any]) -> str:
    """A message's content as text: a list of parts keeps its text parts; tool calls follow as JSON."""
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    text = "" if content is None else str(content)
    if message.get("tool_calls"):
        text = (text + "\n" if text else "") + json.dumps(message["tool_calls"], ensure_ascii=False)
    return text


def openai_messages(turns: Any, where: str) -> list[dict[str, str]]:
    """OpenAI-style messages, checked, with text content."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "role" in t for t in turns):
        raise ConfigError(f'{where}: expected a list of {{"role": ..., "content": ...}} messages, got {turns!r:.200}.')
    return [{"role": str(t["role"]), "content": content_text(t)} for t in turns]


def sharegpt_messages(turns: Any, where: str) -> list[dict[str, str]]:
    """ShareGPT turns ({"from": "human" | "gpt" | ..., "value": ...}) as OpenAI messages."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t for t in turns):
        raise ConfigError(f'{where}: expected a list of {{"from": ..., "value": ...}} turns, got {turns!r:.200}.')
    out = []
    for turn in turns:
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise ConfigError(
                f"{where}: unknown ShareGPT speaker {turn['from']!r}; known: {choices(sorted(SHAREGPT_ROLES))}."
            )
        out.append({"role": role, "content": content_text({"content": turn.get("value")})})
    return out


def pair_messages(prompt: Any, completion: Any, extra: Any = None) -> list[dict[str, str]]:
    """A prompt / completion pair as a user and an assistant turn (prompt and completion may also be messages,
    TRL's conversational prompt-completion format); Alpaca's ``input`` follows the instruction."""
    if isinstance(prompt, list):
        head = openai_messages(prompt, "the prompt column")
    else:
        text = str(prompt)
        if extra is not None and str(extra).strip():
            text = f"{text}\n\n{extra}"
        head = [{"role": "user", "content": text}]
    tail = (
        openai_messages(completion, "the completion column")
        if isinstance(completion, list)
        else [{"role": "assistant", "content": str(completion)}]
    )
    return head + tail


# ---- messages -> input ids and labels ----------------------------------------------------------------------
def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
    )


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) of its assistant turns."""
    full = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] not in TRAINED_ROLES:
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise ConfigError(
                f"The chat template does not render turn {i + 1} ({message['role']}) as a continuation of the turns "
                "before it, so its tokens cannot be told apart for the loss mask. Use a template that renders "
                "earlier turns unchanged (most do), or pass prompt / completion columns."
            )
        end = len(through.rstrip())
        spans.append((len(before), max(end, len(before))))
    return full, spans


def encode_conversation(messages: list[dict], tokenizer, max_length: int) -> dict[str, list[int]]:
    """input_ids of the rendered conversation; labels = the ids on assistant tokens, IGNORE elsewhere."""
    text, spans = assistant_spans(tokenizer, messages)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        trained = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    else:  # no offsets: tokenize the pieces between span edges one by one
        ids, trained, edge = [], [], 0
        for a, b in [*spans, (len(text), len(text))]:
            for piece, inside in ((text[edge:a], False), (text[a:b], True)):
                piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
                ids += piece_ids
                trained += [inside] * len(piece_ids)
            edge = b
    ids = ids[:max_length]
    labels = [i if t else IGNORE for i, t in zip(ids, trained)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
