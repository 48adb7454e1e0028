"""The training loop: any registered method, any supported model, one process or many (accelerate / torchrun).

    result = train(TrainConfig(model="minilm", data="tweets", method="lora", method_args={"r": 8}, max_steps=100))
    result.before["accuracy"], result.after["accuracy"]

Each optimizer step consumes ``grad_accum`` micro-batches of ``batch_size`` rows per process; the loss is the
task loss plus the method's ``auxiliary_loss()``. Under DDP every process evaluates the full dev set with the
unwrapped model (no collective calls, identical decisions on every rank) and only rank 0 writes files.

A checkpoint holds the adapter, the optimizer and scheduler state, every process's RNG state and the position
in the data order (epoch, micro-batch), so ``resume=True`` continues with exactly the losses of an
uninterrupted run.

A method's ``after_training`` stage (``Method.training``) runs once: after the last step, or part-way at
``after_training_at`` of the steps (diff pruning's second stage: finalize, then train the fixed support).
A mid-run stage change builds a new optimizer over what trains afterwards and continues the lr schedule at the
same step; a checkpoint written after it reloads the changed adapter from its own files on resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import shutil
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftkit.core import io
from peftkit.core.config import PeftConfig
from peftkit.core.model import PeftModel, get_peft_model
from peftkit.core.registry import get_method, method_names
from peftkit.errors import CheckpointError, ConfigError, choices
from peftkit.train import data as D
from peftkit.train.config import TrainConfig
from peftkit.train.metrics import HIGHER_IS_BETTER, classification_metrics, lm_metrics
from peftkit.train.models import TASK_TYPES, checkpoint_pooling, load_model, load_tokenizer, use_mean_pooling

STATE_NAME = "trainer_state.pt"
# Settings that may change between a run and its resumption without changing its trajectory.
RESUMABLE_CHANGES = {"progress", "threads", "max_steps", "epochs", "early_stopping_patience", "eval_before"}


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
    settings = {"task_type": task_type, "base_model_name_or_path": base_model, **args}
    try:
        return cls(**{k: v for k, v in settings.items() if k in fields})
    except ConfigError as err:
        named = [f"--{n.replace('_', '-')}" for n in dict.fromkeys(re.findall(r"(\w+)=", str(err))) if n in args]
        where = f" (set by {', '.join(named)} or method_args in the YAML file)" if named else ""
        raise ConfigError(f"--method {method}{where}: {err}") from err


@dataclass
class TrainResult:
    output_dir: Path
    task: str
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    best_step: int | None = None
    steps: int = 0
    train_seconds: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    peak_memory_mb: float = 0.0
    lr: float = 0.0  # the peak learning rate used (the method's default when none was given)
    history: dict[str, list] = field(default_factory=dict)
    labels: list[str] | None = None
    majority: float | None = None
    main_process: bool = True  # False on the other ranks of a distributed run

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["output_dir"] = str(self.output_dir)
        return out


class MemoryMonitor:
    """Peak memory while training: CUDA's allocator peak, or on CPU the peak resident set size sampled from
    /proc every 20 ms (minus the size at the start)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.peak = self.start = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def __enter__(self) -> MemoryMonitor:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())

    @property
    def megabytes(self) -> float:
        return max(0, self.peak - self.start) / 2**20


def set_dropout(model: nn.Module, p: float) -> None:
    """Every ``nn.Dropout`` of ``model`` drops with probability ``p`` (attention dropout included: Hugging Face
    models read it from the module). Short runs learn faster without it."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def lr_lambda(warmup: int, total: int, schedule: str):
    """Multiplier of the peak lr at step s: linear warmup, then linear or cosine decay to 0 (or constant)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Trainer:
    """One training run. ``Trainer(config).train()``; or pass a ready ``model`` and ``tokenizer``."""

    def __init__(self, config: TrainConfig, model: nn.Module | None = None, tokenizer: Any = None) -> None:
        from accelerate import Accelerator

        _check_fsdp_settings(config)
        self.config = config
        self.acc = Accelerator(cpu=not torch.cuda.is_available())
        self.main = self.acc.is_main_process
        self.out = Path(config.output_dir)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self._threads_before = torch.get_num_threads()  # restored when train() ends
        torch.set_num_threads(config.threads or max(1, cores // self.acc.num_processes))
        self._seed_everything(config.seed)
        self.tokenizer = tokenizer or load_tokenizer(config.model)
        self._prepare_data()
        method_config = build_method_config(config.method, config.method_args, TASK_TYPES[self.task], config.model)
        self.method = get_method(method_config.peft_type)
        if config.fsdp and self.method.training.after_training:
            raise ConfigError(
                f"--fsdp with --method {config.method}: its after-training stage changes the adapter's tensors, "
                "which sharded parameters do not support; train it without --fsdp (one process, or DDP with "
                "torchrun / accelerate launch)."
            )
        base = model if model is not None else load_model(config.model, self.task, self.labels)
        if config.pooling == "mean":
            use_mean_pooling(base)
        elif model is None and self.task == "classification" and checkpoint_pooling(config.model) == "mean":
            self._say(
                f"note: {config.model} is a sentence encoder trained on the mean of its token vectors "
                "(1_Pooling/config.json); --pooling mean lets the classifier read that instead of [CLS]."
            )
        if config.model_dropout is not None:
            set_dropout(base, config.model_dropout)
        if getattr(base.config, "pad_token_id", None) is None:
            base.config.pad_token_id = self.tokenizer.pad_token_id
        self.pm: PeftModel = get_peft_model(base, method_config)
        if config.gradient_checkpointing:
            self._checkpoint_activations(base)
        self.pm.to(self.acc.device)
        if config.fsdp:  # before the optimizer: sharding replaces the parameters
            from peftkit.train import fsdp

            fsdp.shard(self.pm)
        self.lr = config.lr or self.method.training.learning_rate
        self.total_steps = self._total_steps()
        self.lr_factor = lr_lambda(int(config.warmup_ratio * self.total_steps), self.total_steps, config.schedule)
        self.stage_step = self._stage_step()
        self._build_optimizer(0)
        self._wrap_model()
        self.metric = config.metric_for_best or ("accuracy" if self.task == "classification" else "loss")
        if self.metric not in HIGHER_IS_BETTER:
            raise ConfigError(
                f"--metric-for-best {self.metric!r} is not a metric; use one of {choices(HIGHER_IS_BETTER)}."
            )
        self.state: dict[str, Any] = {
            "step": 0, "epoch": 0, "micro": 0, "best": None, "best_step": None, "bad": 0, "after_training_done": False
        }  # fmt: skip
        self.history: dict[str, list] = {"step": [], "train_loss": [], "lr": [], "eval_step": [], "eval": []}

    # ---- setup -------------------------------------------------------------------------------------------
    @staticmethod
    def _checkpoint_activations(base: nn.Module) -> None:
        """Recompute activations in backward (transformers >= 5 names it activation checkpointing)."""
        kwargs = {"use_reentrant": False}
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(base, "gradient_checkpointing_enable"):
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ConfigError(f"--gradient-checkpointing: {type(base).__name__} does not support it; drop the flag.")
        if hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        torch.manual_seed(seed)

    def _prepare_data(self) -> None:
        train_rows, dev_rows = D.load_splits(self.config)
        self.columns = D.detect_columns(train_rows, self.config)
        self.task = self.columns.task
        length = self.config.max_length
        if self.task == "classification":
            self.labels = D.label_names(train_rows, self.columns.label)
            if len(self.labels) < 2:
                raise ConfigError(f"--label-column {self.columns.label!r} has one value only ({self.labels}).")
            self.train_set = D.encode_classification(train_rows, self.columns, self.tokenizer, self.labels, length)
            self.dev_set = D.encode_classification(dev_rows, self.columns, self.tokenizer, self.labels, length)
        else:
            self.labels = None
            self.train_set = D.encode_causal_lm(train_rows, self.columns, self.tokenizer, length)
            self.dev_set = D.encode_causal_lm(dev_rows, self.columns, self.tokenizer, length)

    def _epoch(self, epoch: int) -> list[list[int]]:
        c = self.config
        return D.epoch_batches(
            len(self.train_set), c.batch_size, epoch, c.seed, self.acc.num_processes, self.acc.process_index
        )

    def _total_steps(self) -> int:
        if self.config.max_steps:
            return self.config.max_steps
        per_epoch = max(1, len(self._epoch(0)) // self.config.grad_accum)
        return max(1, math.ceil(self.config.epochs * per_epoch))

    def _stage_step(self) -> int | None:
        """The step after which the method's after_training runs part-way (None: after the last step)."""
        if not self.method.training.after_training:
            return None
        step = math.floor(self.method.training.after_training_at * self.total_steps)
        return step if 1 <= step < self.total_steps else None

    def _build_optimizer(self, step: int) -> None:
        """AdamW over the parameters that train now (the method's groups, if any), and the lr schedule positioned
        after ``step`` optimizer steps: at a mid-run stage change the schedule continues, warmup is not repeated."""
        self.params = [p for p in self.pm.parameters() if p.requires_grad]
        decay = self.config.weight_decay
        groups = (
            self.method.training.param_groups(self.pm, self.lr, decay)
            if self.method.training.param_groups
            else self.params
        )
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=decay)
        for group in self.optimizer.param_groups:
            group["initial_lr"] = group["lr"]  # each group's peak rate, which the schedule scales
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor, last_epoch=step - 1)

    def _wrap_model(self) -> None:
        """The model the steps run (DDP over the current parameters; wrap again when the adapter's change)."""
        if self.config.fsdp:
            self.model = self.pm
            return
        if hasattr(self, "model"):  # a stage change: under DDP accelerate would keep the old wrapper alive, with
            self.acc.free_memory()  # its gradient buckets and the replaced tensors (only prepare_model is used here)
        self.model = self.acc.prepare_model(self.pm)

    def _batch(self, rows: list[dict], index: list[int]) -> dict[str, torch.Tensor]:
        batch = D.collate([rows[i] for i in index], self.tokenizer.pad_token_id)
        return {k: v.to(self.acc.device) for k, v in batch.items()}

    def _autocast(self):
        if not self.config.bf16:
            return nullcontext()
        return torch.autocast(self.acc.device.type, dtype=torch.bfloat16)

    # ---- evaluation --------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Dev metrics with the unwrapped model (every process computes the same numbers)."""
        was_training = self.pm.training
        self.pm.eval()
        preds, golds, loss_sum, tokens = [], [], 0.0, 0
        batches = D.eval_batches(len(self.dev_set), self.config.eval_batch_size)
        bar = tqdm(batches, desc="eval", leave=False, disable=not (self.main and self.config.progress))
        for index in bar:
            batch = self._batch(self.dev_set, index)
            labels = batch.pop("labels")
            with self._autocast():
                logits = self.pm(**batch).logits.float()
            if self.task == "classification":
                preds.append(logits.argmax(-1).cpu())
                golds.append(labels.cpu())
            else:
                shifted = labels[:, 1:]
                loss_sum += float(
                    nn.functional.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), reduction="sum"
                    )
                )
                tokens += int((shifted != D.IGNORE).sum())
        self.pm.train(was_training)
        if self.task == "classification":
            return classification_metrics(torch.cat(preds), torch.cat(golds), len(self.labels))
        return lm_metrics(loss_sum, tokens)

    def _record_eval(self, metrics: dict[str, float], final: bool = False) -> bool:
        """Store an evaluation; keep the best adapter (``final``: this one, whatever came before); True when early
        stopping says stop."""
        self.history["eval_step"].append(self.state["step"])
        self.history["eval"].append(metrics)
        value, best = metrics[self.metric], self.state["best"]
        better = final or best is None or (value > best if HIGHER_IS_BETTER[self.metric] else value < best)
        if better:
            self.state.update(best=value, best_step=self.state["step"], bad=0)
            self._save_adapter(self.out / "best")
        else:
            self.state["bad"] += 1
        patience = self.config.early_stopping_patience
        return patience is not None and self.state["bad"] >= patience

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "python": random.getstate()}

    def save_checkpoint(self) -> None:
        from accelerate.utils import gather_object

        rngs = gather_object([self._rng_state()])  # every process's RNG, so dropout resumes exactly
        if not self.main:
            return
        folder = self.out / "checkpoints" / f"step-{self.state['step']:07d}"
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.pm.save_pretrained(tmp)
        state = {
            "state": self.state,
            "history": self.history,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs,
            "config": self.config.to_dict(),
        }
        live = self.pm.adapter_state_dict(self.pm.active_adapter)
        # the file just written, read back (building the file layout again would redo diff pruning's projection)
        written = io.from_file_keys(io.load_tensors(io.adapter_dir(tmp, self.pm.active_adapter)))
        if {k: v.shape for k, v in live.items()} != {k: v.shape for k, v in written.items()}:
            # The file holds another layout than training does (diff pruning's gated state is saved as a sparse
            # delta): keep the live tensors too, so that resuming continues from them exactly.
            state["adapter"] = {k: v.detach().clone() for k, v in live.items()}
        torch.save(state, tmp / STATE_NAME)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        for old in sorted((self.out / "checkpoints").glob("step-???????"))[: -self.config.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, folder: Path) -> None:
        saved = torch.load(folder / STATE_NAME, weights_only=True)
        changed = sorted(
            k for k, v in saved["config"].items() if k not in RESUMABLE_CHANGES and getattr(self.config, k) != v
        )
        if changed:
            raise ConfigError(
                f"--resume: settings differ from the checkpoint's run in {choices(changed)}; resume with the same "
                f"settings (they are in {self.out / 'train_config.yaml'})."
            )
        self._restore_adapter(folder, saved)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.state, self.history = saved["state"], saved["history"]
        self.state.setdefault("after_training_done", False)  # checkpoints written before the key existed
        rng = saved["rng"][self.acc.process_index]
        torch.set_rng_state(rng["torch"])
        random.setstate(_as_python_state(rng["python"]))

    def _restore_adapter(self, folder: Path, saved: dict[str, Any]) -> None:
        """The checkpoint's adapter into this run, before its optimizer state is loaded."""
        if saved["state"].get("after_training_done"):
            # The stage changed the adapter's tensors (e.g. a fixed sparse support): reload it from its files,
            # then build the later stage's optimizer, into which the saved state goes.
            name = self.pm.active_adapter
            self.pm.delete_adapter(name)
            self.pm.load_adapter(io.adapter_dir(folder, name), name, is_trainable=True)
            self.pm.set_adapter(name)
            self._build_optimizer(saved["state"]["step"])
            self._wrap_model()
        if "adapter" in saved:  # the live tensors, when the files hold another layout
            self._copy_adapter(saved["adapter"], folder)
        elif not saved["state"].get("after_training_done"):
            self.load_adapter_weights(folder)

    def latest_checkpoint(self) -> Path:
        found = sorted((self.out / "checkpoints").glob("step-???????"))
        if not found:
            raise CheckpointError(
                f"--resume: no checkpoint in {self.out / 'checkpoints'}; train with --save-steps N first, "
                "or drop --resume to start afresh."
            )
        return found[-1]

    # ---- training --------------------------------------------------------------------------------------------
    def _step(self, micro: list[list[int]]) -> float:
        """One optimizer step over ``micro`` micro-batches; returns the mean loss over every process."""
        self.model.train()
        total = torch.zeros((), device=self.acc.device)
        for k, index in enumerate(micro):
            batch = self._batch(self.train_set, index)
            sync = k == len(micro) - 1
            skip_sync = not sync and not self.config.fsdp  # FSDP reduce-scatters every micro-batch's gradients
            with self._autocast(), self.acc.no_sync(self.model) if skip_sync else nullcontext():
                loss = self.model(**batch).loss + self.pm.auxiliary_loss()
                (loss / len(micro)).backward()
            total += loss.detach().float() / len(micro)
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(self.acc.reduce(total, reduction="mean"))

    def _next_micro(self) -> list[list[int]] | None:
        """The next step's micro-batches, moving to the next epoch when this one is used up."""
        for _ in range(2):
            batches = self._epoch(self.state["epoch"])
            start = self.state["micro"]
            micro = batches[start : start + self.config.grad_accum]
            if micro:
                self.state["micro"] = start + len(micro)
                return micro
            self.state.update(epoch=self.state["epoch"] + 1, micro=0)
        return None

    def train(self, resume: bool = False) -> TrainResult:
        try:
            return self._train(resume)
        finally:
            torch.set_num_threads(self._threads_before)

    def _train(self, resume: bool) -> TrainResult:
        c = self.config
        if resume:
            self.load_checkpoint(self.latest_checkpoint())
        elif self.main:
            shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
            shutil.rmtree(self.out / "best", ignore_errors=True)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            c.save_yaml(self.out / "train_config.yaml")
        result = self._result()
        if not resume and c.eval_before:
            self._record_eval(self.evaluate())
        if self.history["eval_step"][:1] == [0]:
            result.before = self.history["eval"][0]
            self._say(f"dev before training: {_fmt(result.before)}")
        start = time.perf_counter()
        bar = tqdm(
            total=self.total_steps, initial=self.state["step"], desc=f"train {c.method}", disable=not self._bars()
        )
        stop = False
        with MemoryMonitor(self.acc.device) as memory:
            while self.state["step"] < self.total_steps and not stop:
                micro = self._next_micro()
                if micro is None:
                    raise ConfigError("The training data yields no batch; lower --batch-size or add rows.")
                loss = self._step(micro)
                self.state["step"] += 1
                step = self.state["step"]
                self.history["step"].append(step)
                self.history["train_loss"].append(loss)
                self.history["lr"].append(self.scheduler.get_last_lr()[0])
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.history['lr'][-1]:.2e}")
                self._change_stage(step)
                if c.eval_steps and step % c.eval_steps == 0 and step < self.total_steps:
                    stop = self._record_eval(self.evaluate())
                if c.save_steps and step % c.save_steps == 0:
                    self.save_checkpoint()
        bar.close()
        result.train_seconds = time.perf_counter() - start
        result.peak_memory_mb = memory.megabytes
        if (
            self.method.training.after_training
        ):  # e.g. diff pruning's finalize: what it leaves is what is evaluated and saved
            self._after_training()
            self._record_eval(self.evaluate(), final=True)
        elif not self.history["eval_step"] or self.history["eval_step"][-1] != self.state["step"]:
            self._record_eval(self.evaluate())
        return self._finish(result)

    def _after_training(self) -> None:
        """The method's after_training stage, once per run (a mid-run stage change already ran it)."""
        if not self.state["after_training_done"]:
            self.method.training.after_training(self.pm)
            self.state["after_training_done"] = True

    def _change_stage(self, step: int) -> None:
        """At the stage step (``Method.training.after_training_at``): the method's after_training, then a new
        optimizer over what trains now; the lr schedule continues at ``step``."""
        if step != self.stage_step or self.state["after_training_done"]:
            return
        self._after_training()
        self._build_optimizer(step)
        self._wrap_model()
        self._say(f"step {step}: {self.config.method}'s after-training stage ran; training continues")

    def _finish(self, result: TrainResult) -> TrainResult:
        self.acc.wait_for_everyone()
        best = self.state["best_step"]
        if best != self.state["step"]:
            self.load_adapter_weights(self.out / "best")
        last = max(i for i, step in enumerate(self.history["eval_step"]) if step == best)
        result.after = self.history["eval"][last]
        result.best_step = self.state["best_step"]
        result.steps = self.state["step"]
        result.history = self.history
        self._save_adapter(self.out)
        if self.main:
            (self.out / "metrics.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
            from peftkit.train.plot import plot_curves

            plot_curves(self.history, self.out / "curves.png", self.metric)
            self._say(f"dev after training (step {result.best_step}): {_fmt(result.after)}")
            if result.majority is not None:
                self._say(f"majority class: {result.majority:.4f}; output: {self.out}")
        self.acc.wait_for_everyone()
        return result

    def _save_adapter(self, folder: Path) -> None:
        """Rank 0 writes the adapter; under FSDP every process first gathers its shards (a collective call)."""
        if self.config.fsdp:
            from peftkit.train import fsdp

            fsdp.save_pretrained(self.pm, folder)
        elif self.main:
            self.pm.save_pretrained(folder)

    def load_adapter_weights(self, folder: Path) -> None:
        """Copy the adapter saved in ``folder`` (a checkpoint, the best one) into this run's parameters."""
        self._copy_adapter(io.from_file_keys(io.load_tensors(folder)), folder)

    def _copy_adapter(self, tensors: dict[str, torch.Tensor], folder: Path) -> None:
        """Copy ``tensors`` (model-relative names, the live layout) into the active adapter's parameters."""
        params = self.pm.adapter_state_dict(self.pm.active_adapter)
        if set(tensors) != set(params):
            raise CheckpointError(f"{folder} holds another adapter than this run builds (another method or settings).")
        if self.config.fsdp:  # each process keeps its shard of the saved tensors
            from peftkit.train import fsdp

            fsdp.load_adapter_tensors(params, tensors)
            return
        with torch.no_grad():
            for key, param in params.items():
                param.copy_(tensors[key])

    def _result(self) -> TrainResult:
        trainable, total = self.pm.get_nb_trainable_parameters()
        majority = None
        if self.task == "classification" and self.dev_set:
            counts = torch.bincount(torch.tensor([e["labels"] for e in self.dev_set]), minlength=len(self.labels))
            majority = float(counts.max() / counts.sum())
        return TrainResult(
            self.out,
            self.task,
            main_process=self.main,
            trainable_params=trainable,
            total_params=total,
            labels=self.labels,
            majority=majority,
            lr=self.lr,
        )

    def _bars(self) -> bool:
        return self.main and self.config.progress

    def _say(self, text: str) -> None:
        if self.main:
            tqdm.write(text)


def _check_fsdp_settings(config: TrainConfig) -> None:
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


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def _as_python_state(state: Any) -> tuple:
    """random.setstate needs tuples; a saved state may come back with lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def train(
    config: TrainConfig, resume: bool = False, model: nn.Module | None = None, tokenizer: Any = None
) -> TrainResult:
    """Train ``config``'s method on its model and data; write the adapter, metrics and plot to its output_dir."""
    return Trainer(config, model=model, tokenizer=tokenizer).train(resume=resume)
