"""PeftConfig: the fields every method shares, validation, and peft-compatible adapter_config.json."""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from peftkit.core.fieldtypes import type_problems
from peftkit.core.files import atomic_write_bytes
from peftkit.core.registry import config_from_dict, method_names
from peftkit.errors import CheckpointError, ConfigError, ConfigTypeError, choices

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

# The peft release whose adapter_config.json layout peftkit writes. peft records its own version as "peft_version";
# peftkit writes "<PEFT_FORMAT>+peftkit.<its version>" there (a PEP 440 local version that peft can parse).
PEFT_FORMAT = "0.21.0"


def peftkit_version() -> str:
    try:
        return importlib.metadata.version("peftkit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _StrEnum(str, enum.Enum):
    """A str Enum whose members equal, hash and print as their strings (as peft's ``PeftType`` / ``TaskType``)."""

    def __str__(self) -> str:
        return str(self.value)


TaskType = _StrEnum("TaskType", {name: name for name in TASK_HEADS}, module=__name__)
TaskType.__doc__ = "The model's task (``task_type``); members equal their strings: ``TaskType.SEQ_CLS == 'SEQ_CLS'``."
PeftType = _StrEnum("PeftType", {name: name for name in method_names()}, module=__name__)
PeftType.__doc__ = "Every registered method's ``peft_type``; members equal their strings: ``PeftType.LORA == 'LORA'``."


class _ConfigType(type):
    """Lets a config class take ``peft_type=`` as peft's configs do (it must name the class's own method)."""

    def __call__(cls, *args: Any, peft_type: Any = None, **kwargs: Any) -> Any:
        given = getattr(peft_type, "value", peft_type)
        if given is not None and given != cls.peft_type:
            raise ConfigError(
                f"peft_type={given!r} does not match {cls.__name__} (peft_type {cls.peft_type!r}); leave peft_type "
                f"out, or use the config class of that method (registered: {choices(method_names())})."
            )
        return super().__call__(*args, **kwargs)


@dataclass(kw_only=True)
class PeftConfig(metaclass=_ConfigType):
    """Fields shared by every method. Subclasses set ``peft_type`` and add their own fields.

    Validation runs in ``__post_init__`` and reports every problem at once as a :class:`ConfigError`: first the
    field types (from the annotations, see core/fieldtypes.py; a :class:`ConfigTypeError`), then the values.
    """

    peft_type: ClassVar[str] = ""
    # Keys other tools (peft) write for options peftkit does not implement: accepted silently at these
    # values, refused (rather than silently ignored) at any other value.
    foreign_defaults: ClassVar[dict[str, Any]] = {}

    task_type: str | None = field(default=None, metadata={"help": f"The model's task, one of {', '.join(TASK_HEADS)}."})
    base_model_name_or_path: str | None = field(default=None, metadata={"help": "Base model the adapter is for."})
    revision: str | None = field(default=None, metadata={"help": "Revision of the base model."})
    inference_mode: bool = field(default=False, metadata={"help": "Load frozen, for inference only."})
    modules_to_save: list[str] | str | None = field(
        default=None,
        metadata={"help": "Modules (e.g. a task head) that get a trainable copy saved with the adapter (a str: one)."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.modules_to_save, str):  # one module name, never its letters
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.task_type, enum.Enum):  # TaskType.SEQ_CLS -> "SEQ_CLS"
            self.task_type = self.task_type.value
        wrong_types = type_problems(self)
        try:
            problems = wrong_types + self.problems()
        except (TypeError, ValueError, AttributeError):  # a value check tripped over a field of the wrong type
            if not wrong_types:
                raise
            problems = wrong_types
        if problems:  # every problem in one message: the wrong types first, then the values
            error = ConfigTypeError if wrong_types else ConfigError
            raise error(f"Invalid {type(self).__name__}:\n" + "\n".join(f"  - {p}" for p in problems))

    def problems(self) -> list[str]:
        """Every problem with this config, as messages; subclasses extend the list."""
        if self.task_type is not None and self.task_type not in TASK_HEADS:
            return [f"task_type={self.task_type!r} is not a task type; use one of {choices(TASK_HEADS)} or None."]
        return []

    # ---- dict / JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The config as adapter_config.json holds it (with ``peft_type`` and the writing version)."""
        out = {"peft_type": self.peft_type, "peft_version": f"{PEFT_FORMAT}+peftkit.{peftkit_version()}"}
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

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **hub_kwargs: Any
    ) -> PeftConfig:
        """The config saved in a folder (or a Hugging Face Hub repository id, read through huggingface_hub and its
        cache; ``hub_kwargs`` go to ``hf_hub_download``). On ``PeftConfig`` itself, the class its peft_type names."""
        data = cls.from_json_file(_config_file(pretrained_model_name_or_path, subfolder, hub_kwargs))
        return cls.from_dict(data) if cls.peft_type else config_from_dict(data)

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **_: Any) -> dict[str, Any]:
        """The dict an adapter_config.json holds (as peft's ``from_json_file``); CheckpointError if unreadable."""
        return PeftConfig.read_dict(Path(path_json_file).parent, Path(path_json_file).name)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / CONFIG_NAME
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode())

    @staticmethod
    def read_dict(directory: str | os.PathLike, name: str = CONFIG_NAME) -> dict[str, Any]:
        """The JSON object in ``directory``/``name``; CheckpointError if absent, not UTF-8, not JSON or not an
        object (null, a number, a list)."""
        path = Path(directory) / name
        if not path.is_file():
            raise CheckpointError(
                f"No {name} in {str(directory)!r}. Pass the folder that save_pretrained wrote "
                "(it holds adapter_config.json and adapter_model.safetensors)."
            )
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise CheckpointError(f"{path} is not UTF-8 text ({err}); the checkpoint is corrupt.") from err
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path} is not valid JSON ({err}); the checkpoint is corrupt.") from err
        if not isinstance(data, dict):
            raise CheckpointError(
                f"{path} holds a JSON {type(data).__name__} ({json.dumps(data)[:60]}), not an object of config "
                'fields such as {"peft_type": "LORA", ...}; the checkpoint is corrupt. Save the adapter again.'
            )
        return data

    def replace(self, **changes: Any) -> PeftConfig:
        return dataclasses.replace(self, **changes)


def _config_file(name_or_path: str | os.PathLike, subfolder: str | None, hub_kwargs: dict[str, Any]) -> Path:
    """adapter_config.json in a local folder, else downloaded (or found in the cache) by huggingface_hub."""
    folder = Path(name_or_path) / subfolder if subfolder else Path(name_or_path)
    if (folder / CONFIG_NAME).is_file() or folder.is_dir():
        return folder / CONFIG_NAME
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(name_or_path), CONFIG_NAME, subfolder=subfolder, **hub_kwargs))
    except Exception as err:  # not installed, offline without a cached copy, no such repository...
        raise CheckpointError(
            f"No {CONFIG_NAME} at {str(name_or_path)!r}: not a local folder, and the Hugging Face Hub gave no copy "
            f"({type(err).__name__}: {err}). Pass the folder save_pretrained wrote, or a Hub id available offline."
        ) from err
