"""What a training run returns (TrainResult) and how its peak memory is measured (MemoryMonitor)."""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


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
    stop_reason: str | None = None  # why training stopped before its last step (--max-minutes)
    samples: dict[str, list] = field(default_factory=dict)  # --eval-generate: "before" / "after" dev answers

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["output_dir"] = str(self.output_dir)
        return out


def majority_share(dev: list[dict], num_labels: int) -> float | None:
    """The majority-class baseline: the share of the commonest class among the dev rows (None without rows)."""
    if not dev:
        return None
    counts = torch.bincount(torch.tensor([e["labels"] for e in dev]), minlength=num_labels)
    return float(counts.max() / counts.sum())


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
