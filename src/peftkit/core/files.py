"""Atomic file writes: a crash leaves the old file (or checkpoint) whole, never a half-written one."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_staged = threading.local()  # (tmp, final) renames deferred by an enclosing atomic_writes()


@contextmanager
def atomic_writes() -> Iterator[None]:
    """Group atomic_write_bytes calls (also as a decorator): every file goes to a temporary name first and the
    renames happen only once all of them are written, so a crash leaves the old checkpoint whole (config and
    tensors together) and no temporary file behind."""
    outer = getattr(_staged, "renames", None)
    _staged.renames = renames = [] if outer is None else outer
    try:
        yield
    except BaseException:
        if outer is None:
            for tmp, _ in renames:
                tmp.unlink(missing_ok=True)
        raise
    finally:
        if outer is None:
            _staged.renames = None
    if outer is None:
        for tmp, path in renames:
            os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves either the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    renames = getattr(_staged, "renames", None)
    if renames is None:
        os.replace(tmp, path)
    else:
        if (tmp, path) not in renames:
            renames.append((tmp, path))
