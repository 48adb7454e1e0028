"""Fully sharded data parallel training of a PeftModel with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    pm = shard(get_peft_model(base, LoraConfig(...)))       # every process, after init_process_group
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)   # after shard()
    ...                                                    # forward / backward / step as usual
    save_pretrained(pm, "out")                             # every process; rank 0 writes

Each transformer block (the classes a transformers model names in ``_no_split_modules``, e.g. ``LlamaDecoderLayer``)
becomes one FSDP unit and the whole model the root unit, which keeps what is left (embeddings, head). FSDP2 shards
every parameter on its own along dim 0 (a ``DTensor``), so frozen base weights and trainable adapter weights share a
unit without FSDP1's flat-parameter constraint (``use_orig_params=True``); gradients exist, and are reduce-scattered
(averaged over processes), for the adapter only. Parameters are replaced by sharded ones, hence the optimizer is
built after ``shard``. A forward all-gathers one block at a time, so every process must run the same forwards
(evaluate the same batches on every rank).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from peftkit.core.model import PeftModel
from peftkit.errors import ConfigError


def block_classes(model: PeftModel) -> set[str]:
    """The class names transformers keeps whole when it splits a model (``_no_split_modules``)."""
    return set(getattr(model.get_base_model(), "_no_split_modules", None) or ())


def shard(model: PeftModel, blocks: Iterable[str] | None = None, **fsdp_kwargs) -> PeftModel:
    """Shard ``model`` in place: one FSDP unit per module whose class name is in ``blocks`` (default:
    :func:`block_classes`), then the root. ``fsdp_kwargs`` go to ``fully_shard`` (``mesh``, ``mp_policy``, ...).
    Call on every process after ``torch.distributed.init_process_group`` and before building the optimizer."""
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError(
            "FSDP needs torch.distributed: launch with torchrun --nproc_per_node N (or accelerate launch on GPUs; "
            "on a CPU-only machine it starts a single process) so that a process group exists."
        )
    names = set(blocks) if blocks is not None else block_classes(model)
    if not names:
        raise ConfigError(
            f"{type(model.get_base_model()).__name__} names no blocks (_no_split_modules); pass "
            "blocks=['MyDecoderLayer'] with the class name of its transformer layer."
        )
    units = [m for m in model.get_base_model().modules() if type(m).__name__ in names]
    if not units:
        found = sorted({type(m).__name__ for m in model.modules()})
        raise ConfigError(f"No module of class {sorted(names)} in the model; its classes are {found[:20]}.")
    for module in reversed(units):  # innermost first: a unit must not swallow a nested one
        fully_shard(module, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    _check_adapter_is_sharded(model)
    return model


def _check_adapter_is_sharded(model: PeftModel) -> None:
    """fully_shard replaces parameters: an adapter that keeps references to base parameters (methods that select
    parameters, e.g. BitFit) would then save and load tensors the model no longer uses."""
    live = {id(p) for p in model.parameters()}
    for name in model.peft_config:
        stale = [
            k for k, v in model.adapter_state_dict(name).items() if isinstance(v, nn.Parameter) and id(v) not in live
        ]
        if stale:
            method = model.peft_config[name].peft_type
            raise ConfigError(
                f"FSDP: the {method} adapter {name!r} holds references to base parameters ({stale[:3]}) that "
                "sharding replaced; train this method without FSDP (DDP), or use a method that adds its own layers "
                "(LoRA, IA3, bottleneck adapters, ...)."
            )


@contextmanager
def gathered_adapter(model: PeftModel, adapter_names: Iterable[str] | None = None) -> Iterator[None]:
    """Inside, the adapters' sharded parameters are whole tensors on every process (one all-gather each, in the same
    order everywhere), so ``adapter_state_dict`` and ``save_pretrained`` see the full adapter; the frozen base stays
    sharded. The shards are put back on exit. Collective: every process enters it."""
    names = list(adapter_names) if adapter_names is not None else list(model.peft_config)
    wanted = {id(t) for name in names for t in model.adapter_state_dict(name).values()}
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in model.modules():
            for key, param in list(module._parameters.items()):
                if isinstance(param, DTensor) and id(param) in wanted:
                    full = nn.Parameter(param.detach().full_tensor(), requires_grad=param.requires_grad)
                    module._parameters[key] = full
                    swapped.append((module, key, param))
        yield
    finally:
        for module, key, param in swapped:
            module._parameters[key] = param


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def save_pretrained(model: PeftModel, save_directory: str | os.PathLike, **kwargs) -> None:
    """``model.save_pretrained`` for a sharded model: every process gathers the adapter, rank 0 writes the usual
    adapter folder (peft's format, loadable without FSDP). Collective: call it on every process."""
    with gathered_adapter(model, kwargs.get("selected_adapters")):
        if dist.get_rank() == 0:
            model.save_pretrained(save_directory, **kwargs)
    dist.barrier()


@torch.no_grad()
def load_adapter_tensors(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors (e.g. a saved adapter, the same on every process) into possibly sharded parameters:
    each process keeps its own shard, without communication."""
    for key, param in params.items():
        full = tensors[key].to(device=param.device, dtype=param.dtype)
        if isinstance(param, DTensor):
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(full)
