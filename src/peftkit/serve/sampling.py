"""Choosing the next token of each row and turning token ids into text as they arrive.

Sampling follows the usual recipe (Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration", section 3.1
for nucleus sampling): p = softmax(logits / temperature); keep the smallest set of tokens whose probabilities sum to
at least ``top_p``; renormalise; draw with the request's own generator (so ``seed`` makes a request repeatable
whatever else runs beside it). ``temperature == 0`` is greedy decoding (argmax), as `peftkit generate` does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What one request asked for (already checked against the server's limits)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator of the request's own: seeded when the request gives ``seed``, else from fresh entropy."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the nucleus: the smallest set, by falling probability, whose mass reaches ``top_p``.

    probs: (V,), summing to 1. The most likely token always stays."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    return torch.zeros_like(probs).scatter(0, order, sorted_probs)


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token for one row. logits: (V,)."""
    if params.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    probs = top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One token per row. logits: (B, V). Greedy rows share one argmax; sampled rows draw with their own generator."""
    greedy = logits.max(-1).indices.tolist()  # argmax's first maximum, about 3x faster on CPU at (B, V)
    return [
        greedy[i] if p.temperature <= 0 else next_token(logits[i], p, g)
        for i, (p, g) in enumerate(zip(params, generators))
    ]


@dataclass
class TextStream:
    """Incremental detokenisation with stop strings.

    ``push`` takes the ids generated so far and returns the text that is now final: the decoded text minus a
    trailing incomplete character (a lone U+FFFD from a split multi-byte sequence) and minus any tail that could
    still grow into a stop string. When a stop string appears, the text is cut just before it and ``stopped`` is
    set; the stop string itself is never sent (as in OpenAI's API)."""

    tokenizer: object
    stop: tuple[str, ...] = ()
    sent: str = ""
    stopped: bool = False
    _text: str = field(default="", repr=False)

    def push(self, ids: list[int]) -> str:
        self._text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = self._stop_at(self._text)
        if cut is not None:
            self.stopped = True
            return self._advance(self._text[:cut])
        ready = self._text.rstrip("\ufffd")
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._advance(ready[: len(ready) - hold] if hold else ready)

    def flush(self) -> str:
        """Whatever is left when the sequence ends (a stop string already cut it)."""
        if self.stopped:
            return ""
        return self._advance(self._text)

    def _stop_at(self, text: str) -> int | None:
        found = [i for i in (text.find(s, max(0, len(self.sent) - len(s))) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


class LockedTokenizer:
    """A tokenizer shared by the web layer (encoding prompts) and the engine thread (decoding tokens): Hugging Face's
    fast tokenizers may raise "Already borrowed" when two threads use one at once, so every call holds a lock."""

    def __init__(self, tokenizer: Any) -> None:
        self.inner = tokenizer
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        """Token ids as `peftkit generate` makes them (the tokenizer's special tokens added)."""
        with self._lock:
            return list(self.inner(text)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        with self._lock:
            return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The chat template applied, ending with the assistant's turn opened (``add_generation_prompt``)."""
        with self._lock:
            return self.inner.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __getattr__(self, name: str) -> Any:  # pad_token_id, eos_token_id, chat_template...
        return getattr(self.inner, name)
