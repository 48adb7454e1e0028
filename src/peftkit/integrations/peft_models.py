"""peft's model classes by task, ``PeftMixedModel`` and the ``AutoPeftModel*`` loaders.

A :class:`peftkit.PeftModel` is already task-aware (``task_type`` in the config picks the trainable head, and
forward / generate follow the wrapped model), so the ``PeftModelFor*`` classes are thin subclasses that keep
peft's names: ``isinstance`` checks, ``PeftModelForCausalLM.from_pretrained(base, folder)`` and transformers'
``find_labels`` (which reads the class name) work as with peft.

``AutoPeftModelFor<Task>.from_pretrained(adapter_folder)`` reads ``base_model_name_or_path`` (and ``revision``)
from adapter_config.json, loads the base model with the matching transformers ``AutoModelFor<Task>``, grows its
embeddings when the adapter folder holds a tokenizer with more tokens (as peft does), and loads the adapter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from peftkit.core.config import PeftConfig
from peftkit.core.model import PeftModel
from peftkit.errors import ConfigError, choices


class PeftModelForCausalLM(PeftModel):
    """A PeftModel around a causal language model (``task_type="CAUSAL_LM"``)."""


class PeftModelForSeq2SeqLM(PeftModel):
    """A PeftModel around an encoder-decoder model (``task_type="SEQ_2_SEQ_LM"``)."""


class PeftModelForSequenceClassification(PeftModel):
    """A PeftModel around a sequence classifier (``task_type="SEQ_CLS"``: the head trains and is saved)."""


class PeftModelForTokenClassification(PeftModel):
    """A PeftModel around a token classifier (``task_type="TOKEN_CLS"``)."""


class PeftModelForQuestionAnswering(PeftModel):
    """A PeftModel around an extractive question-answering model (``task_type="QUESTION_ANS"``)."""


class PeftModelForFeatureExtraction(PeftModel):
    """A PeftModel around an encoder whose hidden states are the output (``task_type="FEATURE_EXTRACTION"``)."""


class PeftMixedModel(PeftModel):
    """peft's model for adapters of different methods at once. Every peftkit PeftModel already holds adapters of
    any methods together (``add_adapter`` / ``set_adapter([...])``), so this is the same class under peft's name."""


MODEL_TYPE_TO_PEFT_MODEL_MAPPING: dict[str, type[PeftModel]] = {
    "SEQ_CLS": PeftModelForSequenceClassification,
    "SEQ_2_SEQ_LM": PeftModelForSeq2SeqLM,
    "CAUSAL_LM": PeftModelForCausalLM,
    "TOKEN_CLS": PeftModelForTokenClassification,
    "QUESTION_ANS": PeftModelForQuestionAnswering,
    "FEATURE_EXTRACTION": PeftModelForFeatureExtraction,
}


class AutoPeftModel:
    """Load a saved adapter together with its base model: ``AutoPeftModelFor<Task>.from_pretrained(folder)``."""

    auto_class: ClassVar[str] = "AutoModel"  # the transformers Auto class that loads the base model
    peft_class: ClassVar[type[PeftModel]] = PeftModel
    task_type: ClassVar[str | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(f"{type(self).__name__} is built with {type(self).__name__}.from_pretrained(adapter_folder).")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        revision: str | None = None,
        import_allowlist: list[str] | None = None,
        **kwargs: Any,
    ) -> PeftModel:
        """The base model named in the adapter's config, loaded with ``auto_class`` (``kwargs`` go to its
        ``from_pretrained``: ``dtype``, ``device_map``...), wrapped with the adapter. ``import_allowlist`` is accepted
        for peft's signature; peftkit never imports a module named in a config, so there is nothing to allow."""
        peft_config = PeftConfig.from_pretrained(pretrained_model_name_or_path, revision=revision)
        cls._check_task(peft_config)
        base_path = peft_config.base_model_name_or_path
        if not base_path:
            raise ConfigError(
                f"The adapter in {str(pretrained_model_name_or_path)!r} has no base_model_name_or_path in its "
                "adapter_config.json, so its base model is unknown. Load the base model yourself and call "
                f"{cls.peft_class.__name__}.from_pretrained(base_model, folder)."
            )
        import transformers

        auto = getattr(transformers, cls.auto_class)
        base = auto.from_pretrained(base_path, revision=peft_config.revision, **kwargs)
        _grow_embeddings(base, pretrained_model_name_or_path)
        return cls.peft_class.from_pretrained(
            base, pretrained_model_name_or_path, adapter_name=adapter_name, is_trainable=is_trainable, config=config
        )

    @classmethod
    def _check_task(cls, peft_config: PeftConfig) -> None:
        task = peft_config.task_type
        if cls.task_type is None and task is None:
            return
        if cls.task_type is None or task != cls.task_type:
            wanted = next((a for a in AUTO_CLASSES if a.task_type == task), None)
            raise ConfigError(
                f"{cls.__name__} loads task_type={cls.task_type!r} adapters; this one has task_type={task!r}. "
                f"Use {wanted.__name__ if wanted else 'AutoPeftModel'} (one of {choices(AUTO_NAMES)})."
            )


def _grow_embeddings(base: nn.Module, adapter_folder: str | os.PathLike) -> None:
    """peft's rule: a tokenizer saved with the adapter that has more tokens than the base model's embedding rows
    means tokens were added while training; resize the embeddings to it before loading the adapter."""
    if not (Path(adapter_folder) / "tokenizer_config.json").is_file() or not hasattr(base, "get_input_embeddings"):
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_folder)
    if len(tokenizer) > base.get_input_embeddings().weight.shape[0]:
        base.resize_token_embeddings(len(tokenizer))


def _auto(name: str, auto_class: str, task_type: str) -> type[AutoPeftModel]:
    peft_class = MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task_type]
    doc = f"Load a {task_type} adapter and its base model ({auto_class}) from an adapter folder."
    attrs = {"auto_class": auto_class, "peft_class": peft_class, "task_type": task_type, "__doc__": doc}
    return type(name, (AutoPeftModel,), {**attrs, "__module__": __name__})


AutoPeftModelForCausalLM = _auto("AutoPeftModelForCausalLM", "AutoModelForCausalLM", "CAUSAL_LM")
AutoPeftModelForSeq2SeqLM = _auto("AutoPeftModelForSeq2SeqLM", "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM")
AutoPeftModelForSequenceClassification = _auto(
    "AutoPeftModelForSequenceClassification", "AutoModelForSequenceClassification", "SEQ_CLS"
)
AutoPeftModelForTokenClassification = _auto(
    "AutoPeftModelForTokenClassification", "AutoModelForTokenClassification", "TOKEN_CLS"
)
AutoPeftModelForQuestionAnswering = _auto(
    "AutoPeftModelForQuestionAnswering", "AutoModelForQuestionAnswering", "QUESTION_ANS"
)
AutoPeftModelForFeatureExtraction = _auto("AutoPeftModelForFeatureExtraction", "AutoModel", "FEATURE_EXTRACTION")

AUTO_CLASSES: tuple[type[AutoPeftModel], ...] = (
    AutoPeftModelForCausalLM,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForFeatureExtraction,
)
AUTO_NAMES = ("AutoPeftModel", *(a.__name__ for a in AUTO_CLASSES))
