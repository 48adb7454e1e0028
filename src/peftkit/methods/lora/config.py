"""LoRA's configuration: peft's LoraConfig names and defaults, validated in one pass."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from peftkit.core.targeting import TargetingConfig
from peftkit.errors import ConfigError, choices

BIAS_CHOICES = ("none", "all", "lora_only")
INIT_CHOICES = (True, False, "gaussian", "pissa", "pissa_niter_<n>", "olora", "eva", "corda", "loftq")
# peft 0.21's other initialisations (data- or weight-driven): refused by name until peftkit implements them.
PEFT_ONLY_INITS = ("orthogonal", "mica", "lora_ga")
CORDA_METHODS = ("ipm", "kpm")


@dataclass(kw_only=True)
class CordaConfig:
    """CorDA's settings (``init_lora_weights="corda"``, after ``preprocess_corda``), with peft's names and defaults;
    see methods/lora/corda.py."""

    cache_file: str | None = field(default=None, metadata={"help": "safetensors file for the cropped SVDs (reused)."})
    covariance_file: str | None = field(
        default=None, metadata={"help": "safetensors file for the input covariances (reused for other ranks)."}
    )
    corda_method: str = field(
        default="ipm",
        metadata={"help": "'ipm': the largest context directions train; 'kpm': the smallest (keeps knowledge)."},
    )
    verbose: bool = field(default=False, metadata={"help": "peft's progress output (peftkit prints nothing)."})
    use_float16_for_covariance: bool = field(
        default=False, metadata={"help": "Accumulate covariances in the inputs' dtype instead of float32."}
    )
    prune_temporary_fields: bool = field(default=True, metadata={"help": "peft's clean-up switch (always done)."})

    def __post_init__(self) -> None:
        if self.corda_method not in CORDA_METHODS:
            raise ConfigError(
                f"Invalid CordaConfig: corda_method={self.corda_method!r} is not one of {choices(CORDA_METHODS)} "
                "('ipm': instruction-previewed, 'kpm': knowledge-preserved)."
            )


@dataclass(kw_only=True)
class EvaConfig:
    """EVA's settings (``init_lora_weights="eva"``; Paischer et al. 2024, "One Initialization to Rule them All:
    Fine-tuning via Explained Variance Adaptation"), with peft's names and defaults; see methods/lora/eva.py."""

    rho: float = field(default=2.0, metadata={"help": "Rank redistribution: a layer may take up to round(r * rho)."})
    tau: float = field(default=0.99, metadata={"help": "Stop once the components' cosine similarity reaches tau."})
    use_label_mask: bool = field(default=True, metadata={"help": "Leave out tokens whose label is label_mask_value."})
    label_mask_value: int = field(default=-100, metadata={"help": "The label of tokens left out of the SVD."})
    whiten: bool = field(default=False, metadata={"help": "Divide each component by sqrt(its singular value)."})
    adjust_scaling_factors: bool = field(
        default=True, metadata={"help": "alpha *= new r / r where EVA changed a layer's rank (same gradient scale)."}
    )

    def __post_init__(self) -> None:
        problems = []
        if not self.rho >= 1.0:
            problems.append(f"rho={self.rho!r} must be >= 1.0 (1.0: no rank redistribution).")
        if not 0.0 <= self.tau <= 1.0:
            problems.append(f"tau={self.tau!r} must be in [0, 1] (a cosine similarity; peft's default 0.99).")
        if problems:
            raise ConfigError("Invalid EvaConfig:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(kw_only=True)
class LoraConfig(TargetingConfig):
    """LoRA's settings, with Hugging Face peft's names and defaults."""

    peft_type: ClassVar[str] = "LORA"
    default_target_modules: ClassVar[dict[str, list[str]]] = {
        **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "deberta", "layoutlm"], ["query", "value"]),
        "deberta-v2": ["query_proj", "value_proj"],
        "distilbert": ["q_lin", "v_lin"],
        "gpt2": ["c_attn"],
        "gpt_neox": ["query_key_value"],
        **dict.fromkeys(["t5", "mt5"], ["q", "v"]),
        **dict.fromkeys(
            [
                "llama",
                "mistral",
                "mixtral",
                "qwen2",
                "qwen3",
                "gemma",
                "gemma2",
                "opt",
                "bart",
                "whisper",
                "clip",
                "clip_text_model",
                "clip_vision_model",
                "phi3",
                "olmo",
                "starcoder2",
            ],
            ["q_proj", "v_proj"],
        ),
        "phi": ["q_proj", "v_proj", "fc1", "fc2"],
        "UNet2DConditionModel": ["to_q", "to_k", "to_v", "to_out.0"],
    }
    foreign_defaults: ClassVar[dict[str, Any]] = {
        "layer_replication": None,
        "use_qalora": False,
        "qalora_group_size": 16,
        "megatron_config": None,
        "megatron_core": "megatron.core",
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

    r: int = field(default=8, metadata={"help": "Rank of the update B A."})
    lora_alpha: float = field(default=8, metadata={"help": "Scale numerator: the update is multiplied by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input."})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "Weights stored (in, out), as GPT-2's Conv1D; set per layer automatically."}
    )
    bias: str = field(default="none", metadata={"help": "Which biases also train: 'none', 'all' or 'lora_only'."})
    use_rslora: bool = field(default=False, metadata={"help": "Scale by alpha / sqrt(r) (rank-stabilised LoRA)."})
    init_lora_weights: bool | str = field(
        default=True,
        metadata={
            "help": "True: B = 0 (identity at start); 'gaussian': A ~ N(0, 1/r); False: random; 'pissa', "
            "'pissa_niter_<n>', 'olora': from the base weight's SVD / QR (the residual stays in the base weight); "
            "'eva': B = 0, then A from the activations' SVD (initialize_lora_eva_weights); 'corda': from the SVD of W "
            "times the input covariance (preprocess_corda first), the residual in the base weight."
        },
    )
    lora_bias: bool = field(
        default=False,
        metadata={"help": "Give B a trainable bias (zero at init); merging adds s * that bias to the base bias."},
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "Embedding rows (token ids) that train beside LoRA: a list for the input embedding, or "
            "{embedding name: ids} (peft's field; methods/trainable_tokens.py's layer)."
        },
    )
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "DoRA (Liu et al. 2024): W' = m (W + s B A) / ||W + s B A||_c with a trainable magnitude m per "
            "output; Linear, GPT-2 Conv1D, Embedding and (ungrouped) Conv1d/2d/3d."
        },
    )
    eva_config: EvaConfig | dict | None = field(
        default=None,
        metadata={
            "help": "EVA's settings (init_lora_weights='eva'): rho, tau, use_label_mask, label_mask_value, whiten, "
            "adjust_scaling_factors; then initialize_lora_eva_weights(model, dataloader)."
        },
    )
    corda_config: CordaConfig | dict | None = field(
        default=None,
        metadata={
            "help": "CorDA's settings (init_lora_weights='corda'): corda_method 'ipm' / 'kpm', cache_file, "
            "covariance_file; run preprocess_corda(model, config, run_model) before get_peft_model."
        },
    )
    loftq_config: dict = field(
        default_factory=dict,
        metadata={"help": "LoftQ's settings (init_lora_weights='loftq'): {'loftq_bits': 4 or 8, 'loftq_iter': n}."},
    )
    target_parameters: list[str] | None = field(
        default=None,
        metadata={
            "help": "Parameters (not modules) to adapt, as '<module>.<param>' names or dotted suffixes, e.g. "
            "'experts.gate_up_proj' for transformers' fused MoE experts (one update per expert); with "
            "target_modules=[] nothing else is wrapped."
        },
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-module rank: {name-or-regex: r}."}
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Per-module alpha: {name-or-regex: alpha}."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.eva_config, dict):  # adapter_config.json holds it as a dict (peft's layout)
            self.eva_config = EvaConfig(**self.eva_config)
        if self.init_lora_weights == "eva" and self.eva_config is None:
            self.eva_config = EvaConfig()  # peft warns and uses the defaults
        if isinstance(self.corda_config, dict):
            self.corda_config = CordaConfig(**self.corda_config)
        if self.init_lora_weights == "corda" and self.corda_config is None:
            self.corda_config = CordaConfig()
        if hasattr(self.loftq_config, "loftq_bits"):  # a LoftQConfig (methods/lora/loftq.py): stored as peft's dict
            self.loftq_config = dict(vars(self.loftq_config))
        super().__post_init__()

    def to_dict(self) -> dict:
        out = super().to_dict()
        for name in ("eva_config", "corda_config"):  # JSON: peft writes the sub-configs as dicts
            if isinstance(getattr(self, name), (EvaConfig, CordaConfig)):
                out[name] = asdict(getattr(self, name))
        return out

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.target_parameters:  # as in peft, target_modules=[] then means "no modules, only the parameters"
            problems = [p for p in problems if not p.startswith("target_modules=[]")]
        if self.target_parameters is not None and (
            isinstance(self.target_parameters, str) or not all(isinstance(t, str) for t in self.target_parameters)
        ):
            problems.append(
                f"target_parameters={self.target_parameters!r} must be a list of parameter names such as "
                "['experts.gate_up_proj'] (a regex string is not supported, as in peft)."
            )
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            problems.append(f"r={self.r!r} must be a positive integer (typical: 4, 8, 16).")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout={self.lora_dropout!r} must be in [0, 1).")
        if self.bias not in BIAS_CHOICES:
            problems.append(f"bias={self.bias!r} is not one of {choices(BIAS_CHOICES)}.")
        problems.extend(_init_problems(self.init_lora_weights))
        if self.init_lora_weights == "loftq" and not self.loftq_config:
            problems.append("init_lora_weights='loftq' needs loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=1).")
        if self.use_dora and self.lora_bias:
            problems.append("use_dora=True with lora_bias=True: DoRA has no bias on B (peft refuses it too); drop one.")
        bad = {k: v for k, v in self.rank_pattern.items() if not isinstance(v, int) or v <= 0}
        if bad:
            problems.append(f"rank_pattern has non-positive ranks {bad}; every rank must be a positive integer.")
        return problems

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)


def _pattern_value(pattern: dict, module_name: str, default):
    """peft's rule: a key matches a module whose name ends with it (regex allowed)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _niter(init: object) -> int | None:
    """n of 'pissa_niter_<n>' (n >= 0), else None."""
    if not isinstance(init, str) or not init.startswith("pissa_niter_"):
        return None
    n = init.removeprefix("pissa_niter_")
    return int(n) if n.isdigit() else None


def _init_problems(init: object) -> list[str]:
    """init_lora_weights must be one of INIT_CHOICES (an int such as 1 is not True); peft's other values are named
    as not implemented, anything else as unknown."""
    named = ("gaussian", "pissa", "olora", "eva", "corda", "loftq")
    if isinstance(init, bool) or init in named or _niter(init) is not None:
        return []
    supported = (
        "True (A Kaiming-uniform, B = 0), False (random A and B), 'gaussian' (A ~ N(0, 1/r), B = 0), 'pissa' / "
        "'pissa_niter_<n>' (principal singular vectors), 'olora' (QR), 'eva' (from activations, then "
        "initialize_lora_eva_weights) or 'corda' (context-oriented SVD, after preprocess_corda)"
    )
    if isinstance(init, str) and init.startswith("pissa_niter_"):
        return [f"init_lora_weights={init!r}: the number of iterations must be an integer >= 0, as in 'pissa_niter_4'."]
    name = init.split("_niter_")[0] if isinstance(init, str) else None
    if name in {i.split("_niter_")[0] for i in PEFT_ONLY_INITS}:
        return [
            f"init_lora_weights={init!r} is a peft initialisation peftkit does not implement yet; supported: "
            f"{supported}. Initialise with one of those; an adapter peft trained from PiSSA / OLoRA loads once peft "
            "has converted it to plain LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...))."
        ]
    return [f"init_lora_weights={init!r} is not a LoRA initialisation; use {supported}."]
