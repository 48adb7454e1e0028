"""OpenAI's request and response shapes (the subset this server honours), checked against the server's limits.

Requests are pydantic models: a missing or mistyped field, or a value outside its range, becomes a 400 with an
OpenAI-style JSON error naming the field. Fields OpenAI defines that change what is computed but that this server
does not implement (``n > 1``, ``logprobs``, ``echo``, ``best_of``, tools) are refused by name rather than ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from peftkit.serve.sampling import SamplingParams


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_tokens: int = 1024  # the largest max_tokens a request may set (and the default for chat)
    default_completion_tokens: int = 16  # OpenAI's default for /v1/completions
    max_body_bytes: int = 1 << 20
    max_stop: int = 4
    max_prompt_tokens: int = 4096  # further capped by the model's positions


class RequestError(ValueError):
    """A request the server refuses: HTTP ``status`` with OpenAI's error ``type`` / ``code`` / ``param``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


class SamplingFields(BaseModel):
    """The fields /v1/completions and /v1/chat/completions share: the model (adapter) and the sampling settings."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    logprobs: Any = None
    user: str | None = None

    def params(self, limits: Limits, default_tokens: int) -> SamplingParams:
        """The checked sampling settings; a RequestError names the field that is out of bounds."""
        if self.n != 1:
            raise RequestError(f"n={self.n} is not supported; this server returns one choice (n=1).", param="n")
        if self.logprobs not in (None, False, 0):
            raise RequestError("logprobs are not supported by this server; leave the field out.", param="logprobs")
        tokens = default_tokens if self.max_tokens is None else self.max_tokens
        if not 1 <= tokens <= limits.max_tokens:
            raise RequestError(
                f"max_tokens={tokens} is out of range; give 1 <= max_tokens <= {limits.max_tokens} (the server's "
                "--max-tokens-limit).",
                param="max_tokens",
            )
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if len(stop) > limits.max_stop or any(not s for s in stop):
            raise RequestError(f"stop={list(stop)!r}: give at most {limits.max_stop} non-empty strings.", param="stop")
        return SamplingParams(tokens, self.temperature, self.top_p, stop, self.seed)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompt_text(self) -> str | list[int]:
        if self.echo or (self.best_of or 1) > 1 or self.suffix:
            raise RequestError("echo, best_of > 1 and suffix are not supported by this server.", param="echo")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise RequestError("Give one prompt per request (a string); send several requests.", param="prompt")
            return self.prompt[0]
        return self.prompt


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[Any] | None = None

    def params(self, limits: Limits, default_tokens: int) -> SamplingParams:
        if self.tools:
            raise RequestError("tools are not supported by this server.", param="tools")
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return super().params(limits, default_tokens)


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str


# ---- responses ------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(rid: str, model: str, text: str, reason: str | None, use: dict | None, chunk: bool = False) -> dict:
    """A /v1/completions body (or one streamed chunk of it)."""
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    body = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": [choice]}
    if use is not None:
        body["usage"] = use
    return body


def chat(rid: str, model: str, text: str, reason: str | None, use: dict | None) -> dict:
    """A /v1/chat/completions body."""
    message = {"role": "assistant", "content": text}
    body = {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
    }
    if use is not None:
        body["usage"] = use
    return body


def chat_chunk(rid: str, model: str, delta: dict, reason: str | None) -> dict:
    """One streamed chunk of a chat completion (``delta`` holds the role first, then content pieces)."""
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
