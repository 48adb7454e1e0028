"""One contract case per registered method: how to configure it on each tiny model.

tests/test_contract.py runs every registered method through DESIGN.md's shared rules; a method that is
registered without a case here fails ``test_every_method_has_a_case``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from peftkit import (
    AdaLoraConfig,
    BitFitConfig,
    BottleneckConfig,
    CompacterConfig,
    DiffPruningConfig,
    IA3Config,
    LayerFreezeConfig,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    TrainableTokensConfig,
    VeraConfig,
)


@dataclass(frozen=True)
class Case:
    config: Callable[[str], object]  # model kind -> config
    models: tuple[str, ...] = ("bert", "llama", "gpt2", "t5")
    identity_at_init: bool = True  # prompt methods are exempt


TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "t5": ["q", "v"]}
FINAL_NORMS = {"bert": "embeddings", "llama": "norm", "gpt2": "ln_f", "t5": "final_layer_norm"}
TASKS = {"bert": "SEQ_CLS", "llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}

CASES: dict[str, Case] = {
    "LORA": Case(lambda kind: LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], task_type=TASKS[kind])),
    "BOTTLENECK": Case(lambda kind: BottleneckConfig(preset="houlsby", task_type=TASKS[kind])),
    "COMPACTER": Case(lambda kind: CompacterConfig(preset="compacter", bottleneck_size=8, task_type=TASKS[kind])),
    "PROMPT_TUNING": Case(
        lambda kind: PromptTuningConfig(num_virtual_tokens=3, task_type=TASKS[kind]), identity_at_init=False
    ),
    "PREFIX_TUNING": Case(
        lambda kind: PrefixTuningConfig(num_virtual_tokens=3, task_type=TASKS[kind]), identity_at_init=False
    ),
    "IA3": Case(lambda kind: IA3Config(task_type=TASKS[kind])),  # peft's defaults: key, value, feed-forward
    # Llama and T5 have no biases in their Linear layers: BitFit adds them (zero at init)
    "BITFIT": Case(lambda kind: BitFitConfig(add_missing_bias=kind in ("llama", "t5"), task_type=TASKS[kind])),
    # the last block, plus the embeddings (BERT: position ids are one row shared by the batch) / the final norm
    "FREEZE": Case(
        lambda kind: LayerFreezeConfig(trainable_layers=1, trainable_modules=[FINAL_NORMS[kind]], task_type=TASKS[kind])
    ),
    # GPT-2 and T5 tie their embeddings to the LM head (a merge would change both): the attention projections there
    "DIFF": Case(
        lambda kind: DiffPruningConfig(
            target_modules="all" if kind in ("bert", "llama") else TARGETS[kind], task_type=TASKS[kind]
        )
    ),
    "LN_TUNING": Case(lambda kind: LNTuningConfig(task_type=TASKS[kind])),  # the default norms of each model
    # GPT-2 and T5 tie the input embedding to the LM head: the core refuses to merge into a shared tensor
    # (core/merge.py check_not_tied), so their rows are in tests/test_trainable_tokens.py instead
    "TRAINABLE_TOKENS": Case(
        lambda kind: TrainableTokensConfig(token_indices=list(range(1, 100, 3)), task_type=TASKS[kind]),
        models=("bert", "llama"),
    ),
    "VERA": Case(lambda kind: VeraConfig(r=8, target_modules=TARGETS[kind], task_type=TASKS[kind])),
    # GPT-2's Conv1D is not a layer peft's OFT takes (Linear, Conv2d, Embedding): refused there, as peft does
    "OFT": Case(
        lambda kind: OFTConfig(oft_block_size=8, target_modules=TARGETS[kind], task_type=TASKS[kind]),
        models=("bert", "llama", "t5"),
    ),
    # GPT-2's Conv1D is not a layer peft's LoHa takes (Linear, Conv1d, Conv2d only): refused there, as peft does
    "LOHA": Case(
        lambda kind: LoHaConfig(r=4, alpha=8, target_modules=TARGETS[kind], task_type=TASKS[kind]),
        models=("bert", "llama", "t5"),
    ),
    # as LoHa: GPT-2's Conv1D is refused (peft's LoKr takes Linear, Conv1d, Conv2d only); r=2 keeps W2 (8, 8) factored
    "LOKR": Case(
        lambda kind: LoKrConfig(r=2, alpha=4, target_modules=TARGETS[kind], task_type=TASKS[kind]),
        models=("bert", "llama", "t5"),
    ),
    "ADALORA": Case(
        lambda kind: AdaLoraConfig(
            init_r=4, target_r=2, total_step=10, target_modules=TARGETS[kind], task_type=TASKS[kind]
        )
    ),
}
