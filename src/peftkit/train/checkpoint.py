"""Resumable checkpoints of a training run: write one, find the latest, load it back for ``--resume``.

A checkpoint (``OUTPUT/checkpoints/step-NNNNNNN/``) holds the adapter in its usual files plus ``trainer_state.pt``:
the optimizer and scheduler state, every process's RNG state, the position in the data order (epoch, micro-batch),
the history and the settings. Only tensors and plain containers are stored, and they are read back with
``torch.load(weights_only=True)``, so a checkpoint cannot run code. A step folder is written under a ``.tmp`` name
and renamed when complete; the oldest ones beyond ``save_total_limit`` are removed.
"""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peftkit.core import io
from peftkit.errors import CheckpointError, ConfigError, choices

if TYPE_CHECKING:
    from peftkit.train.trainer import Trainer

STATE_NAME = "trainer_state.pt"
STEP_GLOB = "step-???????"
# Settings that may change between a run and its resumption without changing its trajectory.
RESUMABLE_CHANGES = {"progress", "threads", "max_steps", "epochs", "early_stopping_patience", "eval_before"}


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def save_checkpoint(trainer: Trainer) -> None:
    """Write ``checkpoints/step-NNNNNNN`` (rank 0; every process hands over its RNG state)."""
    from accelerate.utils import gather_object

    rngs = gather_object([rng_state()])  # every process's RNG, so dropout resumes exactly
    if not trainer.main:
        return
    folder = trainer.out / "checkpoints" / f"step-{trainer.state['step']:07d}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pm = trainer.pm
    pm.save_pretrained(tmp)
    state = {
        "state": trainer.state,
        "history": trainer.history,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "rng": rngs,
        "config": trainer.config.to_dict(),
    }
    live = pm.adapter_state_dict(pm.active_adapter)
    # the file just written, read back (building the file layout again would redo diff pruning's projection)
    written = io.from_file_keys(io.load_tensors(io.adapter_dir(tmp, pm.active_adapter)))
    if {k: v.shape for k, v in live.items()} != {k: v.shape for k, v in written.items()}:
        # The file holds another layout than training does (diff pruning's gated state is saved as a sparse
        # delta): keep the live tensors too, so that resuming continues from them exactly.
        state["adapter"] = {k: v.detach().clone() for k, v in live.items()}
    torch.save(state, tmp / STATE_NAME)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    for old in sorted((trainer.out / "checkpoints").glob(STEP_GLOB))[: -trainer.config.save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(trainer: Trainer, folder: Path) -> None:
    """Put the run back where the checkpoint in ``folder`` left it (same settings required)."""
    saved = read_state(folder)
    changed = sorted(
        k for k, v in saved["config"].items() if k not in RESUMABLE_CHANGES and getattr(trainer.config, k) != v
    )
    if changed:
        raise ConfigError(
            f"--resume: settings differ from the checkpoint's run in {choices(changed)}; resume with the same "
            f"settings (they are in {trainer.out / 'train_config.yaml'})."
        )
    restore_adapter(trainer, folder, saved)
    trainer.optimizer.load_state_dict(saved["optimizer"])
    trainer.scheduler.load_state_dict(saved["scheduler"])
    trainer.state, trainer.history = saved["state"], saved["history"]
    trainer.state.setdefault("after_training_done", False)  # checkpoints written before the key existed
    rng = saved["rng"][trainer.acc.process_index]
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_python_state(rng["python"]))


def read_state(folder: Path) -> dict[str, Any]:
    """``folder``'s trainer state, read without unpickling code; CheckpointError when it is missing or unreadable."""
    path = folder / STATE_NAME
    fix = f"delete {folder} to resume from the checkpoint before it, or drop --resume to start afresh"
    if not path.is_file():
        raise CheckpointError(f"--resume: {folder} has no {STATE_NAME} (the run stopped while writing it?); {fix}.")
    try:
        saved = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" not in str(err):
            raise CheckpointError(f"--resume: {path} is truncated or corrupt; {fix}.") from None
        raise CheckpointError(  # torch's own message advises weights_only=False, which would run the file's code
            f"--resume: {path} holds objects other than tensors and plain containers, which peftkit does not "
            f"load (unpickling them could run code); peftkit writes no such file. {fix[0].upper()}{fix[1:]}."
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"--resume: {path} is truncated or corrupt ({type(err).__name__}); {fix}.") from None
    missing = sorted({"state", "history", "optimizer", "scheduler", "rng", "config"} - set(saved))
    if missing:
        raise CheckpointError(f"--resume: {path} lacks {choices(missing)}; it is not peftkit's trainer state; {fix}.")
    return saved


def restore_adapter(trainer: Trainer, folder: Path, saved: dict[str, Any]) -> None:
    """The checkpoint's adapter into this run, before its optimizer state is loaded."""
    pm = trainer.pm
    if saved["state"].get("after_training_done"):
        # The stage changed the adapter's tensors (e.g. a fixed sparse support): reload it from its files,
        # then build the later stage's optimizer, into which the saved state goes.
        name = pm.active_adapter
        pm.delete_adapter(name)
        pm.load_adapter(io.adapter_dir(folder, name), name, is_trainable=True)
        pm.set_adapter(name)
        trainer._build_optimizer(saved["state"]["step"])
        trainer._wrap_model()
    if "adapter" in saved:  # the live tensors, when the files hold another layout
        copy_adapter(trainer, saved["adapter"], folder)
    elif not saved["state"].get("after_training_done"):
        load_adapter_weights(trainer, folder)


def latest_checkpoint(out: Path) -> Path:
    """The newest ``step-NNNNNNN`` folder under ``out/checkpoints``."""
    found = sorted((out / "checkpoints").glob(STEP_GLOB))
    if not found:
        raise CheckpointError(
            f"--resume: no checkpoint in {out / 'checkpoints'}; train with --save-steps N first, "
            "or drop --resume to start afresh."
        )
    return found[-1]


def load_adapter_weights(trainer: Trainer, folder: Path) -> None:
    """Copy the adapter saved in ``folder`` (a checkpoint, the best one) into the run's parameters."""
    copy_adapter(trainer, io.from_file_keys(io.load_tensors(folder)), folder)


def copy_adapter(trainer: Trainer, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Copy ``tensors`` (model-relative names, the live layout) into the active adapter's parameters."""
    params = trainer.pm.adapter_state_dict(trainer.pm.active_adapter)
    if set(tensors) != set(params):
        raise CheckpointError(f"{folder} holds another adapter than this run builds (another method or settings).")
    if trainer.config.fsdp:  # each process keeps its shard of the saved tensors
        from peftkit.train import fsdp

        fsdp.load_adapter_tensors(params, tensors)
        return
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])


def _as_python_state(state: Any) -> tuple:
    """random.setstate needs tuples; a saved state may come back with lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
