"""What a training run builds before its first step: the method's config from the flags, the base model's dropout
and activation checkpointing, the learning-rate schedule, and the checks of distributed settings."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from peftkit.core.config import PeftConfig
from peftkit.core.method import Method
from peftkit.core.registry import get_method, method_names
from peftkit.errors import ConfigError, choices
from peftkit.train.config import TrainConfig
from peftkit.train.metrics import HIGHER_IS_BETTER
from peftkit.train.models import checkpoint_pooling, load_base_model, model_name, use_mean_pooling


def build_method_config(method: str, args: dict[str, Any], task_type: str | None, base_model: str) -> PeftConfig:
    """The method's config from ``method_args``; an unknown key names the method's valid fields."""
    try:
        cls = get_method(method).config_class
    except ConfigError as err:
        names = [n.lower() for n in method_names()]
        raise ConfigError(f"--method {method!r} is not a registered method; choose one of {choices(names)}.") from err
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ConfigError(
            f"--method {method}: unknown settings {choices(unknown)}; {cls.__name__} has {choices(fields)}."
        )
    settings = {"task_type": task_type, "base_model_name_or_path": model_name(base_model), **args}
    try:
        return cls(**{k: v for k, v in settings.items() if k in fields})
    except ConfigError as err:
        named = [f"--{n.replace('_', '-')}" for n in dict.fromkeys(re.findall(r"(\w+)=", str(err))) if n in args]
        where = f" (set by {', '.join(named)} or method_args in the YAML file)" if named else ""
        raise ConfigError(f"--method {method}{where}: {err}") from err


# A causal LM's default lr is its method's classification default times this factor. Measured for LoRA on
# SmolLM2-135M-Instruct + Alpaca-200 (benchmarks/lr_sweep_smollm2.py, docs/cli.md): over 1e-4 .. 2e-3 the held-out
# answer loss after 30 x 4 rows fell with the rate (1.944 at 1e-4, 1.850 at 1e-3, 1.831 at 2e-3) and every adapter
# still answered "Paris"; 1e-3 (LoRA's 2e-3 x 0.5) is within 1% of the best at half the rate reported to garble
# answers within 8 steps, leaving room for longer runs.
CAUSAL_LM_LR_FACTOR = 0.5


def default_lr(method: Method, task: str) -> tuple[float, str]:
    """(the peak lr a run uses without --lr, why): the method's ``Training.learning_rate`` for classification,
    times CAUSAL_LM_LR_FACTOR for a causal LM (whole-sequence generation is far more sensitive to large steps)."""
    rate = method.training.learning_rate
    if task == "causal_lm":
        return rate * CAUSAL_LM_LR_FACTOR, (
            f"{method.name}'s default for causal LMs: {rate:.0e} x {CAUSAL_LM_LR_FACTOR:g}, from a sweep on SmolLM2; "
            "--lr sets it"
        )
    return rate, f"{method.name}'s default for classification; --lr sets it"


def optimizer_groups(config: TrainConfig, method: Method, host: Any, lr: float) -> list[Any]:
    """What AdamW trains and at which rates: LoRA+'s groups under ``--loraplus-lr-ratio``, else the method's own
    groups (``Training.param_groups``), else every trainable parameter at ``lr``."""
    decay = config.weight_decay
    if config.loraplus_lr_ratio is not None:
        from peftkit.methods.lora.loraplus import loraplus_param_groups

        return loraplus_param_groups(host, lr, config.loraplus_lr_ratio, loraplus_weight_decay=decay)
    if method.training.param_groups:
        return method.training.param_groups(host, lr, decay)
    return [p for p in host.parameters() if p.requires_grad]


def set_dropout(model: nn.Module, p: float) -> None:
    """Every ``nn.Dropout`` of ``model`` drops with probability ``p`` (attention dropout included: Hugging Face
    models read it from the module). Short runs learn faster without it."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def checkpoint_activations(base: nn.Module, wanted: bool | None, task: str, say: Callable[[str], None]) -> None:
    """Recompute activations in backward (transformers >= 5 names it activation checkpointing) when ``wanted``;
    ``None`` (the default): on for causal LMs, whose activations dominate a step's memory (TRL's SFTConfig does the
    same), where the model supports it, and off for classifiers. The choice is printed."""
    supported = hasattr(base, "activation_checkpointing_enable") or hasattr(base, "gradient_checkpointing_enable")
    on = wanted if wanted is not None else task == "causal_lm" and supported
    why = "--gradient-checkpointing" if wanted is not None else f"default for {task}"
    say(f"activation checkpointing {'on' if on else 'off'} ({why})")
    if on:
        _enable_checkpointing(base)


def _enable_checkpointing(base: nn.Module) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(base, "gradient_checkpointing_enable"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ConfigError(f"--gradient-checkpointing: {type(base).__name__} does not support it; drop the flag.")
    if hasattr(base, "enable_input_require_grads"):
        base.enable_input_require_grads()


def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    """Multiplier of the peak lr at step s: linear warmup, then linear or cosine decay to 0 (or constant)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def check_fsdp_settings(config: TrainConfig) -> None:
    """Refuse accelerate's own FSDP and resumable checkpoints under --fsdp, before anything is loaded."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise ConfigError(
            "accelerate launch --use_fsdp: peftkit shards the model itself (FSDP2, one unit per transformer block); "
            "launch without --use_fsdp and pass --fsdp to peftkit train."
        )
    if config.fsdp and config.save_steps:
        raise ConfigError(
            f"--fsdp with --save-steps {config.save_steps}: resumable checkpoints (optimizer state) are not written "
            "under FSDP; drop --save-steps (the best and final adapters are still saved)."
        )


def check_fsdp_method(config: TrainConfig, method: Method) -> None:
    """--fsdp cannot run a method whose after-training stage replaces the adapter's tensors."""
    if config.fsdp and method.training.after_training:
        raise ConfigError(
            f"--fsdp with --method {config.method}: its after-training stage changes the adapter's tensors, "
            "which sharded parameters do not support; train it without --fsdp (one process, or DDP with "
            "torchrun / accelerate launch)."
        )


def prepare_base(
    config: TrainConfig,
    task: str,
    labels: list[str] | None,
    tokenizer: Any,
    model: nn.Module | None,
    say: Callable[[str], None],
) -> nn.Module:
    """The base model (``model``, or ``config.model`` loaded with a head for ``labels``) with the run's pooling,
    dropout and padding token."""
    base = model if model is not None else load_base_model(config, task, labels)
    if config.pooling == "mean":
        use_mean_pooling(base)
    elif model is None and task == "classification" and checkpoint_pooling(config.model) == "mean":
        say(
            f"note: {config.model} is a sentence encoder trained on the mean of its token vectors "
            "(1_Pooling/config.json); --pooling mean lets the classifier read that instead of [CLS]."
        )
    if config.model_dropout is not None:
        set_dropout(base, config.model_dropout)
    if getattr(base.config, "pad_token_id", None) is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    return base


def train_in_float32(model: nn.Module) -> list[str]:
    """Under ``--dtype bf16|fp16``: the modules that train whole (a classifier head, ``modules_to_save`` copies) move
    to float32 and cast their floating inputs to it, as the adapters' own tensors already are (peft's
    ``autocast_adapter_dtype``): AdamW updates of 1e-4 relative size vanish in bf16's 8-bit mantissa. Tensors that
    train inside a frozen half-precision layer (BitFit's biases) keep its dtype. Returns the modules moved."""
    moved = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        half = [p for p in own if p.dtype in (torch.float16, torch.bfloat16)]
        if not half or not all(p.requires_grad for p in module.parameters()):
            continue
        module.float()
        module.register_forward_pre_hook(_float_inputs, with_kwargs=True)
        moved.append(name)
    return moved


def _float_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def cast(x: object) -> object:
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def cpu_threads(processes: int) -> int:
    """torch's CPU threads per process by default: the cores this process may use, shared by the processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // processes)


def best_metric(name: str | None, task: str) -> str:
    """The dev metric that picks the best adapter: ``name``, or accuracy (classification) / loss (causal LM)."""
    metric = name or ("accuracy" if task == "classification" else "loss")
    if metric not in HIGHER_IS_BETTER:
        raise ConfigError(f"--metric-for-best {metric!r} is not a metric; use one of {choices(HIGHER_IS_BETTER)}.")
    return metric
