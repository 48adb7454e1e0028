"""The package outside bootstrap (issue 16 item 6): ``pip install peftkit`` without extras imports and works from
Python; the `peftkit` console script names the missing extra instead of ending in a ModuleNotFoundError; the README
gives the pip lines beside the two bootstrap commands.

"Not installed" is simulated in a fresh process: a ``sitecustomize`` module (imported by Python at start-up) puts a
meta-path finder first that raises ModuleNotFoundError for the blocked top-level modules, as if their packages were
absent, even though the test environment has them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from peftkit.cli.main import EXTRA_MODULES, extra_of, missing_extra_message

ROOT = Path(__file__).resolve().parents[1]
# What the extras bring and the core must not import (pyproject.toml: hf, train, diffusers, models, dev).
EXTRAS_ONLY = ["transformers", "accelerate", "huggingface_hub", "tokenizers", "yaml", "typer", "click", "datasets"]
EXTRAS_ONLY += ["sklearn", "matplotlib", "diffusers", "gguf", "peft", "pytest", "hypothesis"]

BLOCKER = """
import importlib.abc
import sys

BLOCKED = set({blocked!r})


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
"""


def without(tmp_path: Path, blocked: list[str], command: list[str]) -> subprocess.CompletedProcess:
    """Run ``command`` in a fresh process in which the ``blocked`` modules cannot be imported."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted(blocked)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)


USE_WITHOUT_EXTRAS = """
import sys
import torch
from torch import nn

import peftkit
from peftkit import LoraConfig, PeftModel, get_peft_model

leaked = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1].split(",")))
assert not leaked, leaked
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
pm = get_peft_model(model, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
x = torch.randn(3, 8)
expected = pm(x)
pm.save_pretrained("adapter")
torch.manual_seed(0)
again = PeftModel.from_pretrained(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), "adapter")
assert torch.allclose(again(x), expected), "round trip"
merged = again.merge_and_unload()
assert torch.allclose(merged(x), expected, atol=1e-6), "merge"
print("works:", len(peftkit.method_names()), "methods")
"""


def test_import_peftkit_and_use_it_without_any_extra(tmp_path: Path) -> None:
    done = without(tmp_path, EXTRAS_ONLY, [sys.executable, "-c", USE_WITHOUT_EXTRAS, ",".join(EXTRAS_ONLY)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "works:" in done.stdout


def test_the_blocker_really_blocks(tmp_path: Path) -> None:
    """The simulation itself: a blocked module cannot be imported (else the test above proves nothing)."""
    done = without(tmp_path, ["typer"], [sys.executable, "-c", "import typer"])
    assert done.returncode == 1 and "ModuleNotFoundError: No module named 'typer'" in done.stderr


@pytest.mark.parametrize("blocked", ["typer", "yaml"])
def test_the_console_script_names_the_missing_extra(tmp_path: Path, blocked: str) -> None:
    """typer is needed to start at all; pyyaml when a command reads YAML (``--config run.yaml``)."""
    script = Path(sys.executable).with_name("peftkit")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "peftkit.cli.main"]
    (tmp_path / "run.yaml").write_text("max_steps: 1\n")
    done = without(tmp_path, [blocked], [*command, "train", "--config", "run.yaml"])
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip() == (
        f"Error: this command needs the 'train' extra of peftkit (module {blocked!r} is not installed). "
        "Install it with: pip install 'peftkit[train]'"
    )


def test_a_command_without_transformers_names_the_hf_extra(tmp_path: Path) -> None:
    """The command line itself starts without transformers (--help works); a command that loads a model names
    the hf extra; with typer missing too, both extras are named in one pip line."""
    assert without(tmp_path, ["transformers"], [sys.executable, "-m", "peftkit.cli.main", "--help"]).returncode == 0
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"architectures": ["BertForSequenceClassification"]}')
    done = without(tmp_path, ["transformers"], [sys.executable, "-m", "peftkit.cli.main", "inspect", "model"])
    assert done.returncode == 1, done.stderr[-3000:]
    assert "module 'transformers' is not installed" in done.stderr and "pip install 'peftkit[hf]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_with_typer_and_transformers_missing_one_pip_line_names_both(tmp_path: Path) -> None:
    both = without(tmp_path, ["transformers", "typer"], [sys.executable, "-m", "peftkit.cli.main", "--help"])
    assert "pip install 'peftkit[hf,train]'" in both.stderr


def test_a_module_no_extra_brings_is_a_real_error() -> None:
    assert extra_of("yaml") == "train" and extra_of("transformers.models.bert") == "hf"
    assert missing_extra_message(ModuleNotFoundError("No module named 'peftkit_typo'", name="peftkit_typo")) is None


def test_the_extras_named_exist_and_the_core_needs_four_packages() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert [d.split(">")[0].split("=")[0] for d in project["dependencies"]] == ["torch", "safetensors", "numpy", "tqdm"]
    assert set(EXTRA_MODULES) <= set(project["optional-dependencies"])
    train = " ".join(project["optional-dependencies"]["train"])
    assert "typer" in train and "pyyaml" in train


def test_the_readme_gives_the_pip_lines_after_the_two_commands() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[:4] == [
        "```bash",
        "python3 scripts/bootstrap.py demo    # sets up .venv from nothing and runs the main job (peftkit train)",
        "python3 scripts/bootstrap.py test    # sets up .venv and runs the test suite (CI's .ci/run calls this)",
        "```",
    ]
    head = "\n".join(lines[4:20])
    assert "pip install" in head and "[hf,train]" in head
