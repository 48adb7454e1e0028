"""Training: the loop (on accelerate), data loading and metrics; the Python API behind ``peftkit train``."""

from peftkit.train.config import DEMO, TrainConfig
from peftkit.train.result import TrainResult
from peftkit.train.setup import build_method_config
from peftkit.train.trainer import Trainer, train

__all__ = ["DEMO", "TrainConfig", "TrainResult", "Trainer", "build_method_config", "train"]
