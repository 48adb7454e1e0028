"""TrainConfig: every setting of a training run, from Python, a YAML file or command-line flags.

The command line is generated from these fields (their types and ``metadata["help"]``), so the CLI, the YAML
keys and the Python API always agree. Method settings (``r``, ``lora_alpha``, ...) live in ``method_args`` and
are checked by the method's own config class.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from peftkit.errors import ConfigError, choices

TASKS = ("auto", "classification", "causal_lm")
DTYPES = ("fp32", "bf16", "fp16")  # peftkit.train.models.TORCH_DTYPES
TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "trackio", "csv")  # peftkit.train.trackers
POOLINGS = ("default", "mean")  # "mean": peftkit.train.models.use_mean_pooling
SCHEDULES = ("linear", "cosine", "constant")


@dataclass(kw_only=True)
class TrainConfig:
    """One training run. Field names are the YAML keys; ``--field-name`` are the flags."""

    # ---- what to train ----------------------------------------------------------------------------------
    model: str = field(default="minilm", metadata={"help": "A local model folder, or a built-in: 'minilm', 'smollm2'."})
    data: str = field(
        default="tweets",
        metadata={
            "help": "A csv/tsv/json/jsonl/parquet/arrow file, a folder with train/dev files, a saved DatasetDict, "
            "a (cached) Hub data set name, or the built-in 'tweets'."
        },
    )
    task: str = field(default="auto", metadata={"help": f"One of {', '.join(TASKS)} (auto: from the data columns)."})
    method: str = field(
        default="lora", metadata={"help": "The PEFT method (see `peftkit train --help` for its flags)."}
    )
    method_args: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "The method's settings (YAML only; flags set them one by one)."}
    )
    pooling: str = field(
        default="default",
        metadata={
            "help": "How a classifier reads the sentence: 'default' (the model's own head; BERT: [CLS] through its "
            "pooler) or 'mean' (the masked mean of the last hidden states, for mean-pooling sentence encoders "
            "such as minilm; BERT models)."
        },
    )
    output_dir: str = field(default="runs/train", metadata={"help": "Where the adapter, metrics and plots go."})
    # ---- data --------------------------------------------------------------------------------------------
    text_column: str | None = field(default=None, metadata={"help": "Text column (default: guessed)."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Second text of a pair (e.g. sentence2)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column for classification."})
    prompt_column: str | None = field(default=None, metadata={"help": "Prompt / instruction column (causal_lm)."})
    response_column: str | None = field(default=None, metadata={"help": "Response column; the loss is only on it."})
    dev_fraction: float = field(default=0.1, metadata={"help": "Dev share split off (seeded) when no dev file."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_rows: int | None = field(default=None, metadata={"help": "Use at most this many dev rows."})
    max_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    data_config: str | None = field(default=None, metadata={"help": "The data set's configuration (Hub / datasets)."})
    train_split: str = field(default="train", metadata={"help": "Split to train on (datasets / saved DatasetDict)."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Dev split (default: validation / dev / test if present, else split off)."}
    )
    columns: str | None = field(
        default=None, metadata={"help": "Names for a headerless csv/tsv, comma-separated (CoLA: 'src,label,mark,text')"}
    )
    packing: bool = field(
        default=False, metadata={"help": "causal_lm: pack examples into rows of --max-length (no cross-attention)."}
    )
    group_by_length: bool = field(
        default=False, metadata={"help": "Batch rows of similar length together (less padding; unpacked runs)."}
    )
    # ---- optimisation -------------------------------------------------------------------------------------
    batch_size: int = field(default=16, metadata={"help": "Rows per step per process (before accumulation)."})
    eval_batch_size: int = field(default=64, metadata={"help": "Rows per evaluation batch."})
    grad_accum: int = field(default=1, metadata={"help": "Gradient accumulation: micro-batches per optimizer step."})
    lr: float | None = field(
        default=None, metadata={"help": "Peak learning rate (AdamW); default: the method's own (LoRA 2e-3, ...)."}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    loraplus_lr_ratio: float | None = field(
        default=None,
        metadata={"help": "LoRA+ (method lora only): LoRA's B trains at this ratio x lr (the paper suggests 16)."},
    )
    warmup_ratio: float = field(default=0.06, metadata={"help": "Share of the steps spent warming the lr up from 0."})
    schedule: str = field(default="linear", metadata={"help": f"lr decay after warmup: {', '.join(SCHEDULES)}."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the training data (ignored with max_steps)."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps to run (overrides epochs)."})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "Clip the gradient norm (None: no clip)."})
    model_dropout: float | None = field(
        default=None,
        metadata={"help": "Set every dropout probability of the base model (0: none; default: the model's own)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, dropout and data order."})
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in backward (less memory, a little more compute); default: on for "
            "causal_lm (as TRL's SFTConfig), off for classification."
        },
    )
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast where the device supports it."})
    dtype: str = field(
        default="fp32",
        metadata={
            "help": f"The base model's weights: {', '.join(DTYPES)} (adapter weights stay fp32; bf16/fp16 halve the "
            "base's memory)."
        },
    )
    quantize: str | None = field(
        default=None,
        metadata={"help": "QLoRA: store the base's Linear layers as nf4, fp4, int8 or torchao-int8 (not the heads)."},
    )
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: CPU cores / processes)."})
    fsdp: bool = field(
        default=False, metadata={"help": "Shard the model over the processes with FSDP2 (one unit per block)."}
    )
    # ---- evaluation, checkpoints, output ------------------------------------------------------------------
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (default: at the end)."})
    eval_before: bool = field(default=True, metadata={"help": "Evaluate once before training."})
    metric_for_best: str | None = field(
        default=None, metadata={"help": "Dev metric that picks the best checkpoint (default: accuracy / loss)."}
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Stop after this many evaluations without improvement."}
    )
    save_steps: int | None = field(default=None, metadata={"help": "Write a resumable checkpoint every N steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep this many resumable checkpoints."})
    progress: bool = field(
        default=True, metadata={"help": "Progress bars (off, or stdout not a terminal: one log line per log step)."}
    )
    log_steps: int = field(default=10, metadata={"help": "Log loss, lr, grad norm and tokens/s every N steps."})
    report_to: str = field(
        default="none", metadata={"help": f"Where the logs also go: {', '.join(TRACKERS)} (csv: log.csv)."}
    )
    max_minutes: float | None = field(
        default=None, metadata={"help": "Time budget: stop training after this many minutes, then evaluate and save."}
    )
    eval_generate: int = field(
        default=0,
        metadata={"help": "Causal LM: generate for this many dev prompts at each evaluation and score exact match."},
    )
    max_new_tokens: int = field(default=128, metadata={"help": "Tokens generated per prompt by --eval-generate."})

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("Invalid training settings:\n" + "\n".join(f"  - {p}" for p in problems))

    def problems(self) -> list[str]:
        out = []
        named = (("task", TASKS, "task"), ("pooling", POOLINGS, "pooling"), ("schedule", SCHEDULES, "schedule"))
        named += (("dtype", DTYPES, "dtype"), ("report_to", TRACKERS, "tracker"))
        for name, valid, noun in named:
            if getattr(self, name) not in valid:
                out.append(f"--{flag(name)} {getattr(self, name)!r} is not a {noun}; use one of {choices(valid)}.")
        positive = ("batch_size", "eval_batch_size", "grad_accum", "max_length", "save_total_limit", "log_steps")
        for name in (*positive, "max_new_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                out.append(f"--{flag(name)} {getattr(self, name)!r} must be a positive integer.")
        optional = ("max_steps", "eval_steps", "save_steps", "max_train_rows", "max_eval_rows", "threads")
        for name in (*optional, "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                out.append(f"--{flag(name)} {value!r} must be a positive integer or left unset.")
        if not isinstance(self.eval_generate, int) or self.eval_generate < 0:
            out.append(f"--eval-generate {self.eval_generate!r} must be 0 (off) or a positive number of prompts.")
        if not isinstance(self.method_args, dict):
            out.append(f"method_args={self.method_args!r} must be a mapping such as {{r: 8}}.")
        return out + self._range_problems()

    def _range_problems(self) -> list[str]:
        out = []
        if self.lr is not None and not self.lr > 0:
            out.append(f"--lr {self.lr!r} must be > 0 (typical for adapters: 1e-4 to 1e-2).")
        if self.loraplus_lr_ratio is not None and (self.method != "lora" or not self.loraplus_lr_ratio > 0):
            out.append(
                f"--loraplus-lr-ratio {self.loraplus_lr_ratio!r} with --method {self.method!r}: LoRA+ needs --method "
                "lora and a ratio > 0 (typical: 16); drop the flag for other methods."
            )
        if self.max_minutes is not None and not self.max_minutes > 0:
            out.append(f"--max-minutes {self.max_minutes!r} must be > 0 (or left unset: no time budget).")
        if not 0 <= self.warmup_ratio < 1:
            out.append(f"--warmup-ratio {self.warmup_ratio!r} must be in [0, 1).")
        if self.model_dropout is not None and not 0 <= self.model_dropout < 1:
            out.append(f"--model-dropout {self.model_dropout!r} must be in [0, 1) (0 turns dropout off).")
        if not 0 < self.dev_fraction < 1:
            out.append(f"--dev-fraction {self.dev_fraction!r} must be in (0, 1).")
        if self.max_steps is None and not self.epochs > 0:
            out.append(f"--epochs {self.epochs!r} must be > 0 (or set --max-steps).")
        return out

    # ---- dict / YAML ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "the config") -> TrainConfig:
        """Build from a dict (a parsed YAML file); unknown keys are an error that lists the valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown keys {choices(unknown)} in {source}. Valid keys: {choices(known)}.")
        hints = get_type_hints(cls)
        return cls(**{k: typed(k, v, hints[k], source) for k, v in data.items()})

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_yaml(path), source=str(path))

    def save_yaml(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {str(path)!r} is not a file; pass a YAML file such as run.yaml.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"--config {str(path)!r} must hold a mapping of settings, not {type(data).__name__}.")
    return data


def typed(name: str, value: Any, hint: Any, source: str = "the config") -> Any:
    """``value`` as the field's type when it is text for a number or a bool: PyYAML reads ``2e-4`` (no dot) as the
    string '2e-4', and a quoted ``"16"`` is text too. Other values pass unchanged (``__post_init__`` checks them)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if not isinstance(value, str) or str in options:
        return value
    text = value.strip().lower()
    if type(None) in options and text in ("none", "null", "~"):
        return None
    if bool in options and text in ("true", "false", "yes", "no", "on", "off"):
        return text in ("true", "yes", "on")
    for kind in (int, float):
        if kind in options:
            try:
                return kind(text)
            except ValueError:
                pass
    kinds = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise ConfigError(f"{name}: {value!r} in {source} is not a {kinds}; write a number such as 2e-4 or 16.")


def flag(name: str) -> str:
    """A field name as a command-line flag: ``max_length`` -> ``max-length``."""
    return name.replace("_", "-")


# The run `peftkit train` does with no arguments: LoRA on the real MiniLM, 3-way tweet sentiment, a few
# minutes on 2 CPU cores. Tuned so that dev accuracy clearly beats the majority class (about 45%).
DEMO: dict[str, Any] = {
    "model": "minilm",
    "data": "tweets",
    "method": "lora",
    "method_args": {"r": 8, "lora_alpha": 16, "target_modules": ["query", "key", "value", "dense"]},
    "output_dir": "runs/demo",
    "max_train_rows": 8000,
    "max_eval_rows": 800,
    "max_length": 48,
    "batch_size": 32,
    "lr": 2e-3,
    "max_steps": 150,
    "eval_steps": 75,
    "save_steps": 75,
}
