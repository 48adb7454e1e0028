"""peftkit: parameter-efficient fine-tuning for PyTorch models, with Hugging Face peft's API and files."""

from peftkit.core.compose import Average, Fusion, Parallel, Stack
from peftkit.core.config import PeftConfig, PeftType, TaskType
from peftkit.core.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from peftkit.core.layer import BASE
from peftkit.core.loss import chunked_causal_lm_loss
from peftkit.core.model import PeftModel, get_peft_model
from peftkit.core.registry import method_names
from peftkit.integrations import hf_trainer
from peftkit.integrations.peft_api import (
    NoMatchingPeftModuleError,
    PeftError,
    cast_mixed_precision_params,
    get_peft_config,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    load_peft_weights,
    prepare_model_for_kbit_training,
    set_peft_model_state_dict,
)
from peftkit.integrations.peft_models import (
    MODEL_TYPE_TO_PEFT_MODEL_MAPPING,
    AutoPeftModel,
    AutoPeftModelForCausalLM,
    AutoPeftModelForFeatureExtraction,
    AutoPeftModelForQuestionAnswering,
    AutoPeftModelForSeq2SeqLM,
    AutoPeftModelForSequenceClassification,
    AutoPeftModelForTokenClassification,
    PeftMixedModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
)
from peftkit.integrations.peft_status import get_layer_status, get_model_status
from peftkit.methods.adalora import AdaLoraConfig
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.compacter import CompacterConfig
from peftkit.methods.diff_pruning import DiffPruningConfig
from peftkit.methods.freeze import LayerFreezeConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.ln_tuning import LNTuningConfig
from peftkit.methods.loha import LoHaConfig
from peftkit.methods.lokr import LoKrConfig
from peftkit.methods.lora import CordaConfig, EvaConfig, LoraConfig
from peftkit.methods.lora.corda import preprocess_corda
from peftkit.methods.lora.eva import get_eva_state_dict, initialize_lora_eva_weights
from peftkit.methods.lora.loftq import LoftQConfig, replace_lora_weights_loftq
from peftkit.methods.lora.loraplus import create_loraplus_optimizer
from peftkit.methods.oft import OFTConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig
from peftkit.methods.trainable_tokens import TrainableTokensConfig
from peftkit.methods.vera import VeraConfig

__version__ = "0.1.0"

__all__ = [
    "BASE",
    "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
    "AdaLoraConfig",
    "AutoPeftModel",
    "AutoPeftModelForCausalLM",
    "AutoPeftModelForFeatureExtraction",
    "AutoPeftModelForQuestionAnswering",
    "AutoPeftModelForSeq2SeqLM",
    "AutoPeftModelForSequenceClassification",
    "AutoPeftModelForTokenClassification",
    "Average",
    "BitFitConfig",
    "BottleneckConfig",
    "CompacterConfig",
    "CordaConfig",
    "DiffPruningConfig",
    "EvaConfig",
    "Fusion",
    "IA3Config",
    "LNTuningConfig",
    "LayerFreezeConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoftQConfig",
    "LoraConfig",
    "NoMatchingPeftModuleError",
    "OFTConfig",
    "Parallel",
    "PeftConfig",
    "PeftError",
    "PeftMixedModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "Stack",
    "TaskType",
    "TrainableTokensConfig",
    "VeraConfig",
    "cast_mixed_precision_params",
    "chunked_causal_lm_loss",
    "create_loraplus_optimizer",
    "get_eva_state_dict",
    "get_layer_status",
    "get_model_status",
    "get_peft_config",
    "get_peft_model",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "initialize_lora_eva_weights",
    "inject_adapter_in_model",
    "load_peft_weights",
    "method_names",
    "prepare_model_for_compiled_hotswap",
    "prepare_model_for_kbit_training",
    "preprocess_corda",
    "replace_lora_weights_loftq",
    "set_peft_model_state_dict",
]

hf_trainer.install()  # transformers' Trainer and TRL treat peftkit models as peft's (integrations/hf_trainer.py)
