"""Saving and loading a PeftModel's adapters: peft's folder layout (adapter_config.json + adapter_model.safetensors,
the default adapter at the root, every other one in a sub-folder named after it) and the checks that keep a bad
checkpoint from being half-applied. :class:`peftkit.PeftModel` keeps thin methods that call these functions."""

from __future__ import annotations

import json
import math
import os
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from peftkit.core import hub, io, lifecycle
from peftkit.core.compose import COMPOSITION_FILE, Composition, composition_from_dict
from peftkit.core.config import CONFIG_NAME, PeftConfig
from peftkit.core.files import atomic_remove, atomic_write_bytes, atomic_writes, remove_stale_temporaries
from peftkit.core.layer import AdapterLayer
from peftkit.core.merge import adapter_layers
from peftkit.core.registry import config_from_dict, method_of
from peftkit.errors import AdapterNameError, CheckpointError, ConfigError, TargetNotFoundError

PROBE = "peftkit_size_probe"  # the adapter name check_sizes builds on the meta device
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # peft's names for layers whose base weight it saves

# PeftModel -> adapter name -> (base parameter, its value before the adapter's embedding copy was loaded)
_ORIGINALS: weakref.WeakKeyDictionary[nn.Module, dict[str, list[tuple[torch.Tensor, torch.Tensor]]]] = (
    weakref.WeakKeyDictionary()
)

if TYPE_CHECKING:
    from peftkit.core.model import PeftModel


# ---- writing ------------------------------------------------------------------------------------------------
def adapter_state_dict(host: PeftModel, adapter_name: str, for_file: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors under model-relative names (no adapter name); with ``for_file``, in the layout
    save_pretrained writes (``AdapterLayer.file_state_dict``: the same tensors for most methods)."""
    host.check_exists(adapter_name)
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(host.model):
        state = layer.file_state_dict(adapter_name) if for_file else layer.adapter_state_dict(adapter_name)
        out.update({k if k in layer.root_state_keys else f"{path}.{k}": v for k, v in state.items()})
    out.update(host._extra.get(adapter_name, {}))
    return out


def save_pretrained(
    host: PeftModel,
    save_directory: str | os.PathLike,
    selected_adapters: list[str] | None = None,
    safe_serialization: bool = True,
    save_embedding_layers: bool | str = "auto",
    is_main_process: bool = True,
    path_initial_model_for_weight_conversion: str | None = None,
) -> None:
    """Write each adapter as adapter_config.json + adapter_model.safetensors (peft's layout and keys) and a README.md
    model card (unless one exists), all or nothing: a failure at any step leaves the folder as it was.

    Options as in peft: ``selected_adapters`` (default: all), ``save_embedding_layers`` (True / "auto": also the
    base weights of targeted embedding layers, "auto" when ``embed_tokens`` / ``lm_head`` is targeted), and
    ``is_main_process=False`` writes nothing (the other ranks of a distributed run)."""
    if not safe_serialization:
        raise CheckpointError(
            "safe_serialization=False asks for adapter_model.bin, a pickle; peftkit never writes pickle (loading one "
            "can run arbitrary code). Leave safe_serialization=True: peft and transformers read the safetensors file."
        )
    initial = _initial_adapter(host, path_initial_model_for_weight_conversion)
    if save_embedding_layers not in (True, False, "auto"):
        raise ConfigError(f"save_embedding_layers={save_embedding_layers!r}; use True, False or 'auto'.")
    names = _selected(host, selected_adapters)
    if not is_main_process:
        return
    root = io.check_save_directory(save_directory)
    for folder in {root, *(io.adapter_dir(root, n) for n in names)}:
        remove_stale_temporaries(folder)
    _write(host, root, names, save_embedding_layers, initial)


def _initial_adapter(host: PeftModel, path: str | os.PathLike | None) -> tuple[PeftConfig, dict] | None:
    """The adapter saved right after initialisation (PiSSA / OLoRA), for its method's ``weight_conversion``."""
    if path is None:
        return None
    config, tensors = read_checkpoint(path, is_trainable=False)
    if method_of(config).weight_conversion is None:
        raise ConfigError(f"path_initial_model_for_weight_conversion: a {config.peft_type} adapter has no conversion.")
    return config, tensors


def _selected(host: PeftModel, selected_adapters: list[str] | str | None) -> list[str]:
    if selected_adapters is None:
        return list(host.peft_config)
    names = [selected_adapters] if isinstance(selected_adapters, str) else list(selected_adapters)
    for name in names:
        host.check_exists(name)
    return names


@atomic_writes()
def _write(host: PeftModel, root: Path, names: list[str], save_embedding_layers: bool | str, initial=None) -> None:
    """Every file of the save as one group (core/files.py): all are written to temporaries, then all renamed."""
    for name in names:
        folder = io.adapter_dir(root, name)
        tensors = host.adapter_state_dict(name, for_file=True)
        tensors.update(embedding_copies(host, name, save_embedding_layers))
        config = host.peft_config[name].replace(inference_mode=True)
        if initial is not None:  # PiSSA / OLoRA -> an adapter for the original base weights
            tensors, config = method_of(config).weight_conversion(config, tensors, initial[1])
        io.save_tensors(io.to_file_keys(tensors), folder)
        config.save_pretrained(folder)
        if not (folder / io.CARD_NAME).exists():
            atomic_write_bytes(folder / io.CARD_NAME, io.model_card(name, config).encode())
    block_path = root / COMPOSITION_FILE
    composition = host._composition
    if composition is not None and set(composition.adapters()) <= set(names):
        text = json.dumps({"active": composition.to_dict()}, indent=2) + "\n"
        atomic_write_bytes(block_path, text.encode())
    elif block_path.is_file():  # a block saved earlier in this folder no longer describes it
        atomic_remove(block_path)


def embedding_copies(host: PeftModel, adapter_name: str, save_embedding_layers: bool | str) -> dict[str, torch.Tensor]:
    """``<layer>.base_layer.<param>`` of the embedding layers this adapter wraps, as peft's save_embedding_layers=True
    writes them (for a resized or trained vocabulary). "auto" and False write none: peftkit's checkpoint holds only
    the adapter's own tensors (unlike peft's "auto", which adds them when ``embed_tokens`` is targeted)."""
    if save_embedding_layers is not True:
        return {}
    return {
        f"{path}.base_layer.{key}": value
        for path, layer in adapter_layers(host.model)
        if adapter_name in layer.adapter_names and _is_embedding(path, layer)
        for key, value in layer.base_layer.state_dict().items()
    }


def _is_embedding(path: str, layer: nn.Module) -> bool:
    """Where peft writes and reads base-weight copies: ``embed_tokens`` / ``lm_head`` (EMBEDDING_LAYER_NAMES) or an
    nn.Embedding."""
    return path.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES or isinstance(layer.base_layer, nn.Embedding)


# ---- reading ------------------------------------------------------------------------------------------------
class LoadResult(NamedTuple):
    """What load_adapter returns, as peft's (torch's ``_IncompatibleKeys``). A checkpoint that does not fit is
    refused with a CheckpointError, so both lists are empty whenever a load returns."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def load_adapter(
    host: PeftModel,
    model_id: str | os.PathLike,
    adapter_name: str,
    is_trainable: bool = False,
    allow_non_finite: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Load a saved adapter under ``adapter_name`` (frozen unless ``is_trainable``; NaN / inf values refused unless
    ``allow_non_finite``; ``low_cpu_mem_usage`` accepted for peft's API). On any problem the model is left as it
    was. Returns ``missing_keys`` / ``unexpected_keys`` as peft's."""
    adapter_name = io.check_adapter_name(adapter_name)
    if adapter_name in host.peft_config:
        raise AdapterNameError(f"An adapter named {adapter_name!r} already exists; pick another name.")
    model_id = hub.adapter_folder(model_id)  # a Hub id: its snapshot in huggingface_hub's cache
    config, tensors = read_checkpoint(model_id, is_trainable)
    check_sizes(host, config, model_id)
    try:
        host.add_adapter(adapter_name, config)
    except TargetNotFoundError as err:
        raise CheckpointError(f"The adapter in {str(model_id)!r} does not fit this model: {err}") from err
    try:
        load_state(host, adapter_name, tensors, model_id, allow_non_finite)
    except Exception:
        host.delete_adapter(adapter_name)
        raise
    return LoadResult([], [])


def check_sizes(host: PeftModel, config: PeftConfig, model_id: str | os.PathLike) -> None:
    """Before the adapter is built for real: build it on the meta device (no memory) and compare its tensors with
    the safetensors header, so a config asking for far more than the file holds (a huge ``r``) is refused before
    it allocates. A probe that cannot run on meta is skipped (the real load still checks every tensor)."""
    try:
        with torch.device("meta"):
            host.add_adapter(PROBE, config)
    except Exception:
        return
    try:
        _compare_sizes(host, PROBE, model_id)
    finally:
        host.delete_adapter(PROBE)


def check_sizes_new(cls: type[PeftModel], model: nn.Module, config: PeftConfig, model_id: str | os.PathLike) -> None:
    """:func:`check_sizes` for from_pretrained, where no PeftModel exists yet: a probe one, unloaded after."""
    try:
        with torch.device("meta"):
            probe = cls(model, config, PROBE)
    except Exception:
        return
    try:
        _compare_sizes(probe, PROBE, model_id)
    finally:
        probe.unload()


def _same_layout_shapes(host: PeftModel, adapter_name: str) -> dict[str, tuple[int, ...]]:
    """The adapter's tensor shapes, leaving out layers whose checkpoint layout differs from the live one (their
    ``load_file_state`` converts: diff pruning's sparse support, sized by the file); the full check covers those."""
    converting = [
        f"{path}."
        for path, layer in adapter_layers(host.model)
        if adapter_name in layer.adapter_names and type(layer).load_file_state is not AdapterLayer.load_file_state
    ]
    state = host.adapter_state_dict(adapter_name)
    return {k: tuple(v.shape) for k, v in state.items() if not any(k.startswith(p) for p in converting)}


def _compare_sizes(host: PeftModel, adapter_name: str, model_id: str | os.PathLike) -> None:
    shapes = io.file_shapes(model_id)
    own = _same_layout_shapes(host, adapter_name)
    base = sum(p.numel() for p in host.model.parameters() if p.device.type != "meta")
    wrong = [f"{k}: file {shapes[k]} vs model {own[k]}" for k in sorted(own) if k in shapes and shapes[k] != own[k]]
    needed, stored = sum(math.prod(s) for s in own.values()), sum(math.prod(s) for s in shapes.values())
    if wrong or needed > stored + base:
        what = f"tensors {len(wrong)} with a wrong shape (e.g. {', '.join(wrong[:3])})"
        if not wrong:
            what = f"its adapter_config.json describes {needed:,} values, the file holds {stored:,}"
        raise CheckpointError(
            f"The checkpoint {str(model_id)!r} does not fit this model: {what}. Its config and tensors do not belong "
            "together (checked before allocating the adapter); load it onto the model it was saved from."
        )


def base_copies(
    host: PeftModel, adapter_name: str, tensors: dict[str, torch.Tensor], own: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """File tensors ``<layer>.base_layer.<param>`` that are copies of a base weight this adapter wraps, mapped to
    that base parameter. Accepted only where peft writes them (``save_embedding_layers``: a targeted, possibly
    resized, embedding); anywhere else they would overwrite base weights, so they are refused. Layers holding
    merged adapters are left out."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in adapter_layers(host.model):
        if adapter_name not in layer.adapter_names or layer.merged_adapters:
            continue
        for key in (k for k in tensors if k.startswith(f"{path}.base_layer.") and k not in own):
            if not _is_embedding(path, layer):
                raise CheckpointError(
                    f"The checkpoint holds {key!r}, a copy of the base weight of {path!r}, which is not an embedding "
                    f"layer (peft writes such copies only for {', '.join(EMBEDDING_LAYER_NAMES)} / nn.Embedding). "
                    "Loading it would overwrite the base model's weights; remove the key from the file."
                )
            try:
                out[key] = layer.get_parameter(key[len(path) + 1 :])
            except AttributeError:
                continue
    return out


def restore_base_copies(host: PeftModel, adapter_name: str | None = None) -> None:
    """Put back the base weights that loading ``adapter_name``'s embedding copies replaced (all adapters: None);
    delete_adapter and unload call this."""
    saved = _ORIGINALS.get(host, {})
    for name in [adapter_name] if adapter_name is not None else list(saved):
        with torch.no_grad():
            for param, original in reversed(saved.pop(name, [])):
                param.copy_(original)


def from_file_layout(host: PeftModel, adapter_name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> the live layout, layer by layer (``AdapterLayer.load_file_state``); each key goes
    to the innermost layer holding this adapter whose path prefixes it."""
    layers = {path: layer for path, layer in adapter_layers(host.model) if adapter_name in layer.adapter_names}
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        owner = max((p for p in layers if key.startswith(p + ".")), key=len, default=None)
        if owner is None:
            out[key] = value
        else:
            groups.setdefault(owner, {})[key[len(owner) + 1 :]] = value
    for path, group in groups.items():
        out.update({f"{path}.{k}": v for k, v in layers[path].load_file_state(adapter_name, group).items()})
    return out


def load_state(
    host: PeftModel, adapter_name: str, tensors: dict[str, torch.Tensor], source: Any, allow_non_finite: bool = False
) -> None:
    """Check the file's tensors against the adapter (names, shapes, dtypes, finite values: all problems at once),
    then copy them in; base weights replaced by embedding copies are kept for :func:`restore_base_copies`."""
    tensors = from_file_layout(host, adapter_name, tensors)
    own = host.adapter_state_dict(adapter_name)
    copies = base_copies(host, adapter_name, tensors, own)
    expected = {**copies, **own}
    _check_fit(tensors, own, expected, source)
    _check_values(tensors, expected, source, allow_non_finite)
    with torch.no_grad():
        if copies:
            _ORIGINALS.setdefault(host, {}).setdefault(adapter_name, []).extend(
                (p, p.detach().clone()) for p in copies.values()
            )
        for key, param in expected.items():
            param.copy_(tensors[key].to(dtype=param.dtype, device=param.device))


def _check_fit(tensors: dict[str, torch.Tensor], own: dict, expected: dict, source: Any) -> None:
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{len(items)} {what} (e.g. {', '.join(items[:3])})"
            for items, what in ((missing, "missing"), (unexpected, "unexpected"), (wrong, "with a wrong shape"))
            if items
        ]
        raise CheckpointError(
            f"The checkpoint {str(source)!r} does not fit this model: tensors " + "; ".join(parts) + ". "
            "It was probably saved for another base model or config; load it onto the model it was trained on."
        )


def _check_values(tensors: dict[str, torch.Tensor], expected: dict, source: Any, allow_non_finite: bool) -> None:
    """A float parameter takes float values only (no int8 / bool, which would be cast silently), an integer
    buffer (diff pruning's indices) integers; NaN / inf are refused unless ``allow_non_finite``."""
    kinds, bad = [], []
    for key, param in expected.items():
        value = tensors[key]
        if value.is_floating_point() != param.is_floating_point() or value.dtype == torch.bool != param.dtype:
            kinds.append(f"{key}: {value.dtype} for a {param.dtype} tensor")
        elif value.is_floating_point() and not allow_non_finite and not bool(torch.isfinite(value).all()):
            bad.append(key)
    if kinds or bad:
        parts = [f"wrong dtypes ({'; '.join(kinds[:3])})"] if kinds else []
        parts += [f"NaN or inf values in {len(bad)} tensors (e.g. {', '.join(bad[:3])})"] if bad else []
        raise CheckpointError(
            f"The checkpoint {str(source)!r} holds " + " and ".join(parts) + ". It is corrupt or was saved from a "
            "diverged run; save it again (pass allow_non_finite=True to load non-finite values anyway)."
        )


def from_pretrained(
    cls: type[PeftModel],
    model: nn.Module,
    model_id: str | os.PathLike,
    adapter_name: str,
    is_trainable: bool,
    config: PeftConfig | None,
    allow_non_finite: bool = False,
) -> PeftModel:
    """Wrap ``model`` with the adapter saved in ``model_id``; on failure ``model`` is left untouched."""
    adapter_name = io.check_adapter_name(adapter_name)
    root = model_id = hub.adapter_folder(model_id)  # a Hub id: its snapshot in huggingface_hub's cache
    model_id, adapter_name = composition_entry(model_id, adapter_name)
    file_config, tensors = read_checkpoint(model_id, is_trainable)
    config = config or file_config
    flags = lifecycle.grad_flags(model)
    try:
        check_sizes_new(cls, model, config, model_id)
        try:
            peft_model = cls(model, config, adapter_name)
        except TargetNotFoundError as err:
            raise CheckpointError(f"The adapter in {str(model_id)!r} does not fit this model: {err}") from err
        try:
            load_state(peft_model, adapter_name, tensors, model_id, allow_non_finite)
            restore_composition(peft_model, root, is_trainable)
        except Exception:
            peft_model.unload()
            raise
    except Exception:
        lifecycle.restore_grad_flags(model, flags)
        raise
    return peft_model


def restore_composition(host: PeftModel, model_id: str | os.PathLike, is_trainable: bool) -> None:
    """Load the adapters a saved composition names (each from its sub-folder) and activate it."""
    block = read_composition(model_id)
    if block is None:
        return
    for name in block.adapters():
        if name not in host.peft_config:
            host.load_adapter(io.adapter_dir(model_id, name), name, is_trainable=is_trainable)
    host.set_adapter(block)


def read_composition(model_id: str | os.PathLike) -> Composition | None:
    """The composition block saved in a checkpoint folder, or None."""
    path = Path(model_id) / COMPOSITION_FILE
    if not path.is_file():
        return None
    try:
        return composition_from_dict(json.loads(path.read_text())["active"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is not a valid composition file ({err!r}); it is corrupt.") from err


def composition_entry(model_id: str | os.PathLike, adapter_name: str) -> tuple[str | os.PathLike, str]:
    """A checkpoint whose root holds a composition but no adapter of its own starts from the block's first adapter."""
    block = None if (Path(model_id) / CONFIG_NAME).is_file() else read_composition(model_id)
    if block is None:
        return model_id, adapter_name
    first = block.adapters()[0]
    return io.adapter_dir(model_id, first), first


def read_checkpoint(model_id: str | os.PathLike, is_trainable: bool) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """The config and the tensors (model-relative names) of the adapter saved in folder ``model_id``."""
    folder = Path(model_id)
    if not folder.is_dir():
        raise CheckpointError(
            f"{str(model_id)!r} is not a folder. peftkit loads adapters from local folders written by "
            "save_pretrained (adapter_config.json + adapter_model.safetensors)."
        )
    config = config_from_dict(PeftConfig.read_dict(folder))
    config.inference_mode = not is_trainable
    return config, io.from_file_keys(io.load_tensors(folder))
