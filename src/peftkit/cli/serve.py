"""`peftkit serve`: an OpenAI-compatible server with one adapter per request (see docs/serve.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from peftkit.errors import ConfigError


def parse_adapters(specs: list[str] | None) -> dict[str, str]:
    """``--adapter NAME=PATH`` values -> {name: path}."""
    adapters: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec!r} is not NAME=PATH; e.g. --adapter support=runs/support/adapter.")
        if name in adapters:
            raise ConfigError(f"--adapter names {name!r} twice; give each adapter its own name.")
        adapters[name] = path
    return adapters


def serve(
    model: str = typer.Argument(..., help="Base causal LM: a folder, a Hub id, or 'smollm2'."),
    adapter: list[str] = typer.Option(None, "--adapter", help="NAME=PATH of an adapter to serve (repeatable)."),  # noqa: B008
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: str | None = typer.Option(
        None, "--api-key", envvar="PEFTKIT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes."
    ),
    adapter_root: str | None = typer.Option(
        None, "--adapter-root", help="Allow POST /v1/adapters to load folders inside this one (default: off)."
    ),
    served_model_name: str | None = typer.Option(
        None, "--served-model-name", help="The `model` name of the base model (default: MODEL's last path part)."
    ),
    max_loaded_adapters: int = typer.Option(16, "--max-loaded-adapters", help="Adapters kept in memory (LRU)."),
    max_batch_size: int = typer.Option(64, "--max-batch-size", help="Sequences decoded together."),
    max_tokens_limit: int = typer.Option(1024, "--max-tokens-limit", help="Largest max_tokens a request may ask."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body accepted."),
) -> None:
    """Serve MODEL and its adapters with OpenAI's API: the request's `model` field picks the adapter."""
    from peftkit.serve.protocol import Limits
    from peftkit.serve.server import build_state, run
    from peftkit.train.models import load_model, load_tokenizer

    adapters = parse_adapters(adapter)
    tokenizer = load_tokenizer(model)
    base = load_model(model, "causal_lm")
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    limits = Limits(max_tokens=max_tokens_limit, max_body_bytes=max_body_bytes)
    state = build_state(
        base,
        tokenizer,
        adapters,
        base_name=served_model_name or Path(model.rstrip("/")).name,
        adapter_root=adapter_root,
        max_loaded=max_loaded_adapters,
        max_batch=max_batch_size,
        limits=limits,
        api_key=api_key,
    )
    typer.echo(f"serving {state.registry.all_models()} on http://{host}:{port}/v1")
    run(state, host, port)
