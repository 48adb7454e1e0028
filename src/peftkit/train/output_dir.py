"""Output folders: check that one can be written before any work is done, and clear what an earlier run left.

A fresh run (no ``--resume``) removes the earlier run's ``checkpoints/step-NNNNNNN`` folders and its ``best/``
adapter, and only those: peftkit recognises its own files by name (the adapter files, ``trainer_state.pt``) in a
folder whose ``train_config.yaml`` says a peftkit run wrote there. Anything else under ``checkpoints/`` or
``best/`` makes the run stop before it deletes anything, naming what it found.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from peftkit.core.compose import COMPOSITION_FILE
from peftkit.core.config import CONFIG_NAME
from peftkit.core.io import CARD_NAME, WEIGHTS_NAME
from peftkit.errors import ConfigError

STATE_NAME = "trainer_state.pt"
ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, COMPOSITION_FILE, CARD_NAME}  # save_pretrained writes the card too
STEP_FOLDER = re.compile(r"step-\d{7}(\.tmp)?")
SHOWN = 5  # paths named in an error


def writable_dir(path: str | Path, flag: str) -> Path:
    """Create ``path`` (and its parents) if needed and check that files can be written in it.

    Raises ConfigError naming ``flag`` when ``path`` is a file, lies under a file, or cannot be written."""
    path = Path(path)
    no_file_in_the_way(path, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
        _probe_write(path)
    except OSError as err:
        raise ConfigError(
            f"{flag} {str(path)!r} cannot be written ({err.strerror or err}); pick a folder you can write to."
        ) from err
    return path


def no_file_in_the_way(path: Path, flag: str) -> None:
    """ConfigError when ``path`` is a file or lies under one (a folder cannot be made there)."""
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == path else f"lies under {str(blocker)!r}, which is a file"
        raise ConfigError(f"{flag} {str(path)!r} {where}; pass a folder path (it is created if missing).")


def _probe_write(path: Path) -> None:
    """Create and remove a file in ``path`` (raises the OSError the system gives)."""
    handle, probe = tempfile.mkstemp(prefix=".peftkit-write-test-", dir=path)
    os.close(handle)
    os.unlink(probe)


def clear_previous_run(out: Path) -> None:
    """Remove the checkpoints and best adapter an earlier run wrote in ``out``; refuse (deleting nothing) when
    ``checkpoints/`` or ``best/`` holds anything peftkit did not write."""
    ours = [*_ours(out / "checkpoints", _is_step_folder), *_ours(out / "best", _is_adapter_file)]
    for path in ours:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    for folder in (out / "checkpoints", out / "best"):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _ours(folder: Path, is_ours) -> list[Path]:
    """The entries of ``folder`` peftkit wrote; ConfigError when there are others (or no earlier peftkit run)."""
    if not folder.exists():
        return []
    if not folder.is_dir():
        raise ConfigError(f"--output-dir: {folder} is a file, not peftkit's folder; move it or pick another folder.")
    entries = sorted(folder.iterdir())
    recorded = (folder.parent / "train_config.yaml").is_file()
    foreign = [p for p in entries if not (recorded and is_ours(p))]
    if foreign:
        more = f" and {len(foreign) - SHOWN} more" if len(foreign) > SHOWN else ""
        names = ", ".join(str(p) for p in foreign[:SHOWN]) + more
        raise ConfigError(
            f"--output-dir {str(folder.parent)!r}: {folder.name}/ holds files a peftkit run did not write ({names}); "
            "a new run would replace that folder. Move them away, pick another --output-dir, or continue the "
            "earlier run with --resume."
        )
    return entries


def _is_adapter_file(path: Path) -> bool:
    """An adapter file save_pretrained writes, or the temporary name it writes it under first."""
    name = re.sub(r"^\.(.+)\.tmp-\d+$", r"\1", path.name)
    return path.is_file() and name in ADAPTER_FILES


def _is_step_folder(path: Path) -> bool:
    return (
        path.is_dir()
        and STEP_FOLDER.fullmatch(path.name) is not None
        and all(p.name == STATE_NAME or _is_adapter_file(p) for p in path.iterdir())
    )
