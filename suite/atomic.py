"""Atomic file writes: a reader sees the old file or the whole new one, never a part.

Files and folders are created with the permissions the user's umask gives any new file
(``0o666 & ~umask``, ``0o777 & ~umask`` for folders), as other tools do: the temporary file
of a write-then-rename would otherwise keep ``mkstemp``'s private ``0o600``. A write the file
system refuses (no space left, read-only, permission denied) raises :class:`StorageError`,
which names the path; the temporary file is removed and the old file stays as it was."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from suite.errors import ExitbenchError


class StorageError(ExitbenchError):
    """The file system refused a write (no space left, read-only, permission denied)."""


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def storage_error(exc: OSError, path: str | Path) -> StorageError:
    """A one-line :class:`StorageError` for an ``OSError`` raised while writing ``path``."""
    where = exc.filename or path
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device"
    elif exc.errno == errno.EROFS:
        what = "read-only file system"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        what = "permission denied"
    else:
        what = exc.strerror or type(exc).__name__
    return StorageError(f"{what} at {where}; finished work is kept (every write is atomic): "
                        f"fix the cause and rerun to resume")


def temp_dir_beside(path: str | Path, tag: str = "tmp") -> Path:
    """A new empty folder beside ``path`` (to fill, then rename over ``path``), with the
    umask's permissions rather than ``mkdtemp``'s ``0o700``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.{tag}-", dir=path.parent))
        os.chmod(folder, 0o777 & ~current_umask())
    except OSError as exc:
        raise storage_error(exc, path) from exc
    return folder


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise storage_error(exc, path) from exc
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: str | None) -> None:
    if tmp is not None and os.path.exists(tmp):
        try:
            os.unlink(tmp)
        except OSError:
            pass


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
