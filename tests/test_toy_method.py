"""docs/architecture.md's checklist for adding a method, proven with a toy method defined in this file.

GAIN: a learned scalar per adapted Linear that rescales its output, h = (1 + s·g) (W x + b), g = 0 at init.
It is built from the public pieces only (a config dataclass, one AdapterLayer, a ``METHOD``), registered at test
time, and then has to pass the registry-wide contract (tests/test_contract.py), get its CLI flag generated from its
config field, train through ``peftkit train`` and save/load in peft's layout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

from peftkit.core.inject import inject_layers
from peftkit.core.layer import AdapterLayer
from peftkit.core.method import Method, Training
from peftkit.core.targeting import TargetingConfig, find_targets

TESTS = Path(__file__).resolve().parent


# ---- the toy method: what a new method file holds ---------------------------------------------------------
@dataclass(kw_only=True)
class GainConfig(TargetingConfig):
    peft_type: ClassVar[str] = "GAIN"

    gain_scale: float = field(default=1.0, metadata={"help": "s in h = (1 + s·g) (W x + b)."})


class GainLinear(AdapterLayer):
    """One scalar ``gain`` per adapter; merge multiplies W and b by (1 + s·g), unmerge divides (its inverse)."""

    adapter_param_names = ("gain",)
    adapter_other_names = ("scale",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.gain = nn.ParameterDict()
        self.scale: dict[str, float] = {}

    def update_layer(self, adapter_name: str, config: GainConfig, module_name: str) -> None:
        weight = self.get_base_layer().weight
        self.gain[adapter_name] = nn.Parameter(torch.zeros((), dtype=weight.dtype, device=weight.device))
        self.scale[adapter_name] = config.gain_scale

    def factor(self, adapter_name: str) -> torch.Tensor:
        return 1 + self.scale[adapter_name] * self.gain[adapter_name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)  # (B, T, out)
        if self.routing is not None and not self.disabled:
            out = out.clone()
            for name, rows in self.routed_groups(x.shape[0]):
                out[rows] = out[rows] * self.factor(name)
            return out
        for name in self.live_adapters():
            out = out * self.factor(name)
        return out

    @torch.no_grad()
    def merge(self, adapter_names: list[str]) -> None:
        base = self.get_base_layer()
        for name in adapter_names:
            for tensor in (base.weight, base.bias):
                if tensor is not None:
                    tensor.mul_(self.factor(name))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            for tensor in (base.weight, base.bias):
                if tensor is not None:
                    tensor.div_(self.factor(name))


def inject(model: nn.Module, config: GainConfig, adapter_name: str) -> None:
    targets = find_targets(model, config, lambda m: isinstance(m, nn.Linear), supported_label="nn.Linear")
    inject_layers(model, config, adapter_name, targets, lambda m: GainLinear if isinstance(m, nn.Linear) else None)


METHOD = Method(name="gain", config_class=GainConfig, inject=inject, training=Training(learning_rate=1e-2))


# ---- the checks ------------------------------------------------------------------------------------------------
@pytest.fixture
def gain_registered(monkeypatch):
    """The registry line and the contract case, made at test time (and removed after)."""
    from cases import CASES, TARGETS, TASKS, Case
    from peftkit.core.registry import register_method, unregister_method

    register_method("GAIN", __name__)
    monkeypatch.setitem(
        CASES, "GAIN", Case(lambda kind: GainConfig(target_modules=TARGETS[kind], task_type=TASKS[kind]))
    )
    yield
    unregister_method("GAIN")


CONTRACT = (
    "test_identity_at_init",
    "test_only_adapter_parameters_train",
    "test_save_load_round_trip",
    "test_merge_unmerge",
    "test_two_adapters_switch_and_disable",
    "test_per_row_adapter_names",
    "test_checkpoint_holds_exactly_the_trainable_tensors",
    "test_failed_load_adapter_leaves_the_model_unchanged",
)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_a_toy_method_passes_the_contract(gain_registered, kind, tmp_path):
    import test_contract

    from peftkit import method_names

    assert "GAIN" in method_names()
    for i, rule in enumerate(CONTRACT):
        args = (
            ("GAIN", kind, tmp_path / str(i))
            if "tmp_path" in getattr(test_contract, rule).__code__.co_varnames
            else ("GAIN", kind)
        )
        getattr(test_contract, rule)(*args)


def test_a_toy_method_saves_and_loads_in_peft_layout(gain_registered, tmp_path):
    from models import batch, build, clone, output, perturb
    from peftkit import PeftModel, get_peft_model

    base = build("bert")
    reference = clone(base)
    pm = get_peft_model(base, GainConfig(target_modules=["query", "value"], gain_scale=0.5)).eval()
    perturb(pm, "default", scale=0.5)
    pm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "GAIN" and config["gain_scale"] == 0.5
    loaded = PeftModel.from_pretrained(reference, tmp_path).eval()
    torch.testing.assert_close(output(loaded, batch("bert")), output(pm, batch("bert")), atol=1e-6, rtol=0)


def test_a_toy_method_trains_through_the_cli_with_its_generated_flag(tmp_path):
    """A fresh process registers GAIN before the CLI is imported: ``--gain-scale`` exists and reaches the config."""
    import tiny_runs as T

    model = T.bert_folder(tmp_path / "bert")
    data = T.write_csv(tmp_path / "sentiment.csv", T.sentiment_rows(60))
    out = tmp_path / "run"
    script = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
        "from peftkit.core.registry import register_method\n"
        "register_method('GAIN', 'test_toy_method')\n"
        "from peftkit.cli.main import main\n"
        "main(sys.argv[1:])\n"
    )
    args = ["train", "--method", "gain", "--gain-scale", "0.5", "--target-modules", "query,value", "--model", model,
            "--data", data, "--output-dir", out, "--max-steps", "3", "--batch-size", "8", "--threads", "1",
            "--no-progress"]  # fmt: skip
    helped = subprocess.run([sys.executable, "-c", script, "train", "--help"], capture_output=True, text=True)
    assert "--gain-scale" in helped.stdout, helped.stderr[-2000:]
    run = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "GAIN" and config["gain_scale"] == 0.5
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3
