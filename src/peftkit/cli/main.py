"""The `peftkit` command: one sub-command per file in this folder.

peftkit train      fine-tune (no arguments: the embedded MiniLM + tweets demo)
peftkit compare    several methods, same model, data and budget -> table + plot
peftkit merge      adapter -> a merged model folder plain transformers loads
peftkit inspect    what a method would target in a model; what a checkpoint holds
peftkit convert    validate and rewrite an adapter (peft <-> peftkit)
peftkit predict    classify texts with a trained adapter
peftkit generate   generate text with a trained adapter
peftkit serve      an OpenAI-compatible server, one adapter per request

The command line needs the ``train`` extra (typer, pyyaml, ...) and, for transformers models, the ``hf`` one; a plain
``pip install peftkit`` has neither. This module imports them only inside :func:`main`, so that the console script
can say which extra to install instead of ending in a ModuleNotFoundError.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from typing import Any

from peftkit.errors import PeftkitError

# Top-level modules of each extra in pyproject.toml that the command line imports: a missing one names its extra.
EXTRA_MODULES = {
    "train": ("typer", "click", "yaml", "datasets", "sklearn", "matplotlib"),
    "hf": ("transformers", "accelerate", "huggingface_hub", "tokenizers"),
    "diffusers": ("diffusers",),
    "models": ("gguf",),
    "serve": ("fastapi", "uvicorn"),
}
CLI_EXTRAS = ("hf", "train")  # what every sub-command may need


@functools.cache
def build_app() -> Any:
    """The typer application (imports typer and every sub-command)."""
    import typer

    from peftkit.cli.compare import compare
    from peftkit.cli.convert import convert
    from peftkit.cli.inspect_cmd import inspect
    from peftkit.cli.merge import merge
    from peftkit.cli.predict import generate, predict
    from peftkit.cli.serve import serve
    from peftkit.cli.train import train

    app = typer.Typer(
        name="peftkit",
        help="Parameter-efficient fine-tuning: train, compare, merge, inspect and convert adapters.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for command in (train, compare, merge, inspect, convert, predict, generate, serve):
        app.command(command.__name__)(command)
    return app


def __getattr__(name: str) -> Any:
    """``from peftkit.cli.main import app`` still works: the application is built on first use."""
    if name == "app":
        return build_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def extra_of(module: str | None) -> str | None:
    """The extra of pyproject.toml that installs top-level ``module``, or None for a module no extra brings."""
    top = (module or "").split(".")[0]
    return next((extra for extra, modules in EXTRA_MODULES.items() if top in modules), None)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_extra_message(err: ModuleNotFoundError) -> str | None:
    """What to install when ``err`` is a module an extra brings: that extra, with the command line's other extras
    that are missing too (``pip install 'peftkit[hf,train]'``); None when no extra brings it (a real bug)."""
    extra = extra_of(err.name)
    if extra is None:
        return None
    others = [e for e in CLI_EXTRAS if e != extra and not _installed(EXTRA_MODULES[e][0])]
    extras = ",".join(sorted({extra, *others}))
    return (
        f"this command needs the {extra!r} extra of peftkit (module {err.name!r} is not installed). "
        f"Install it with: pip install 'peftkit[{extras}]'"
    )


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.set_verbosity_error()  # the "newly initialised classifier" report is expected here
    logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `peftkit` script; a PeftkitError prints its message (naming the flag) and exits 2, an
    OSError from the file system prints its one-line message and exits 1, a missing extra names the pip command
    that installs it and exits 1."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        _quiet_transformers()
        build_app()(args=argv, prog_name="peftkit")
    except PeftkitError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)
    except ModuleNotFoundError as err:
        message = missing_extra_message(err)
        if message is None:
            raise
        print(f"Error: {message}", file=sys.stderr)
        sys.exit(1)
    except OSError as err:  # a file the command reads or writes: one line, not a traceback
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
