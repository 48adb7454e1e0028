"""`peftkit convert`: validate an adapter and rewrite it in the requested format.

peftkit writes Hugging Face peft's format (same adapter_config.json keys, same tensor names), so for the
methods both libraries have (LoRA, (IA)3, prompt and prefix tuning) converting checks the files and rewrites
them cleanly: the config parsed and re-written, tensor names normalised to peft's ``base_model.model.`` keys.

Stable Diffusion LoRA files convert between kohya / A1111 single files (LyCORIS LoHa / LoKr read too),
diffusers' layout and peftkit folders (one save_pretrained folder per component: unet/, text_encoder/...):
``peftkit convert lora.safetensors out.safetensors --to diffusers``. See docs/stable_diffusion.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import typer

from peftkit.cli.common import adapter_folders, load_adapted
from peftkit.core import io
from peftkit.core.config import PeftConfig
from peftkit.core.registry import config_from_dict
from peftkit.errors import CheckpointError, ConfigError, choices
from peftkit.train.models import model_name
from peftkit.train.output_dir import no_file_in_the_way, writable_dir

FORMATS = ("peft", "peftkit", "kohya", "diffusers")
SD_FILE_FORMATS = ("kohya", "diffusers")  # Stable Diffusion single-file formats
PEFT_TYPES = {"LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING"}  # methods Hugging Face peft can load


def convert(
    source: str = typer.Argument(..., help="Adapter folder to read (peft's or peftkit's save_pretrained output)."),
    output: str = typer.Argument(..., help="Folder to write."),
    to: str = typer.Option("peft", "--to", help=f"Target format: {', '.join(FORMATS)}."),
    model: str | None = typer.Option(None, "--model", help="Also check that the tensors fit this base model."),
) -> None:
    """Validate SOURCE (config, tensor names and shapes) and rewrite it to OUTPUT in the --to format.

    All or nothing: the adapters are written to a temporary folder next to OUTPUT, moved into place only when
    every one of them converted."""
    if to not in FORMATS:
        raise ConfigError(f"--to {to!r} is not a format; use one of {choices(FORMATS)}.")
    if to in SD_FILE_FORMATS or Path(source).is_file() or _is_sd_folder(source):
        convert_stable_diffusion(source, output, to)
        return
    folders = adapter_folders(source)
    if not folders:
        raise CheckpointError(f"SOURCE {source!r} holds no adapter_config.json (nor sub-folders with one).")
    out = Path(output)
    no_file_in_the_way(out, "OUTPUT")
    writable_dir(out.parent, "OUTPUT's parent folder")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    try:
        lines = [_convert_one(name, folder, staging, to, model) for name, folder in folders.items()]
        _move_into_place(staging, out, list(folders))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for line in lines:
        typer.echo(line.replace(str(staging), str(out)))


def _convert_one(name: str, folder: Path, staging: Path, to: str, model: str | None) -> str:
    """Check one adapter and write it under ``staging``; the line to print."""
    config = config_from_dict(PeftConfig.read_dict(folder))
    if to == "peft" and config.peft_type not in PEFT_TYPES:
        raise ConfigError(
            f"--to peft: adapter {name!r} is {config.peft_type}, which Hugging Face peft does not have "
            f"(it loads {choices(PEFT_TYPES)}); keep it in peftkit's format with --to peftkit."
        )
    if to == "peft":  # a name peft's AutoPeftModel* resolves: built-ins by their Hub ids, folders absolute
        config.base_model_name_or_path = model_name(config.base_model_name_or_path or model)
    try:
        tensors = io.from_file_keys(io.load_tensors(folder))
    except CheckpointError as err:
        raise CheckpointError(f"adapter {name!r}: {err} Nothing was written.") from err
    if model is not None and name == io.DEFAULT_ADAPTER:
        load_adapted(folder, model)  # raises CheckpointError naming what does not fit
    target = io.adapter_dir(staging, name)
    config.save_pretrained(target)
    io.save_tensors(io.to_file_keys(tensors), target)
    size = sum(t.numel() for t in tensors.values())
    return f"{name}: {config.peft_type}, {len(tensors)} tensors, {size:,d} values -> {Path(target)}"


def _move_into_place(staging: Path, out: Path, names: list[str]) -> None:
    """Everything was written: rename the staging folder to OUTPUT, or, when OUTPUT already holds files, move
    in what was written (each adapter's files replace the same-named ones; other files stay)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        if out.exists():
            out.rmdir()
        staging.rename(out)
        return
    for entry in sorted(staging.iterdir()):
        dest = out / entry.name
        if dest.is_dir() and entry.is_dir() and entry.name in names:
            shutil.rmtree(dest)
        os.replace(entry, dest)


def _is_sd_folder(source: str) -> bool:
    from peftkit.integrations.diffusers import COMPONENTS

    return any((Path(source) / c / "adapter_config.json").is_file() for c in COMPONENTS)


def convert_stable_diffusion(source: str, output: str, to: str) -> None:
    """kohya / LyCORIS / diffusers file or peftkit SD folder -> kohya file, diffusers file, or peftkit folders."""
    from peftkit.integrations import diffusers as sd

    if to in SD_FILE_FORMATS and not output.endswith(".safetensors"):
        raise ConfigError(f"OUTPUT {output!r}: --to {to} writes one file; give a path ending in .safetensors.")
    parts = sd.read_lora(source)
    writers = {"kohya": sd.write_kohya, "diffusers": sd.write_diffusers}
    writers.get(to, sd.write_peftkit)(parts, output)
    for component, modules in parts.items():
        typer.echo(f"{component}: {len(modules)} LoRA modules -> {output} ({to})")
