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

import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from peftkit.core.model import PeftModel, get_peft_model
from peftkit.core.registry import get_method
from peftkit.errors import ConfigError
from peftkit.train import checkpoint
from peftkit.train import data as D
from peftkit.train.config import TrainConfig
from peftkit.train.evaluation import evaluate
from peftkit.train.generation_eval import show_samples
from peftkit.train.losses import causal_lm_loss
from peftkit.train.metrics import HIGHER_IS_BETTER
from peftkit.train.models import TASK_TYPES, load_tokenizer
from peftkit.train.output_dir import clear_previous_run, writable_dir
from peftkit.train.result import MemoryMonitor, TrainResult, majority_share
from peftkit.train.setup import (
    best_metric,
    build_method_config,
    check_fsdp_method,
    check_fsdp_settings,
    checkpoint_activations,
    cpu_threads,
    default_lr,
    lr_lambda,
    optimizer_groups,
    prepare_base,
    train_in_float32,
)
from peftkit.train.trackers import LOG_DIR, RunLog, accelerate_tracker, fmt, interactive

__all__ = ["TrainResult", "Trainer", "build_method_config", "train"]


class Trainer:
    """One training run. ``Trainer(config).train()``; or pass a ready ``model`` and ``tokenizer``."""

    def __init__(self, config: TrainConfig, model: nn.Module | None = None, tokenizer: Any = None) -> None:
        from accelerate import Accelerator

        check_fsdp_settings(config)
        self.config = config
        self.out = Path(config.output_dir)
        tracker = accelerate_tracker(config.report_to)  # a missing package is an error before any loading
        self.acc = Accelerator(cpu=not torch.cuda.is_available(), log_with=tracker, project_dir=str(self.out / LOG_DIR))
        self.main = self.acc.is_main_process
        self._threads_before = torch.get_num_threads()  # restored when train() ends
        torch.set_num_threads(config.threads or cpu_threads(self.acc.num_processes))
        random.seed(config.seed)  # initialisation and dropout; the data order has its own seeded generator
        torch.manual_seed(config.seed)
        self.tokenizer = tokenizer or load_tokenizer(config.model)
        self._prepare_data()
        method_config = build_method_config(config.method, config.method_args, TASK_TYPES[self.task], config.model)
        self.method = get_method(method_config.peft_type)
        check_fsdp_method(config, self.method)
        base = prepare_base(config, self.task, self.labels, self.tokenizer, model, self._say)
        self.pm: PeftModel = get_peft_model(base, method_config)
        if config.dtype != "fp32":
            train_in_float32(self.pm)
        checkpoint_activations(base, config.gradient_checkpointing, self.task, self._say)
        self.pm.to(self.acc.device)
        if self.method.training.before_training:  # data-driven inits (LoRA's EVA), on up to 32 training batches
            self.method.training.before_training(self.pm, (self._batch(self.train_set, i) for i in self._epoch(0)[:32]))
        if config.fsdp:  # before the optimizer: sharding replaces the parameters
            from peftkit.train import fsdp

            fsdp.shard(self.pm)
        self.lr, why = (config.lr, "--lr") if config.lr else default_lr(self.method, self.task)
        self._say(f"lr {self.lr:.0e} ({why})")
        self.total_steps = self._total_steps()
        self.lr_factor = lr_lambda(int(config.warmup_ratio * self.total_steps), self.total_steps, config.schedule)
        self.stage_step = self._stage_step()
        self._build_optimizer(0)
        self._wrap_model()
        self.metric = best_metric(config.metric_for_best, self.task)
        self.state: dict[str, Any] = {
            "step": 0, "epoch": 0, "micro": 0, "best": None, "best_step": None, "bad": 0, "after_training_done": False
        }  # fmt: skip
        self.history: dict[str, list] = {"step": [], "train_loss": [], "lr": [], "eval_step": [], "eval": []}
        self.samples: dict[int, list[dict]] = {}  # step -> generated dev answers (--eval-generate)
        self.log = RunLog(self.acc, config, self.out, self._say)
        self.grad_norm, self.tokens, self.stop_reason = 0.0, 0, None

    # ---- setup -------------------------------------------------------------------------------------------
    def _prepare_data(self) -> None:
        data = D.prepare(self.config, self.tokenizer, self._say)
        self.columns, self.task, self.labels = data.columns, data.columns.task, data.labels
        self.train_set, self.dev_set = data.train, data.dev

    def _epoch(self, epoch: int) -> list[list[int]]:
        c = self.config
        lengths = D.lengths(self.train_set) if c.group_by_length else None
        return D.epoch_batches(
            len(self.train_set), c.batch_size, epoch, c.seed, self.acc.num_processes, self.acc.process_index, lengths
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
        groups = optimizer_groups(self.config, self.method, self.pm, self.lr)  # LoRA+, the method's or all at lr
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.config.weight_decay)
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

    # ---- evaluation (peftkit.train.evaluation) -----------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Dev metrics with the unwrapped model (every process computes the same numbers)."""
        return evaluate(self)

    def _record_eval(self, metrics: dict[str, float], final: bool = False) -> bool:
        """Store an evaluation; keep the best adapter (``final``: this one, whatever came before); True when early
        stopping says stop."""
        self.history["eval_step"].append(self.state["step"])
        self.history["eval"].append(metrics)
        self.log.evaluation(self.state["step"], metrics)
        value, best = metrics[self.metric], self.state["best"]
        better = final or best is None or (value > best if HIGHER_IS_BETTER[self.metric] else value < best)
        if better:
            self.state.update(best=value, best_step=self.state["step"], bad=0)
            self._save_adapter(self.out / "best")
        else:
            self.state["bad"] += 1
        patience = self.config.early_stopping_patience
        return patience is not None and self.state["bad"] >= patience

    # ---- checkpoints (peftkit.train.checkpoint) -----------------------------------------------------------
    def save_checkpoint(self) -> None:
        checkpoint.save_checkpoint(self)

    def load_checkpoint(self, folder: Path) -> None:
        checkpoint.load_checkpoint(self, folder)

    def latest_checkpoint(self) -> Path:
        return checkpoint.latest_checkpoint(self.out)

    def load_adapter_weights(self, folder: Path) -> None:
        """Copy the adapter saved in ``folder`` (a checkpoint, the best one) into this run's parameters."""
        checkpoint.load_adapter_weights(self, folder)

    # ---- training --------------------------------------------------------------------------------------------
    def _step(self, micro: list[list[int]]) -> float:
        """One optimizer step over ``micro`` micro-batches; returns the mean loss over every process."""
        self.model.train()
        total = torch.zeros((), device=self.acc.device)
        tokens = torch.zeros((), device=self.acc.device)
        for k, index in enumerate(micro):
            batch = self._batch(self.train_set, index)
            tokens += D.token_count(self.train_set, index)  # a packed batch's attention_mask is 4-D
            sync = k == len(micro) - 1
            skip_sync = not sync and not self.config.fsdp  # FSDP reduce-scatters every micro-batch's gradients
            with self._autocast(), self.acc.no_sync(self.model) if skip_sync else nullcontext():
                loss = self._task_loss(batch) + self.pm.auxiliary_loss()
                (loss / len(micro)).backward()
            total += loss.detach().float() / len(micro)
        # the norm before clipping, logged (no --max-grad-norm: an infinite bound measures without clipping)
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm or math.inf))
        self.optimizer.step()
        self.scheduler.step()
        if self.method.training.after_step:  # before the gradients go: AdaLoRA's allocation reads them
            self.method.training.after_step(self.pm, self.state["step"] + 1, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        self.tokens = int(self.acc.reduce(tokens, reduction="sum"))
        return float(self.acc.reduce(total, reduction="mean"))

    def _task_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A micro-batch's loss: the classifier's own, or peftkit.train.losses.causal_lm_loss (its one call site)."""
        if self.task == "causal_lm":
            return causal_lm_loss(self.model, batch)
        return self.model(**batch).loss

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
        self._start(resume)
        result = self._result()
        if not resume and self.config.eval_before:
            self._record_eval(self.evaluate())
        if self.history["eval_step"][:1] == [0]:
            result.before = self.history["eval"][0]
            self._say(f"dev before training: {fmt(result.before)}")
        start = self.loop_start = time.perf_counter()
        with MemoryMonitor(self.acc.device) as memory:
            self._loop()
        result.train_seconds = time.perf_counter() - start
        result.peak_memory_mb = memory.megabytes
        if self.method.training.after_training:
            # e.g. diff pruning's finalize: what it leaves is what is evaluated and saved
            self._after_training()
            self._record_eval(self.evaluate(), final=True)
        elif not self.history["eval_step"] or self.history["eval_step"][-1] != self.state["step"]:
            self._record_eval(self.evaluate())
        return self._finish(result)

    def _start(self, resume: bool) -> None:
        """Continue from the latest checkpoint, or clear what a previous run left; record the settings."""
        if self.main:
            writable_dir(self.out, "--output-dir")  # creates it
        if resume:
            self.load_checkpoint(self.latest_checkpoint())
        elif self.main:
            clear_previous_run(self.out)
        if self.main:
            self.config.save_yaml(self.out / "train_config.yaml")
        self.log.start(self.config.to_dict(), resume)

    def _loop(self) -> None:
        """Optimizer steps until the last one, until early stopping says stop, or until --max-minutes are spent."""
        step, method = self.state["step"], self.config.method
        bar = tqdm(total=self.total_steps, initial=step, desc=f"train {method}", disable=not self._bars())
        stop = False
        while self.state["step"] < self.total_steps and not stop:
            micro = self._next_micro()
            if micro is None:
                raise ConfigError("The training data yields no batch; lower --batch-size or add rows.")
            stop = self._after_step(self._step(micro), bar) or self._out_of_time()
        bar.close()

    def _out_of_time(self) -> bool:
        """--max-minutes: True once the budget is spent (every process decides on the mean of their clocks)."""
        if self.config.max_minutes is None or self.state["step"] >= self.total_steps:
            return False
        spent = self.acc.reduce(torch.tensor(time.perf_counter() - self.loop_start, device=self.acc.device), "mean")
        if float(spent) < 60 * self.config.max_minutes:
            return False
        self.stop_reason = f"time budget of {self.config.max_minutes:g} min spent at step {self.state['step']}"
        self._say(f"{self.stop_reason} of {self.total_steps}: evaluating and saving")
        return True

    def _after_step(self, loss: float, bar: tqdm) -> bool:
        """Record the step; stage change, evaluation and checkpoint when due. True when early stopping says stop."""
        c = self.config
        self.state["step"] += 1
        step = self.state["step"]
        self.history["step"].append(step)
        self.history["train_loss"].append(loss)
        self.history["lr"].append(self.scheduler.get_last_lr()[0])
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.history['lr'][-1]:.2e}")
        self.log.step(step, self.total_steps, loss, self.history["lr"][-1], self.grad_norm, self.tokens)
        self._change_stage(step)
        stop = False
        if c.eval_steps and step % c.eval_steps == 0 and step < self.total_steps:
            stop = self._record_eval(self.evaluate())
        if c.save_steps and step % c.save_steps == 0:
            self.save_checkpoint()
        return stop

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
        result.stop_reason = self.stop_reason
        result.samples = {"before": self.samples.get(0, []), "after": self.samples.get(best, [])}
        self.log.finish()
        self._save_adapter(self.out)
        if self.main:
            (self.out / "metrics.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
            from peftkit.train.plot import plot_curves

            plot_curves(self.history, self.out / "curves.png", self.metric)
            self._say(f"dev after training (step {result.best_step}): {fmt(result.after)}")
            if self.method.training.report:  # e.g. AdaLoRA's final rank per layer
                self._say(self.method.training.report(self.pm))
            if result.majority is not None:
                self._say(f"majority class: {result.majority:.4f}; output: {self.out}")
            if result.samples["after"]:
                self._say(show_samples(result.samples))
        self.acc.wait_for_everyone()
        return result

    def _save_adapter(self, folder: Path) -> None:
        """Rank 0 writes the adapter; under FSDP every process first gathers its shards (a collective call)."""
        if self.config.fsdp:
            from peftkit.train import fsdp

            fsdp.save_pretrained(self.pm, folder)
        elif self.main:
            self.pm.save_pretrained(folder)

    def _result(self) -> TrainResult:
        trainable, total = self.pm.get_nb_trainable_parameters()
        majority = majority_share(self.dev_set, len(self.labels)) if self.task == "classification" else None
        return TrainResult(self.out, self.task, main_process=self.main, trainable_params=trainable,
                           total_params=total, labels=self.labels, majority=majority, lr=self.lr)  # fmt: skip

    def _bars(self) -> bool:
        return self.main and interactive(self.config.progress)

    def _say(self, text: str) -> None:
        if self.main:
            tqdm.write(text)


def train(
    config: TrainConfig, resume: bool = False, model: nn.Module | None = None, tokenizer: Any = None
) -> TrainResult:
    """Train ``config``'s method on its model and data; write the adapter, metrics and plot to its output_dir."""
    return Trainer(config, model=model, tokenizer=tokenizer).train(resume=resume)
