"""`peftkit compare`: several methods on the same model, data and budget -> Markdown + CSV table and a plot.

Each method trains with the same TrainConfig (only the method and its settings change) in its own
sub-folder of --output-dir. A method that fails gets a row with its error; the others still run.
"""

from __future__ import annotations

import csv
import dataclasses
import re
import time
from pathlib import Path
from typing import Any, get_type_hints

import typer

from peftkit.cli.options import (
    HIDDEN_METHOD_FIELDS,
    build_train_config,
    extend_signature,
    method_configs,
    parse_value,
    train_parameters,
)
from peftkit.core import io
from peftkit.core.registry import method_names
from peftkit.errors import ConfigError, PeftkitError, choices

COLUMNS = (
    "method",
    "trainable_params",
    "trainable_pct",
    "lr",
    "metric",
    "before",
    "after",
    "train_s",
    "peak_mb",
    "ckpt_kb",
)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'lora' or 'lora:r=16,target_modules=[query,value]' -> ('lora', {'r': 16, 'target_modules': [...]})."""
    name, _, rest = spec.partition(":")
    configs = method_configs()
    key = name.strip().lower()
    if key not in configs:
        raise ConfigError(f"--method {spec!r}: {name!r} is not a registered method; choose from {choices(configs)}.")
    hints = get_type_hints(configs[key])
    valid = [f.name for f in dataclasses.fields(configs[key]) if f.name not in HIDDEN_METHOD_FIELDS]
    args: dict[str, Any] = {}
    for item in re.split(r",(?![^\[{]*[\]}])", rest) if rest else []:
        field, eq, value = item.partition("=")
        field = field.strip()
        if not eq or field not in valid:
            raise ConfigError(
                f"--method {spec!r}: {field!r} is not a setting of {key}; "
                f"write name=value with one of {choices(valid)}."
            )
        args[field] = parse_value(f"--method {key}:{field}", value.strip(), hints[field])
    return key, args


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
    **values: Any,
) -> None:
    """Train each method on the same model, data and budget; write comparison.md, .csv and .png.

    Without --lr each method trains at its own default rate (the table's lr column); with --lr, all at that one."""
    demo = demo or (config is None and not methods and all(v is None for v in values.values()))
    base = build_train_config(values, config, demo, extra={"method_args": {}})
    out = Path(base.output_dir)
    specs = list(methods or [n.lower() for n in method_names()])
    rows = [_run_one(spec, base, out) for spec in specs]
    metric = "accuracy" if any(r.get("metric") == "accuracy" for r in rows) else "perplexity"
    write_tables(rows, out)
    from peftkit.train.plot import plot_comparison

    plot_comparison([r for r in rows if r.get("after") is not None], out / "comparison.png", metric)
    typer.echo((out / "comparison.md").read_text())
    typer.echo(f"written: {out / 'comparison.md'}, {out / 'comparison.csv'}, {out / 'comparison.png'}")


def _run_one(spec: str, base: Any, out: Path) -> dict[str, Any]:
    from peftkit.train.trainer import train

    method, args = parse_spec(spec)
    folder = out / re.sub(r"[^\w.=-]+", "_", spec)
    settings = base.replace(method=method, method_args=args, output_dir=str(folder))
    started = time.perf_counter()
    try:
        result = train(settings)
    except PeftkitError as err:
        typer.echo(f"{spec}: failed: {err}", err=True)
        return {"method": spec, "error": " ".join(line.strip(" -") for line in str(err).splitlines())}
    metric = "accuracy" if result.task == "classification" else "perplexity"
    return {
        "method": spec,
        "trainable_params": result.trainable_params,
        "trainable_pct": 100 * result.trainable_params / max(1, result.total_params - result.trainable_params),
        "lr": result.lr,
        "metric": metric,
        "before": result.before.get(metric),
        "after": result.after.get(metric),
        "train_s": result.train_seconds or time.perf_counter() - started,
        "peak_mb": result.peak_memory_mb,
        "ckpt_kb": (folder / io.WEIGHTS_NAME).stat().st_size / 1024,
    }


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    return f"{value:,d}" if isinstance(value, int) else str(value).replace("|", "\\|")


def write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    """comparison.csv (raw numbers) and comparison.md (formatted), one row per method."""
    out.mkdir(parents=True, exist_ok=True)
    columns = [*COLUMNS, "error"]
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
        "train s",
        "peak MB",
        "checkpoint KB",
    ]
    if any(r.get("error") for r in rows):
        heads.append("error")
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = [f"{r[c]:.0e}" if c == "lr" and r.get(c) else _cell(r.get(c)) for c in columns[: len(heads)]]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")


extend_signature(compare, train_parameters(exclude=("method",)))
