"""Command-line options generated from dataclasses: TrainConfig's fields and every registered method's config.

A command declares ordinary typer parameters and is then given extra keyword-only parameters through its
``__signature__`` (typer reads signatures), so a new method's fields appear as flags without CLI edits:

- training flags: one per TrainConfig field, typed, default None (unset: the YAML file or the default holds);
- method flags: one per method config field (``--r``, ``--lora-alpha``, ``--target-modules``), given as text and
  parsed by the field's type when the chosen method is known. A field two methods share is one flag.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union, get_type_hints

import typer

from peftkit.core.config import PeftConfig
from peftkit.core.registry import get_method, method_names
from peftkit.errors import ConfigError, choices
from peftkit.train.config import DEMO, TrainConfig, flag

# Fields set by the trainer or meaningless on the command line.
HIDDEN_METHOD_FIELDS = {"task_type", "base_model_name_or_path", "revision", "inference_mode"}
TRAIN_PANEL = "Training"
METHOD_PANEL = "Method settings (apply to the methods named in [brackets])"


@dataclass
class MethodFlag:
    param: str  # python parameter name in the generated signature
    field: str  # config field name
    flag: str  # --flag
    methods: list[str]  # lower-case method names that have this field
    help: str


def method_configs() -> dict[str, type[PeftConfig]]:
    return {name.lower(): get_method(name).config_class for name in method_names()}


def method_flags() -> list[MethodFlag]:
    """One flag per distinct method config field (over every registered method)."""
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, MethodFlag] = {}
    for method, cls in method_configs().items():
        for f in dataclasses.fields(cls):
            if f.name in HIDDEN_METHOD_FIELDS:
                continue
            if f.name in out:
                out[f.name].methods.append(method)
                continue
            name = f.name if f.name not in train_names else f"{method}_{f.name}"
            out[f.name] = MethodFlag(f"m_{name}", f.name, f"--{flag(name)}", [method], f.metadata.get("help", ""))
    return list(out.values())


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    return repr(f.default_factory()) if f.default_factory is not dataclasses.MISSING else "-"


def train_parameters(exclude: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """Keyword-only parameters ``--field-name`` for TrainConfig's fields (default None = not given)."""
    hints = get_type_hints(TrainConfig)
    params = []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "method_args" or f.name in exclude:
            continue
        base = _plain_type(hints[f.name])
        text = f.metadata.get("help", "")
        demo = f" (demo: {DEMO[f.name]!r})" if f.name in DEMO else ""
        default = "" if "default:" in text else f" (default: {_default_text(f)}{demo})"  # said in words already
        option = typer.Option(
            None,
            f"--{flag(f.name)}/--no-{flag(f.name)}" if base is bool else f"--{flag(f.name)}",
            help=f"{text}{default or demo}",
            rich_help_panel=TRAIN_PANEL,
            show_default=False,
        )
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=base | None))
    return params


def method_parameters() -> list[inspect.Parameter]:
    params = []
    for mf in method_flags():
        option = typer.Option(
            None, mf.flag, help=f"[{', '.join(mf.methods)}] {mf.help}", rich_help_panel=METHOD_PANEL, show_default=False
        )
        params.append(
            inspect.Parameter(mf.param, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=str | None)
        )
    return params


def _plain_type(hint: Any) -> type:
    """``int | None`` -> int; typer needs one concrete type per option."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args and _is_union(hint) else hint


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def extend_signature(func: Callable, extra: list[inspect.Parameter]) -> Callable:
    """Give ``func`` (which takes ``**kwargs``) the extra keyword-only parameters, for typer to read."""
    sig = inspect.signature(func)
    fixed = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    func.__signature__ = sig.replace(parameters=fixed + extra)
    hints = get_type_hints(func)
    hints.update({p.name: p.annotation for p in extra})
    func.__annotations__ = hints
    return func


# ---- parsing method flag values ------------------------------------------------------------------------
_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def parse_value(flag_name: str, text: str, hint: Any) -> Any:
    """Turn a flag's text into a value of the field's type, trying the union's members in a fixed order:
    None, bool, int, float, list, dict, str."""
    options = list(typing.get_args(hint)) if _is_union(hint) else [hint]
    origins = {typing.get_origin(o) or o: o for o in options}
    for parse in (_parse_scalar, _parse_list, _parse_dict):
        value = parse(flag_name, text, origins)
        if value is not _UNPARSED:
            return value
    if str in origins:
        return text
    expected = " or ".join(sorted(getattr(o, "__name__", str(o)) for o in options if o is not type(None)))
    raise ConfigError(f"{flag_name} {text!r} is not a valid {expected}. Example: {_example(options)}.")


_UNPARSED = object()  # a parser's answer when the text is not of its kind


def _parse_scalar(flag_name: str, text: str, origins: dict[Any, Any]) -> Any:
    """None, a bool or a number, when the union has that member and the text reads as one."""
    lowered = text.strip().lower()
    if type(None) in origins and lowered in ("none", "null"):
        return None
    if bool in origins and lowered in _TRUE | _FALSE:
        return lowered in _TRUE
    for kind in (int, float):
        if kind in origins:
            try:
                return kind(text)
            except ValueError:
                pass
    return _UNPARSED


def _parse_list(flag_name: str, text: str, origins: dict[Any, Any]) -> Any:
    if list not in origins:
        return _UNPARSED
    items = _as_list(text, single_ok=str not in origins)
    if items is None:
        return _UNPARSED
    (item_type,) = typing.get_args(origins[list]) or (str,)
    return [parse_value(flag_name, item, item_type) for item in items]


def _parse_dict(flag_name: str, text: str, origins: dict[Any, Any]) -> Any:
    if dict not in origins:
        return _UNPARSED
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return _UNPARSED
    return value if isinstance(value, dict) else _UNPARSED


def _as_list(text: str, single_ok: bool) -> list[str] | None:
    """'a,b' or '[a, b]' -> items. A single name (letters, digits, '_', '.') is a one-item list too, so
    ``--target-modules query`` means ['query']; anything else (a regex, 'all-linear') stays a string."""
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        stripped = stripped[1:-1]
        return [s.strip().strip("'\"") for s in stripped.split(",") if s.strip()]
    if "," in stripped:
        return [s.strip() for s in stripped.split(",") if s.strip()]
    if single_ok or re.fullmatch(r"[\w.]+", stripped):
        return [stripped]
    return None


def _example(options: list[Any]) -> str:
    kinds = {typing.get_origin(o) or o for o in options}
    if dict in kinds:
        return "'{query: 4, value: 8}'"
    if list in kinds:
        return "'query,value'"
    return "8" if int in kinds else "0.1" if float in kinds else "true"


def method_args_from_flags(method: str, values: dict[str, str | None]) -> dict[str, Any]:
    """The method settings given as flags (``values``: generated parameter name -> text or None)."""
    configs = method_configs()
    key = method.lower()
    if key not in configs:
        raise ConfigError(f"--method {method!r} is not a registered method; choose one of {choices(configs)}.")
    hints = get_type_hints(configs[key])
    out = {}
    for mf in method_flags():
        text = values.get(mf.param)
        if text is None:
            continue
        if key not in mf.methods:
            valid = [m.flag for m in method_flags() if key in m.methods]
            raise ConfigError(f"{mf.flag} does not apply to --method {key}; its flags are: {', '.join(valid)}.")
        out[mf.field] = parse_value(mf.flag, text, hints[mf.field])
    return out


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'lora' or 'lora:r=16,target_modules=[query,value]' -> ('lora', {'r': 16, 'target_modules': [...]}): the
    method syntax of `peftkit train --method`, `peftkit compare --method` and the YAML ``method:`` key. Values parse
    by the field's type, as the method's own flags do."""
    name, _, rest = spec.partition(":")
    configs = method_configs()
    key = name.strip().lower()
    if key not in configs:
        raise ConfigError(f"--method {spec!r}: {name!r} is not a registered method; choose from {choices(configs)}.")
    hints = get_type_hints(configs[key])
    valid = [f.name for f in dataclasses.fields(configs[key]) if f.name not in HIDDEN_METHOD_FIELDS]
    args: dict[str, Any] = {}
    for item in re.split(r",(?![^\[{]*[\]}])", rest) if rest else []:
        field, eq, value = item.partition("=")
        field = field.strip()
        if not eq or field not in valid:
            raise ConfigError(
                f"--method {spec!r}: {field!r} is not a setting of {key}; "
                f"write name=value with one of {choices(valid)}."
            )
        args[field] = parse_value(f"--method {key}:{field}", value.strip(), hints[field])
    return key, args


def _method_name(spec: str) -> str:
    return str(spec).partition(":")[0].strip().lower()


def build_train_config(
    values: dict[str, Any], config_file: str | None, demo: bool, extra: dict[str, Any] | None = None
) -> TrainConfig:
    """defaults <- DEMO (when ``demo``) <- YAML file <- flags. ``values``: every generated parameter's value."""
    from peftkit.train.config import read_yaml

    settings: dict[str, Any] = dict(DEMO) if demo else {}
    settings["method_args"] = dict(settings.get("method_args", {}))
    if config_file:
        data = read_yaml(config_file)
        if "method" in data and _method_name(data["method"]) != _method_name(settings.get("method", "")):
            settings["method_args"] = {}
        settings.update({k: v for k, v in data.items() if k != "method_args"})
        settings["method_args"].update(data.get("method_args") or {})
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in values.items() if k in train_fields and v is not None}
    if "method" in given and _method_name(given["method"]) != _method_name(settings.get("method", "lora")):
        settings["method_args"] = {}
    settings.update(given)
    settings.update(extra or {})
    method = settings.get("method", "lora")
    if ":" in method:  # 'lora:r=16,lora_alpha=32', as in `peftkit compare`
        settings["method"], spec_args = parse_spec(method)
        settings["method_args"].update(spec_args)
        method = settings["method"]
    settings["method_args"].update(method_args_from_flags(method, values))
    return TrainConfig.from_dict(settings, source=config_file or "the flags")
