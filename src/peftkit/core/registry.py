"""Method name -> method module. Adding a method is one file in ``methods/`` and one line here.

Each method module defines ``METHOD``, a :class:`peftkit.core.method.Method` describing its config class,
how it attaches to a model and whether it can merge.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from peftkit.errors import ConfigError, choices

if TYPE_CHECKING:
    from peftkit.core.config import PeftConfig
    from peftkit.core.method import Method

# peft_type (as written in adapter_config.json) -> module that defines METHOD
_METHODS: dict[str, str] = {
    "LORA": "peftkit.methods.lora",
    "BOTTLENECK": "peftkit.methods.bottleneck",
    "COMPACTER": "peftkit.methods.compacter",
    "PROMPT_TUNING": "peftkit.methods.prompt_tuning",
    "PREFIX_TUNING": "peftkit.methods.prefix_tuning",
    "IA3": "peftkit.methods.ia3",
    "BITFIT": "peftkit.methods.bitfit",
    "FREEZE": "peftkit.methods.freeze",
    "DIFF": "peftkit.methods.diff_pruning",
    "LN_TUNING": "peftkit.methods.ln_tuning",
    "TRAINABLE_TOKENS": "peftkit.methods.trainable_tokens",
    "VERA": "peftkit.methods.vera",
    "OFT": "peftkit.methods.oft",
    "LOHA": "peftkit.methods.loha",
    "LOKR": "peftkit.methods.lokr",
    "ADALORA": "peftkit.methods.adalora",
}
_BUILT_IN = frozenset(_METHODS)


def register_method(peft_type: str, module: str) -> None:
    """Register a method defined outside peftkit: ``module`` (an importable module name) defines ``METHOD``.

    The method then works everywhere a built-in one does (get_peft_model, checkpoints, the CLI's generated flags when
    registered before ``peftkit.cli`` is imported); docs/architecture.md has the checklist.
    """
    key = str(peft_type).upper()
    if not key or key in _METHODS:
        raise ConfigError(f"peft_type {peft_type!r} is empty or already registered ({choices(_METHODS)}).")
    _METHODS[key] = module


def unregister_method(peft_type: str) -> None:
    """Remove a method registered with :func:`register_method` (built-in methods stay)."""
    key = str(peft_type).upper()
    if key in _BUILT_IN or key not in _METHODS:
        raise ConfigError(f"{peft_type!r} is not a registered add-on method; registered: {choices(_METHODS)}.")
    del _METHODS[key]


def method_names() -> list[str]:
    """Every registered peft_type, in registration order."""
    return list(_METHODS)


def get_method(peft_type: str) -> Method:
    key = str(peft_type).upper()
    if key not in _METHODS:
        raise ConfigError(f"Unknown peft_type {peft_type!r}. Registered methods: {choices(_METHODS)}.")
    return importlib.import_module(_METHODS[key]).METHOD


def method_of(config: PeftConfig) -> Method:
    return get_method(config.peft_type)


def config_from_dict(data: dict) -> PeftConfig:
    """Build the right config class from a dict that carries ``peft_type`` (e.g. adapter_config.json)."""
    if "peft_type" not in data:
        raise ConfigError(
            f"adapter_config.json has no 'peft_type' (keys: {choices(data)}); "
            f"it should name the method, one of {choices(_METHODS)}."
        )
    return get_method(data["peft_type"]).config_class.from_dict(data)
