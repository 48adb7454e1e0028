"""All-or-nothing file writes: a failed save leaves the old files (or checkpoint) exactly as they were.

Each file is first written to a temporary in its own folder, created exclusively (``tempfile.mkstemp``:
``O_CREAT | O_EXCL``, a random name, so a planted symlink is never followed and two threads never share one) and
synced. Inside :func:`atomic_writes` the renames wait until every file of the group is written; they then happen
under a per-folder lock, and if one fails the ones already done are undone (old contents written back, new files
removed). Temporaries carry the writing process's id, so those a killed process left are removed by the next save.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

TMP_SUFFIX = ".peftkit-tmp"
# Ours: ".<name>.<pid>.<random>.peftkit-tmp"; older peftkit versions wrote ".<name>.tmp-<pid>".
_TMP_PATTERN = re.compile(r"^\..+\.(?P<pid>\d+)\.[^.]+\.peftkit-tmp$|^\..+\.tmp-(?P<oldpid>\d+)$")
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
_staged = threading.local()  # the _Batch of an enclosing atomic_writes(), per thread


@dataclass
class _Batch:
    """Files written but not yet renamed into place (path -> temporary; None: delete the path) and the folders
    this group created (removed again if it fails)."""

    pending: dict[Path, Path | None] = field(default_factory=dict)
    created: list[Path] = field(default_factory=list)


@contextmanager
def atomic_writes() -> Iterator[None]:
    """Group atomic_write_bytes / atomic_remove calls (also as a decorator ``@atomic_writes()``): all of them take
    effect, or none does. Nested groups join the outermost one."""
    if getattr(_staged, "batch", None) is not None:
        yield
        return
    batch = _staged.batch = _Batch()
    try:
        yield
        _staged.batch = None
        _commit(batch)
    except BaseException:
        _discard(batch)
        raise
    finally:
        _staged.batch = None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a failure leaves the old file (or no file), never a partial one."""
    path = Path(path)
    batch = getattr(_staged, "batch", None)
    if batch is None:
        with atomic_writes():
            atomic_write_bytes(path, data)
        return
    batch.created.extend(_make_parents(path.parent))
    previous = batch.pending.get(path)
    batch.pending[path] = _write_temporary(path, data)
    if previous is not None:
        previous.unlink(missing_ok=True)


def atomic_remove(path: Path) -> None:
    """Delete ``path`` together with the enclosing group's writes (at once if there is none)."""
    batch = getattr(_staged, "batch", None)
    if batch is None:
        Path(path).unlink(missing_ok=True)
    else:
        batch.pending[Path(path)] = None


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries in ``folder`` left by processes that no longer run (killed mid-save)."""
    removed = []
    entries = os.scandir(folder) if Path(folder).is_dir() else []
    for entry in entries:
        match = _TMP_PATTERN.match(entry.name)
        if match and (entry.is_symlink() or entry.is_file(follow_symlinks=False)):
            pid = int(match.group("pid") or match.group("oldpid"))
            if not _alive(pid):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents; returns the ones created (deepest last)."""
    missing = []
    while not folder.exists() and not folder.is_symlink():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        os.mkdir(path)
    return list(reversed(missing))


def _write_temporary(path: Path, data: bytes) -> Path:
    """``data`` in a fresh, exclusively created temporary beside ``path``, synced to disk."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def _lock(folder: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(os.path.realpath(folder), threading.Lock())


def _commit(batch: _Batch) -> None:
    """Rename every temporary into place (delete where asked); on a failure undo the ones done, then re-raise."""
    folders = sorted({os.path.realpath(p.parent) for p in batch.pending})
    locks = [_lock(Path(f)) for f in folders]
    for lock in locks:
        lock.acquire()
    done: list[tuple[Path, bytes | None]] = []
    try:
        for path, tmp in batch.pending.items():
            old = path.read_bytes() if path.is_file() else None
            if tmp is None:
                path.unlink(missing_ok=True)
            else:
                os.replace(tmp, path)
            done.append((path, old))
    except BaseException:
        _undo(done)
        raise
    finally:
        for lock in reversed(locks):
            lock.release()


def _undo(done: list[tuple[Path, bytes | None]]) -> None:
    """Best effort: put back what the renames in ``done`` replaced (a second failure here leaves the new file)."""
    for path, old in reversed(done):
        try:
            if old is None:
                path.unlink(missing_ok=True)
            else:
                _replace_or_drop(_write_temporary(path, old), path)
        except OSError:
            continue


def _replace_or_drop(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _discard(batch: _Batch) -> None:
    """Remove a failed group's temporaries and the (then empty) folders it created."""
    for tmp in batch.pending.values():
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    for folder in reversed(batch.created):
        try:
            folder.rmdir()
        except OSError:
            continue
