"""peftkit: parameter-efficient fine-tuning for PyTorch models, with Hugging Face peft's API and files."""

from peftkit.core.compose import Average, Fusion, Parallel, Stack
from peftkit.core.config import PeftConfig
from peftkit.core.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from peftkit.core.layer import BASE
from peftkit.core.model import PeftModel, get_peft_model
from peftkit.core.registry import method_names
from peftkit.methods.bitfit import BitFitConfig
from peftkit.methods.bottleneck import BottleneckConfig
from peftkit.methods.compacter import CompacterConfig
from peftkit.methods.diff_pruning import DiffPruningConfig
from peftkit.methods.freeze import LayerFreezeConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.lora import LoraConfig
from peftkit.methods.prefix_tuning import PrefixTuningConfig
from peftkit.methods.prompt_tuning import PromptTuningConfig

__version__ = "0.1.0"

__all__ = [
    "BASE",
    "Average",
    "BitFitConfig",
    "BottleneckConfig",
    "CompacterConfig",
    "DiffPruningConfig",
    "Fusion",
    "IA3Config",
    "LayerFreezeConfig",
    "LoraConfig",
    "Parallel",
    "PeftConfig",
    "PeftModel",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "Stack",
    "get_peft_model",
    "hotswap_adapter",
    "method_names",
    "prepare_model_for_compiled_hotswap",
]
