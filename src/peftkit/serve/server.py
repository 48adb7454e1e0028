"""Putting a server together: the model, its tokenizer and adapters -> the engine, the app, uvicorn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftkit.serve.adapters import AdapterRegistry
from peftkit.serve.app import ServeState, create_app
from peftkit.serve.engine import Engine
from peftkit.serve.protocol import Limits
from peftkit.serve.sampling import LockedTokenizer


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end a sequence: the model's generation config (what ``generate`` stops on), else the
    tokenizer's end-of-sequence token."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    return {ids} if isinstance(ids, int) else set(ids or ())


def build_state(
    model: Any,
    tokenizer: Any,
    adapters: dict[str, str | Path] | None = None,
    *,
    base_name: str = "base",
    adapter_root: str | Path | None = None,
    max_loaded: int = 16,
    max_batch: int = 64,
    limits: Limits | None = None,
    api_key: str | None = None,
) -> ServeState:
    """A ready-to-start server over ``model`` (a causal LM) with ``adapters`` (name -> folder) registered.

    ``adapter_root`` allows POST /v1/adapters to load folders inside it (None: runtime loading off); at most
    ``max_loaded`` adapters stay in memory (least recently used ones are unloaded, and reloaded on demand)."""
    model.eval()
    root = Path(adapter_root) if adapter_root is not None else None
    registry = AdapterRegistry(model, max_loaded, root, base_name)
    for name, path in (adapters or {}).items():
        registry.add(name, path, from_request=False)
    config = model.config
    max_length = int(getattr(config, "max_position_embeddings", None) or 1 << 20)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    engine = Engine(registry, LockedTokenizer(tokenizer), eos_ids(model, tokenizer), max_batch, max_length, vocab)
    return ServeState(engine, registry, engine.tokenizer, limits or Limits(), api_key)


def run(state: ServeState, host: str = "127.0.0.1", port: int = 8000, graceful_timeout: float = 30.0) -> None:
    """Serve until SIGINT / SIGTERM; then stop accepting, let running requests finish (up to ``graceful_timeout``
    seconds) and stop the engine."""
    import uvicorn

    uvicorn.run(create_app(state), host=host, port=port, timeout_graceful_shutdown=graceful_timeout, log_level="info")
