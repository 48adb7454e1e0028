"""Which adapters the server knows, which are in memory, and the rules for loading new ones at run time.

A *known* adapter has a name and a folder (given on the command line, or posted to ``/v1/adapters``); a *resident*
one is also loaded on the PeftModel. At most ``max_loaded`` stay resident: loading one more evicts the least
recently used adapter that no running request holds, and a request for an evicted adapter loads it again from its
folder. All methods here run on the engine's thread, between decoding steps, so a forward pass never sees an
adapter half loaded or half deleted.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

from peftkit.core import io
from peftkit.core.config import CONFIG_NAME, PeftConfig
from peftkit.core.layer import BASE
from peftkit.core.model import PeftModel
from peftkit.core.registry import config_from_dict, get_method
from peftkit.errors import AdapterNameError, AdapterNotFoundError, CheckpointError, PeftkitError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class AdapterBusyError(PeftkitError, RuntimeError):
    """An adapter that running requests still use (it cannot be unloaded, or evicted to make room)."""


class AdapterPathError(PeftkitError, PermissionError):
    """An adapter folder outside the allowed root, or runtime loading switched off."""


def check_name(name: object, reserved: set[str]) -> str:
    """A served adapter name: letters, digits, '_' and '-' (at most 64, no path separators, no '.'), not reserved."""
    if not isinstance(name, str) or not NAME.match(name) or name in reserved:
        raise AdapterNameError(
            f"Invalid adapter name {name!r}: use 1-64 letters, digits, '_' or '-', starting with a letter or digit "
            f"(no '/', '.' or '..'), and none of the reserved names {sorted(reserved)}. Example: 'support-bot'."
        )
    return io.check_adapter_name(name)


def inside_root(path: str | Path, root: Path | None) -> Path:
    """``path`` (relative ones from ``root``) with symbolic links resolved, refused unless it lies inside ``root``."""
    if root is None:
        raise AdapterPathError(
            "Loading adapters at run time is switched off; start the server with --adapter-root DIR to allow "
            "folders inside DIR, or name the adapters on the command line with --adapter NAME=PATH."
        )
    root = root.resolve()
    resolved = (root / Path(path)).resolve()
    if resolved != root and root not in resolved.parents:
        raise AdapterPathError(
            f"Adapter path {str(path)!r} resolves to {str(resolved)!r}, outside the allowed root {str(root)!r}; "
            "put the adapter folder inside the root and pass its path relative to it."
        )
    return resolved


def check_servable(folder: Path) -> None:
    """Refuse folders without an adapter, and methods that rewrite the inputs (prompt / prefix tuning): their
    virtual tokens change every row's length and cache, which per-row continuous batching does not model."""
    if not (folder / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"Adapter folder {str(folder)!r} holds no {CONFIG_NAME}; pass a folder written by save_pretrained "
            "(peftkit or Hugging Face peft)."
        )
    config = config_from_dict(PeftConfig.read_dict(folder))
    method = get_method(config.peft_type)
    if method.prepare_inputs is not None:
        raise CheckpointError(
            f"Adapter {str(folder)!r} is a {method.name} adapter, which hooks the model's inputs; the server batches "
            "adapters that wrap layers (LoRA and its variants, (IA)3, bottleneck adapters...). Merge or serve it alone."
        )


class AdapterRegistry:
    """Known adapters (name -> folder) and the resident ones, least recently used first."""

    def __init__(self, base: Any, max_loaded: int, root: Path | None, base_name: str) -> None:
        self.base = base  # the plain model, until the first adapter wraps it
        self.model: PeftModel | None = None
        self.max_loaded = max(1, max_loaded)
        self.root = root
        self.base_name = base_name
        self.known: dict[str, Path] = {}
        self.resident: OrderedDict[str, None] = OrderedDict()
        self.in_use: dict[str, int] = {}

    @property
    def reserved(self) -> set[str]:
        return {BASE, self.base_name}

    def names(self) -> list[str]:
        return sorted(self.known)

    def route_name(self, model_field: str) -> str:
        """The per-row adapter name for a request's ``model`` field: BASE for the base model, else a known adapter."""
        if model_field == self.base_name:
            return BASE
        if model_field in self.known:
            return model_field
        raise AdapterNotFoundError(
            f"Unknown model {model_field!r}; this server has {', '.join(repr(n) for n in self.all_models())}. "
            "GET /v1/models lists them; POST /v1/adapters loads another one."
        )

    def all_models(self) -> list[str]:
        return [self.base_name, *self.names()]

    def add(self, name: str, path: str | Path, from_request: bool = True) -> None:
        """Register (and load) ``name`` from ``path``; requests may only name folders inside the allowed root."""
        name = check_name(name, self.reserved)
        if name in self.known:
            raise AdapterNameError(f"Adapter {name!r} is already loaded; DELETE /v1/adapters/{name} first.")
        folder = inside_root(path, self.root) if from_request else Path(path).resolve()
        check_servable(folder)
        self.known[name] = folder
        try:
            self.ensure_resident(name)
        except Exception:
            del self.known[name]
            raise

    def remove(self, name: str) -> None:
        if name not in self.known:
            raise AdapterNotFoundError(f"No adapter {name!r} to unload; loaded: {self.names()}.")
        if self.in_use.get(name):
            raise AdapterBusyError(f"Adapter {name!r} serves {self.in_use[name]} running requests; retry when done.")
        self._unload(name)
        del self.known[name]

    def ensure_resident(self, name: str) -> bool:
        """Load ``name`` if it is not in memory (evicting the least recently used idle adapter when full); mark it
        recently used. False when every resident adapter is busy and there is no room: the caller waits."""
        if name == BASE:
            return True
        if name in self.resident:
            self.resident.move_to_end(name)
            return True
        while len(self.resident) >= self.max_loaded:
            idle = next((n for n in self.resident if not self.in_use.get(n)), None)
            if idle is None:
                return False
            self._unload(idle)
        if self.model is None:
            self.model = PeftModel.from_pretrained(self.base, self.known[name], adapter_name=name)
        else:
            self.model.load_adapter(self.known[name], adapter_name=name)
        self.model.eval()
        self.resident[name] = None
        return True

    def runner(self) -> tuple[Any, bool]:
        """(the module to call, whether it takes per-row ``adapter_names``)."""
        return (self.base, False) if self.model is None else (self.model, True)

    def activate(self, name: str) -> None:
        """Make resident adapter ``name`` the active one (for a batch whose rows all use it)."""
        if self.model is not None and self.model.active_adapters != [name]:
            self.model.set_adapter(name)

    def acquire(self, name: str) -> None:
        self.in_use[name] = self.in_use.get(name, 0) + 1

    def release(self, name: str) -> None:
        self.in_use[name] = self.in_use.get(name, 1) - 1

    def _unload(self, name: str) -> None:
        if name in self.resident:
            self.model.delete_adapter(name)
            del self.resident[name]


def describe(registry: AdapterRegistry, created: int) -> list[dict[str, Any]]:
    """``/v1/models``'s entries: the base model, then every known adapter (``parent`` names the base)."""
    base = {"id": registry.base_name, "object": "model", "created": created, "owned_by": "peftkit"}
    adapters = [
        {"id": n, "object": "model", "created": created, "owned_by": "peftkit", "parent": registry.base_name,
         "resident": n in registry.resident}
        for n in registry.names()
    ]  # fmt: skip
    return [base, *adapters]
