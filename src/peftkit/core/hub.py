"""Hugging Face Hub names: a model or adapter given as ``org/name`` is read through huggingface_hub's cache, as
transformers reads it.

The rules are transformers' (``cached_file``): a name that is an existing local path is that folder; anything else
that is a valid repository id is looked up with huggingface_hub, which downloads into its cache (``HF_HOME`` /
``HF_HUB_CACHE``) when the Hub may be reached and answers from that cache alone when ``HF_HUB_OFFLINE=1``. A name
that cannot be resolved is one :class:`~peftkit.errors.PeftkitError` that says why and how to fetch it.

huggingface_hub is imported only when a Hub name is resolved: ``import peftkit`` needs neither it nor transformers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from peftkit.errors import CheckpointError

# huggingface_hub's validate_repo_id: "name" or "org/name", word characters, "-" and ".", no "--" or "..".
_REPO_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")
ADAPTER_FILES = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "composition.json",
    "*/adapter_config.json",
    "*/adapter_model.safetensors",
]


def is_repo_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` is spelled as a Hub repository id (``org/name`` or ``name``), as huggingface_hub checks it."""
    text = str(name)
    return (
        bool(_REPO_ID.fullmatch(text))
        and len(text) <= 96
        and "--" not in text
        and ".." not in text
        and not text.endswith((".", ".git"))
    )


def is_hub_name(name: str | os.PathLike) -> bool:
    """A name to look up on the Hub: a valid repository id that is not an existing local path (local paths win)."""
    return not Path(name).exists() and is_repo_id(name)


def recorded_name(name: str | os.PathLike | None) -> str | None:
    """A model name as ``base_model_name_or_path`` records it: an existing local folder as its absolute path (a
    relative one would depend on the working directory), a Hub id or anything else unchanged."""
    if not name:
        return None
    path = Path(name)
    return str(path.resolve()) if path.is_dir() else str(name)


def fetch_hint(repo_id: str) -> str:
    """How to put ``repo_id`` in the local cache (the CLI of huggingface_hub >= 1.0, then the older one's)."""
    return (
        f"Fetch it once where the Hub can be reached, with the same HF_HOME / HF_HUB_CACHE: `hf download {repo_id}` "
        f"(huggingface_hub < 1.0: `huggingface-cli download {repo_id}`); or pass a local folder."
    )


def hub_file(
    repo_id: str, filename: str, revision: str | None = None, what: str = "model", error: type = CheckpointError
) -> Path:
    """The local path of ``filename`` in Hub repository ``repo_id``: from the cache, downloaded first when online
    (``hf_hub_download``, the call transformers makes for each file). ``error`` (a PeftkitError class) otherwise."""
    hf = _huggingface_hub(repo_id, what, error)
    try:
        return Path(hf.hf_hub_download(repo_id, filename, revision=revision))
    except Exception as err:  # every huggingface_hub failure becomes one message (see _explain)
        raise error(_explain(err, repo_id, filename, revision, what)) from err


def snapshot(
    repo_id: str, patterns: list[str], revision: str | None = None, what: str = "adapter", error: type = CheckpointError
) -> Path:
    """The cached snapshot folder of ``repo_id`` holding the files that match ``patterns`` (``snapshot_download``:
    downloaded first when online; offline, the cached snapshot of ``revision``)."""
    hf = _huggingface_hub(repo_id, what, error)
    try:
        return Path(hf.snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as err:  # as in hub_file
        raise error(_explain(err, repo_id, patterns[0], revision, what)) from err


def adapter_folder(model_id: str | os.PathLike, revision: str | None = None) -> str | os.PathLike:
    """The folder to read an adapter from: ``model_id`` itself unless it names a Hub repository, else the cached
    snapshot holding its adapter files (every adapter sub-folder and a saved composition included)."""
    if not is_hub_name(model_id):
        return model_id
    folder = snapshot(str(model_id), ADAPTER_FILES, revision, what="adapter")
    if not (folder / ADAPTER_FILES[0]).is_file():
        why = "it was not fetched, or it is not an adapter" if _offline() else "it is not an adapter"
        raise CheckpointError(
            f"The Hugging Face Hub repository {str(model_id)!r} has no adapter_config.json in {folder} ({why} saved "
            f"by save_pretrained). {fetch_hint(str(model_id))}"
        )
    return folder


def push_to_hub(
    host: Any,
    repo_id: str,
    commit_message: str = "Upload adapter with peftkit",
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    selected_adapters: list[str] | None = None,
) -> Any:
    """Upload the adapters as ``save_pretrained`` writes them (adapter_config.json, adapter_model.safetensors, the
    README.md model card; peft's layout, so peft and the Hub's widgets read them) to the Hub repository ``repo_id``,
    creating it if needed. Everything is written to a temporary folder first and goes up in one commit. Returns
    huggingface_hub's CommitInfo."""
    import tempfile

    if not is_repo_id(repo_id):
        raise CheckpointError(f"repo_id={repo_id!r} is not a Hugging Face Hub repository name; use 'user/name'.")
    huggingface_hub = _huggingface_hub(repo_id, "repository", CheckpointError)
    api = huggingface_hub.HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="peftkit-push-") as folder:
        host.save_pretrained(folder, selected_adapters=selected_adapters)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )


def _huggingface_hub(repo_id: str, what: str, error: type):
    try:
        import huggingface_hub
    except ImportError as err:
        raise error(
            f"The {what} {repo_id!r} is not a local folder; reading it from the Hugging Face Hub needs "
            "huggingface_hub: pip install 'peftkit[hf]' (or pass a local folder)."
        ) from err
    return huggingface_hub


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _explain(err: Exception, repo_id: str, filename: str, revision: str | None, what: str) -> str:
    """One message for a failed Hub look-up: what is missing, where peftkit looked, how to fix it."""
    from huggingface_hub import constants, errors

    start = f"The {what} {repo_id!r} is not a local folder"
    at = f" at revision {revision!r}" if revision else ""
    if isinstance(err, errors.LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE=1 is set" if _offline() else "the Hub could not be reached"
        return (
            f"{start}, and the Hugging Face Hub repository of that name{at} is not in the local cache "
            f"({constants.HF_HUB_CACHE}) while {why}. {fetch_hint(repo_id)}"
        )
    if isinstance(err, errors.RevisionNotFoundError):
        return f"{start}; the Hugging Face Hub repository {repo_id!r} has no revision {revision!r}. Check the name."
    if isinstance(err, errors.RepositoryNotFoundError):
        return (
            f"{start}, nor a Hugging Face Hub repository you can read (no such repository, or a private / gated one: "
            "log in with `hf auth login`). Check the spelling, or pass a local folder."
        )
    if isinstance(err, errors.EntryNotFoundError):
        return f"{start}; the Hugging Face Hub repository {repo_id!r}{at} has no {filename}. Is it a {what}?"
    return f"{start}, and reading it from the Hugging Face Hub failed ({type(err).__name__}: {err})."


__all__ = [
    "adapter_folder",
    "fetch_hint",
    "hub_file",
    "is_hub_name",
    "is_repo_id",
    "push_to_hub",
    "recorded_name",
    "snapshot",
]
