"""The `peftkit` command: one sub-command per file in this folder.

peftkit train      fine-tune (no arguments: the embedded MiniLM + tweets demo)
peftkit compare    several methods, same model, data and budget -> table + plot
peftkit merge      adapter -> a merged model folder plain transformers loads
peftkit inspect    what a method would target in a model; what a checkpoint holds
peftkit convert    validate and rewrite an adapter (peft <-> peftkit)
peftkit predict    classify texts with a trained adapter
peftkit generate   generate text with a trained adapter
"""

from __future__ import annotations

import os
import sys

import typer

from peftkit.cli.compare import compare
from peftkit.cli.convert import convert
from peftkit.cli.inspect_cmd import inspect
from peftkit.cli.merge import merge
from peftkit.cli.predict import generate, predict
from peftkit.cli.train import train
from peftkit.errors import PeftkitError

app = typer.Typer(
    name="peftkit",
    help="Parameter-efficient fine-tuning: train, compare, merge, inspect and convert adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for command in (train, compare, merge, inspect, convert, predict, generate):
    app.command(command.__name__)(command)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `peftkit` script; a PeftkitError prints its message (naming the flag) and exits 2, an
    OSError from the file system prints its one-line message and exits 1."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging

        logging.set_verbosity_error()  # the "newly initialised classifier" report is expected here
        logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        app(args=argv, prog_name="peftkit")
    except PeftkitError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a file the command reads or writes: one line, not a traceback
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
