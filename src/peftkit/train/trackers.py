"""Where a run's numbers go besides metrics.json: a log line every ``--log-steps`` steps when no progress bar is
shown, one of accelerate's trackers (``--report-to tensorboard|wandb|mlflow|trackio``) and peftkit's own
``log.csv`` (``--report-to csv``).

Logged values: ``train/loss`` (mean over the last log window's steps), ``train/lr``, ``train/grad_norm`` (before
clipping), ``train/tokens_per_s`` (tokens of the attention mask over every process, over wall-clock time of the
window) and ``eval/<metric>`` at every evaluation. The tracker packages are imported only when asked for; a missing
one is a ConfigError that names the package to install.
"""

from __future__ import annotations

import csv
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError, choices

# --report-to value -> the package accelerate's tracker imports
ACCELERATE_TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
CSV_NAME = "log.csv"
LOG_DIR = "logs"  # under the output folder: tensorboard's event files, one sub-folder per run


def accelerate_tracker(name: str) -> str | None:
    """The accelerate ``log_with`` for ``--report-to name`` (None for 'none' and 'csv'); a ConfigError naming the
    package when it is not installed."""
    package = ACCELERATE_TRACKERS.get(name)
    if package is None:
        return None
    if importlib.util.find_spec(package) is None:
        installed = [n for n, p in ACCELERATE_TRACKERS.items() if importlib.util.find_spec(p) is not None]
        raise ConfigError(
            f"--report-to {name} needs the {package!r} package, which is not installed: pip install {package}. "
            f"Installed trackers: {choices([*installed, 'csv', 'none'])}."
        )
    return name


def interactive(progress: bool) -> bool:
    """Progress bars only with --progress on a terminal; otherwise (a log file, a pipe, --no-progress) log lines."""
    return progress and sys.stdout.isatty()


def hyperparameters(settings: dict[str, Any]) -> dict[str, Any]:
    """TrainConfig's settings as trackers accept them (numbers, text, bools): lists and mappings as text."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in settings.items()}


def fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


class RunLog:
    """The logs of one run. ``acc``: the run's Accelerator, built with ``log_with=accelerate_tracker(...)``."""

    def __init__(self, acc: Any, config: Any, out: Path, say: Callable[[str], None]) -> None:
        self.acc, self.config, self.out, self.say = acc, config, out, say
        self.lines = not interactive(config.progress)
        self.tracker = accelerate_tracker(config.report_to)
        self.csv_rows: list[dict[str, Any]] = []
        self.window: dict[str, float] = {"loss": 0.0, "steps": 0, "tokens": 0}
        self.window_start = self.run_start = time.perf_counter()
        self.log_dir: Path | None = None

    def start(self, settings: dict[str, Any], resume: bool) -> None:
        """Open the tracker's run (tensorboard: a new ``logs/run-<time>`` folder, also on resume)."""
        if self.tracker:
            run = time.strftime("run-%Y%m%d-%H%M%S")
            self.acc.init_trackers(run, config=hyperparameters(settings))
            self.log_dir = self.out / LOG_DIR / run
        if self.config.report_to == "csv" and self.acc.is_main_process:
            path = self.out / CSV_NAME
            if resume and path.is_file():
                with open(path, newline="") as fh:
                    self.csv_rows = list(csv.DictReader(fh))
            else:
                path.unlink(missing_ok=True)
        self.window_start = self.run_start = time.perf_counter()

    def step(self, step: int, total: int, loss: float, lr: float, grad_norm: float, tokens: int) -> None:
        """Add one optimizer step; every ``log_steps`` steps (and at the last) log the window's averages."""
        w = self.window
        w["loss"] += loss
        w["steps"] += 1
        w["tokens"] += tokens
        if step % self.config.log_steps and step != total:
            return
        seconds = max(time.perf_counter() - self.window_start, 1e-9)
        values = {
            "train/loss": w["loss"] / w["steps"],
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": w["tokens"] / seconds,
        }
        self.log(values, step)
        if self.lines:
            elapsed = time.perf_counter() - self.run_start
            self.say(
                f"step {step}/{total}: loss {values['train/loss']:.4f}, lr {lr:.2e}, grad norm {grad_norm:.3f}, "
                f"{values['train/tokens_per_s']:,.0f} tokens/s, {elapsed:.0f} s"
            )
        self.window = {"loss": 0.0, "steps": 0, "tokens": 0}
        self.window_start = time.perf_counter()

    def evaluation(self, step: int, metrics: dict[str, float]) -> None:
        self.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}, step)
        if self.lines and step:
            self.say(f"eval at step {step}: {fmt(metrics)}")

    def log(self, values: dict[str, float], step: int) -> None:
        if self.tracker:
            self.acc.log(values, step=step)
        if self.config.report_to == "csv" and self.acc.is_main_process:
            self.csv_rows.append({"step": step, **values})
            self._write_csv()

    def _write_csv(self) -> None:
        """log.csv, one row per log call (training and evaluation rows share the file; empty cells elsewhere)."""
        columns = list(dict.fromkeys(k for row in self.csv_rows for k in row))
        tmp = self.out / f".{CSV_NAME}.tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.csv_rows)
        tmp.replace(self.out / CSV_NAME)

    def finish(self) -> None:
        if self.tracker:
            self.acc.end_training()
