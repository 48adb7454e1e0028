"""What several sub-commands share: finding adapters in a folder and loading one onto its base model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.core import io
from peftkit.core.config import CONFIG_NAME, TASK_HEADS, PeftConfig
from peftkit.core.model import PeftModel
from peftkit.errors import CheckpointError, ConfigError
from peftkit.train.models import load_model, load_tokenizer, use_mean_pooling

CLI_TASKS = {"SEQ_CLS": "classification", "CAUSAL_LM": "causal_lm"}


def adapter_folders(root: str | Path) -> dict[str, Path]:
    """Adapter name -> folder, in peft's layout (``default`` at the root, others in sub-folders).

    Any name counts, ``best`` and ``checkpoints`` included, except in the output folder of `peftkit train`
    (it holds train_config.yaml), whose ``best/`` is the run's best-evaluation copy of its one adapter."""
    root = Path(root)
    found = {}
    if (root / CONFIG_NAME).is_file():
        found[io.DEFAULT_ADAPTER] = root
    skip = {"best"} if (root / "train_config.yaml").is_file() else set()
    if root.is_dir():
        for sub in sorted(root.iterdir()):
            if sub.is_dir() and (sub / CONFIG_NAME).is_file() and sub.name not in skip:
                found[sub.name] = sub
    return found


def run_info(folder: Path) -> dict[str, Any]:
    """What `peftkit train` recorded next to the adapter (model, task, labels, pooling), when it wrote it."""
    info: dict[str, Any] = {}
    for candidate in (folder, folder.parent):
        metrics = candidate / "metrics.json"
        settings = candidate / "train_config.yaml"
        if metrics.is_file():
            data = json.loads(metrics.read_text())
            info.setdefault("labels", data.get("labels"))
            info.setdefault("task", data.get("task"))
        if settings.is_file():
            import yaml

            recorded = yaml.safe_load(settings.read_text()) or {}
            for key in ("model", "pooling", "max_length", "text_column", "text_pair_column", "label_column"):
                info.setdefault(key, recorded.get(key))
    return {k: v for k, v in info.items() if v is not None}


def _labels_from_tensors(folder: Path) -> list[str] | None:
    tensors = io.from_file_keys(io.load_tensors(folder))
    for head in TASK_HEADS["SEQ_CLS"]:
        weight = tensors.get(f"{head}.weight")
        if weight is not None:
            return [str(i) for i in range(weight.shape[0])]
    return None


def base_model_ref(folder: Path, model: str | None) -> str:
    """The base model of the adapter in ``folder``: ``--model``, else what `peftkit train` recorded, else the
    adapter config's base_model_name_or_path."""
    recorded = model or run_info(folder).get("model") or PeftConfig.read_dict(folder).get("base_model_name_or_path")
    if not recorded:
        raise ConfigError("--model is needed: the adapter does not name its base model (a folder or 'minilm').")
    return recorded


@dataclass
class Adapted:
    model: PeftModel
    tokenizer: Any
    task: str
    labels: list[str] | None
    base: str
    pooling: str


def load_adapted(adapter: str | Path, model: str | None = None) -> Adapted:
    """Load the base model an adapter folder was trained on (or ``--model``) and apply the adapter."""
    folder = Path(adapter)
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"ADAPTER {str(adapter)!r} holds no {CONFIG_NAME}; pass the output folder of `peftkit train` "
            "or any folder written by save_pretrained."
        )
    config = PeftConfig.read_dict(folder)
    info = run_info(folder)
    base = base_model_ref(folder, model)
    task = CLI_TASKS.get(str(config.get("task_type")))
    if task is None:
        raise ConfigError(
            f"The adapter's task_type {config.get('task_type')!r} is not one the CLI loads; it handles "
            f"{', '.join(CLI_TASKS)}. Load it from Python with PeftModel.from_pretrained."
        )
    labels = info.get("labels") or (_labels_from_tensors(folder) if task == "classification" else None)
    tokenizer = load_tokenizer(base)
    base_model = load_model(base, task, labels)
    pooling = info.get("pooling", "default")
    if pooling == "mean":  # the head the adapter was trained with
        use_mean_pooling(base_model)
    if getattr(base_model.config, "pad_token_id", None) is None:
        base_model.config.pad_token_id = tokenizer.pad_token_id
    peft_model = PeftModel.from_pretrained(base_model, folder).eval()
    return Adapted(peft_model, tokenizer, task, labels, base, pooling)
