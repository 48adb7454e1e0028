"""AdaLoRA's configuration: peft 0.21's AdaLoraConfig names and defaults, validated in one pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from peftkit.core.targeting import TargetingConfig
from peftkit.errors import choices

BIAS_CHOICES = ("none", "all", "lora_only")
_QV = ["q_proj", "v_proj"]
# Hugging Face peft's per-model defaults (TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING), the common models.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"],
    "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    **dict.fromkeys(["bart", "opt"], ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    **dict.fromkeys(["gpt2", "gpt_bigcode"], ["c_attn"]),
    **dict.fromkeys(["bloom", "gpt_neox"], ["query_key_value"]),
    **dict.fromkeys(["gptj", "gpt_neo", "llama", "llama4", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3"], _QV),
    "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "deberta": ["in_proj"],
}


@dataclass(kw_only=True)
class AdaLoraConfig(TargetingConfig):
    """AdaLoRA's settings, with Hugging Face peft's names and defaults.

    The schedule (section 3.3): ``tinit`` steps at the full budget (init_r per layer), then the budget falls
    cubically to target_r per layer at step ``total_step - tfinal``, where the final allocation is fixed and the
    last ``tfinal`` steps train the kept triplets only. ``total_step=None``: the training loop's number of
    optimizer steps (``peftkit train`` fills it in; peft needs it set to load the adapter).
    """

    peft_type: ClassVar[str] = "ADALORA"
    default_target_modules: ClassVar[dict[str, list[str]]] = DEFAULT_TARGETS
    # peft's AdaLoraConfig derives from its LoraConfig and writes every LoRA field; those AdaLoRA has no use for
    # are accepted at their defaults and refused at any other value.
    foreign_defaults: ClassVar[dict[str, Any]] = {
        "r": 8,  # peft ignores r for AdaLoRA (init_r sets the rank)
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "layer_replication": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "use_qalora": False,
        "qalora_group_size": 16,
        "trainable_token_indices": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "target_parameters": None,
        "alora_invocation_tokens": None,
        "arrow_config": None,
        "ensure_weight_tying": False,
        "kasa_config": None,
        "lora_ga_config": None,
        "monteclora_config": None,
        "use_bdlora": None,
        "velora_config": None,
        "runtime_config": None,
    }

    init_r: int = field(default=12, metadata={"help": "Initial rank of every adapted matrix (the budget's start)."})
    target_r: int = field(default=8, metadata={"help": "Average rank per matrix left after the budget schedule."})
    tinit: int = field(default=0, metadata={"help": "Steps of initial warm-up at the full budget."})
    tfinal: int = field(default=0, metadata={"help": "Final steps that train the fixed allocation."})
    deltaT: int = field(default=1, metadata={"help": "Steps between two budget allocations."})
    beta1: float = field(default=0.85, metadata={"help": "EMA factor of the sensitivity (section 3.2, eq. 8)."})
    beta2: float = field(default=0.85, metadata={"help": "EMA factor of the uncertainty (section 3.2, eq. 9)."})
    orth_reg_weight: float = field(default=0.5, metadata={"help": "Weight of the orthogonality regulariser (eq. 4)."})
    total_step: int | None = field(
        default=None, metadata={"help": "Total optimizer steps of the run (None: the training loop's)."}
    )
    rank_pattern: dict[str, list[bool]] | None = field(
        default=None, metadata={"help": "Kept triplets per matrix, written by the allocation (peft's layout)."}
    )
    lora_alpha: float = field(default=8, metadata={"help": "Scale numerator: ΔW is multiplied by alpha / init_r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter branch's input."})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "Weights stored (in, out), as GPT-2's Conv1D; set per layer automatically."}
    )
    bias: str = field(default="none", metadata={"help": "Which biases also train: 'none', 'all' or 'lora_only'."})
    init_lora_weights: bool = field(
        default=True, metadata={"help": "True: Λ = 0, P and Q ~ N(0, 0.02²) (identity at init); False: N(0, 1)."}
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        for name in ("init_r", "target_r", "deltaT"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)!r} must be a positive integer.")
        if self.tinit < 0 or self.tfinal < 0:
            problems.append(f"tinit={self.tinit!r} and tfinal={self.tfinal!r} must be >= 0.")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r} must be in (0, 1) (the paper uses 0.85).")
        if self.orth_reg_weight < 0:
            problems.append(f"orth_reg_weight={self.orth_reg_weight!r} must be >= 0.")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout={self.lora_dropout!r} must be in [0, 1).")
        if self.bias not in BIAS_CHOICES:
            problems.append(f"bias={self.bias!r} is not one of {choices(BIAS_CHOICES)}.")
        return problems + self.schedule_problems(self.total_step)

    def schedule_problems(self, total_step: int | None) -> list[str]:
        """peft's rule: the budget must have a phase to fall in, tinit < total_step - tfinal."""
        if total_step is None:
            return []
        if total_step <= 0:
            return [f"total_step={total_step!r} must be a positive number of optimizer steps (or None)."]
        if self.tinit >= total_step - self.tfinal:
            return [
                f"tinit={self.tinit} and tfinal={self.tfinal} leave no budget phase in total_step={total_step} steps; "
                "lower tinit / tfinal or train longer (tinit < total_step - tfinal)."
            ]
        return []
