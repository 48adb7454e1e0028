"""`peftkit compare`: several methods on the same model, data and budget -> Markdown + CSV table and a plot.

Each method trains with the same TrainConfig (only the method and its settings change) in its own
sub-folder of --output-dir, by default in a fresh Python process (`peftkit train --config`), so that its time and
peak memory are its own: one process's allocator keeps what earlier runs freed. A method that fails gets a row with
its error; the others still run.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer

from peftkit.cli.options import build_train_config, extend_signature, parse_spec, train_parameters
from peftkit.core import io
from peftkit.core.registry import method_names
from peftkit.errors import ConfigError, PeftkitError

COLUMNS = (
    "method",
    "trainable_params",
    "trainable_pct",
    "lr",
    "metric",
    "before",
    "after",
    "majority",
    "mcc",
    "train_s",
    "peak_mb",
    "ckpt_kb",
)


def compare(
    methods: list[str] = typer.Option(  # noqa: B008
        None,
        "--method",
        "-m",
        help="A method, optionally with settings: 'lora:r=16,lora_alpha=32' (repeatable). "
        "Default: every registered method with its defaults.",
    ),
    config: str | None = typer.Option(None, "--config", "-c", help="YAML file of shared settings."),
    demo: bool = typer.Option(False, "--demo", help="Use the demo's model, data and budget (no arguments = --demo)."),
    isolate: bool = typer.Option(
        True, "--isolate/--no-isolate", help="Train each method in its own process (own time and peak memory)."
    ),
    **values: Any,
) -> None:
    """Train each method on the same model, data and budget; write comparison.md, .csv and .png.

    Without --lr each method trains at its own default rate (the table's lr column); with --lr, all at that one."""
    demo = demo or (config is None and not methods and all(v is None for v in values.values()))
    base = build_train_config(values, config, demo, extra={"method_args": {}})
    out = Path(base.output_dir)
    specs = list(methods or [n.lower() for n in method_names()])
    rows = [_run_one(spec, base, out, isolate) for spec in specs]
    metric = "accuracy" if any(r.get("metric") == "accuracy" for r in rows) else "perplexity"
    write_tables(rows, out)
    from peftkit.train.plot import plot_comparison

    plot_comparison([r for r in rows if r.get("after") is not None], out / "comparison.png", metric)
    typer.echo((out / "comparison.md").read_text())
    typer.echo(f"written: {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'comparison.png'}")


def _run_one(spec: str, base: Any, out: Path, isolate: bool) -> dict[str, Any]:
    method, args = parse_spec(spec)
    folder = out / re.sub(r"[^\w.=-]+", "_", spec)
    settings = base.replace(method=method, method_args=args, output_dir=str(folder))
    try:
        result = _train_isolated(settings, folder) if isolate else _train_here(settings)
    except PeftkitError as err:
        typer.echo(f"{spec}: failed: {err}", err=True)
        return {"method": spec, "error": " ".join(line.strip(" -") for line in str(err).splitlines())}
    metric = "accuracy" if result["task"] == "classification" else "perplexity"
    note = ""
    if result["after"].get("predicted_classes") == 1:
        note = "predicts one class only (the majority baseline)"
    return {
        "method": spec,
        "trainable_params": result["trainable_params"],
        "trainable_pct": 100 * result["trainable_params"] / max(1, result["total_params"] - result["trainable_params"]),
        "lr": result["lr"],
        "metric": metric,
        "before": result["before"].get(metric),
        "after": result["after"].get(metric),
        "majority": result.get("majority"),
        "mcc": result["after"].get("mcc"),
        "note": note,
        "train_s": result["train_seconds"],
        "peak_mb": result["peak_memory_mb"],
        "ckpt_kb": (folder / io.WEIGHTS_NAME).stat().st_size / 1024,
    }


def _train_here(settings: Any) -> dict[str, Any]:
    from peftkit.train.trainer import train

    return train(settings).to_dict()


def _train_isolated(settings: Any, folder: Path) -> dict[str, Any]:
    """`peftkit train --config` in a fresh process; its metrics.json, or its error as a ConfigError."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "compare_run.yaml"
    settings.save_yaml(config)
    (folder / "metrics.json").unlink(missing_ok=True)
    command = [sys.executable, "-m", "peftkit.cli.main", "train", "--config", str(config)]
    started = time.perf_counter()
    child = subprocess.Popen(command, stderr=subprocess.PIPE)  # its stdout (the dev metrics) passes through
    tail = b""
    while chunk := os.read(child.stderr.fileno(), 4096):  # the run's progress bars and messages, as they come
        typer.echo(chunk.decode(errors="replace"), err=True, nl=False)
        tail = (tail + chunk)[-4096:]
    child.stderr.close()
    if child.wait() != 0 or not (folder / "metrics.json").is_file():
        lines = [
            line.strip() for line in tail.decode(errors="replace").replace("\r", "\n").splitlines() if line.strip()
        ]
        raise ConfigError(f"exit code {child.returncode}: {lines[-1] if lines else 'no message'}")
    result = json.loads((folder / "metrics.json").read_text())
    result["train_seconds"] = result["train_seconds"] or time.perf_counter() - started
    return result


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    return f"{value:,d}" if isinstance(value, int) else str(value).replace("|", "\\|")


def write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    """comparison.csv (raw numbers) and comparison.md (formatted), one row per method. Classification rows show
    the majority-class baseline (the accuracy of always answering the commonest dev class) and the dev MCC (0 for
    such a constant answer) beside accuracy; a method that predicts one class only is flagged in a note column."""
    out.mkdir(parents=True, exist_ok=True)
    columns = [*COLUMNS, "note", "error"]
    with open(out / "comparison.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{c: r.get(c) for c in columns} for r in rows])
    heads = [
        "method",
        "trainable params",
        "trainable %",
        "lr",
        "metric",
        "dev before",
        "dev after",
        "majority class",
        "dev MCC",
        "train s",
        "peak MB",
        "checkpoint KB",
    ]
    shown = list(COLUMNS)
    for extra, head in (("note", "note"), ("error", "error")):
        if any(r.get(extra) for r in rows):
            shown.append(extra)
            heads.append(head)
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [f"{r[c]:.0e}" if c == "lr" and r.get(c) else _cell(r.get(c)) for c in shown]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")


extend_signature(compare, train_parameters(exclude=("method",)))
