"""PeftConfig: the fields every method shares, validation, and peft-compatible adapter_config.json."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from peftkit.core.files import atomic_write_bytes, atomic_writes  # noqa: F401  (re-exported: moved to files.py)
from peftkit.errors import CheckpointError, ConfigError, choices

CONFIG_NAME = "adapter_config.json"

# task_type -> head modules that get a trainable copy (modules_to_save), as Hugging Face peft does.
TASK_HEADS: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
    "CAUSAL_LM": (),
    "SEQ_2_SEQ_LM": (),
    "FEATURE_EXTRACTION": (),
}

# Keys Hugging Face peft writes into every adapter_config.json. peftkit accepts them silently at these values.
PEFT_COMMON_KEYS: dict[str, Any] = {"auto_mapping": None, "peft_version": None}


@dataclass(kw_only=True)
class PeftConfig:
    """Fields shared by every method. Subclasses set ``peft_type`` and add their own fields.

    Validation runs in ``__post_init__`` and reports every problem at once as a :class:`ConfigError`.
    """

    peft_type: ClassVar[str] = ""
    # Keys other tools (peft) write for options peftkit does not implement: accepted silently at these
    # values, refused (rather than silently ignored) at any other value.
    foreign_defaults: ClassVar[dict[str, Any]] = {}

    task_type: str | None = field(default=None, metadata={"help": f"The model's task, one of {', '.join(TASK_HEADS)}."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Base model the adapter is for."})
    revision: str | None = field(default=None, metadata={"help": "Revision of the base model."})
    inference_mode: bool = field(default=False, metadata={"help": "Load frozen, for inference only."})
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules (e.g. a task head) that get a trainable copy saved with the adapter."},
    )

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(f"Invalid {type(self).__name__}:\n" + "\n".join(f"  - {p}" for p in problems))

    def problems(self) -> list[str]:
        """Every problem with this config, as messages; subclasses extend the list."""
        if self.task_type is not None and self.task_type not in TASK_HEADS:
            return [f"task_type={self.task_type!r} is not a task type; use one of {choices(TASK_HEADS)} or None."]
        return []

    # ---- dict / JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = sorted(value) if isinstance(value, set) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build a config from a dict; tolerate keys other tools write, refuse options peftkit lacks."""
        known = {f.name for f in dataclasses.fields(cls)}
        foreign = {**PEFT_COMMON_KEYS, **cls.foreign_defaults}
        unsupported, unknown = [], []
        for key, value in data.items():
            if key in known or key == "peft_type":
                continue
            if key in foreign:
                if value != foreign[key] and key not in PEFT_COMMON_KEYS and value not in (None, False, {}, []):
                    unsupported.append(f"{key}={value!r}")
            else:
                unknown.append(key)
        if data.get("peft_type", cls.peft_type) != cls.peft_type:
            raise ConfigError(f"peft_type={data['peft_type']!r} cannot build a {cls.__name__} ({cls.peft_type}).")
        if unsupported:
            raise ConfigError(
                f"This {cls.peft_type} adapter uses options peftkit does not implement: {', '.join(unsupported)}. "
                "Loading it while ignoring them would give different outputs; retrain without them."
            )
        if unknown:
            warnings.warn(
                f"Ignoring unknown keys in the {cls.peft_type} config: {choices(unknown)}.", UserWarning, stacklevel=3
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / CONFIG_NAME
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode())

    @staticmethod
    def read_dict(directory: str | os.PathLike) -> dict[str, Any]:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(
                f"No {CONFIG_NAME} in {str(directory)!r}. Pass the folder that save_pretrained wrote "
                "(it holds adapter_config.json and adapter_model.safetensors)."
            )
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt.") from err

    def replace(self, **changes: Any) -> PeftConfig:
        return dataclasses.replace(self, **changes)
