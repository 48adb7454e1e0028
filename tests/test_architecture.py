"""docs/architecture.md's rules, checked on the source: what may import what, files that fit, typed method hooks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "peftkit"
MAX_LINES = 450

# package -> packages of peftkit it may import (errors and itself always allowed)
ALLOWED = {
    "core": {"core"},
    "methods": {"core", "methods"},
    "integrations": {"core", "methods", "integrations"},
    "train": {"core", "methods", "integrations", "train"},
    "serve": {"core", "methods", "integrations", "serve"},
    "cli": {"core", "methods", "integrations", "train", "serve", "cli"},
}
# a method may build on another method's public layer only where documented (Compacter is a bottleneck adapter
# whose projections are PHM layers; LoRA's trainable_token_indices uses trainable tokens' with_token_rows:
# docs/architecture.md)
METHOD_EXCEPTIONS = {("compacter", "bottleneck"), ("lora", "trainable")}
# transformers' input conventions (names of ids / masks / caches), which the input-hooking methods read
SHARED_MODULES = {"peftkit.integrations.hf_inputs"}


def sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def peftkit_imports(path: Path) -> list[str]:
    """Every ``peftkit.x.y`` module this file imports (module level and inside functions)."""
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in ("peftkit", "peftkit.methods", "peftkit.core", "peftkit.integrations"):
                names.extend(f"{node.module}.{alias.name}" for alias in node.names)  # a package's modules
            else:
                names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [n for n in names if n == "peftkit" or n.startswith("peftkit.")]


def owner(path: Path) -> tuple[str, str]:
    """(package, method or module family) of a source file: ('methods', 'lora') for methods/lora/layers.py."""
    parts = path.relative_to(SRC).parts
    if len(parts) == 1:
        return "", parts[0]
    return parts[0], Path(parts[1]).stem.split("_")[0] if parts[0] == "methods" else parts[1]


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_follow_the_layers(path):
    package, family = owner(path)
    if package not in ALLOWED:
        return  # the top-level __init__ and errors.py
    for name in peftkit_imports(path):
        parts = name.split(".")
        if len(parts) < 2 or parts[1] == "errors" or name in SHARED_MODULES:
            continue
        target = parts[1]
        assert target in ALLOWED[package], (
            f"{path.relative_to(SRC)} imports {name}: {package}/ may not import {target}/"
        )
        if package == "methods" and target == "methods" and len(parts) > 2:
            other = parts[2].split("_")[0]
            assert other == family or (family, other) in METHOD_EXCEPTIONS, (
                f"{path.relative_to(SRC)} imports {name}: a method may not import another method's internals; "
                "move the shared part to core/"
            )


def test_core_never_names_a_method():
    """core/ reaches methods only through the registry's module names, never by importing one."""
    for path in (SRC / "core").rglob("*.py"):
        assert not [n for n in peftkit_imports(path) if n.startswith("peftkit.methods")], path


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_files_fit_on_a_screen(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines; split it along its seams (<= {MAX_LINES})"


HOOK_PARAMS = ("peft_model", "host")


@pytest.mark.parametrize("path", sorted((SRC / "methods").rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_method_hooks_take_a_typed_host(path):
    """A hook's PeftModel parameter is typed with core.method.AdapterHost (not Any, not nn.Module)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef):
            continue
        for arg in node.args.args:
            if arg.arg in HOOK_PARAMS:
                annotation = ast.unparse(arg.annotation) if arg.annotation else None
                assert annotation == "AdapterHost", f"{path.name}:{node.lineno} {node.name}({arg.arg}: {annotation})"


def test_method_hooks_use_no_private_state():
    """Hooks use AdapterHost's public operations only: no ``peft_model._x`` anywhere in methods/."""
    for path in (SRC / "methods").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in HOOK_PARAMS
                and node.attr.startswith("_")
            ):
                pytest.fail(f"{path.name}:{node.lineno} reads {node.value.id}.{node.attr}")
