"""The one atomic writer: every file the toolkit writes goes through `atomic_write`.

A write goes to a temp file in the destination's folder, is flushed and fsynced, then renamed over the
destination with `os.replace`. A kill or a full disk therefore leaves either the previous complete file or
the new complete one, never a partial one. Temp files carry the writer's pid so that `remove_stale_temps`
can delete those of killed runs without touching a live writer's. Files get the user's umask (mkstemp
alone would create them 0600).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import socket
import tempfile
import time
from typing import Any, BinaryIO, Callable, Iterator

from errors import UserError

TEMP_PREFIX = ".tmp_"
# The writer's host: a pid says whether a writer is alive only on its own machine (or container). Another host's
# temp file on a shared file system is left alone unless it is older than STALE_ELSEWHERE_S.
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
STALE_ELSEWHERE_S = 24 * 3600
# What this module's writers create: prefix, writer pid, "_", the host tag and "_" (absent in names from before
# host tags), mkstemp's 8 random characters (after "probe_" for the folder probe of validation.py), the
# target's extension. Other files, even named .tmp_*, are the user's.
_TEMP_NAME = re.compile(r"^\.tmp_(\d+)_(?:h([0-9a-f]{8})_)?(?:probe_)?[a-z0-9_]{8}(?:\.[A-Za-z0-9]+)?$")


def temp_prefix() -> str:
    """The temp-file prefix of this process: `.tmp_<pid>_h<host tag>_`."""
    return f"{TEMP_PREFIX}{os.getpid()}_h{HOST_TAG}_"


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _describe(error: OSError, path: str) -> str:
    reason = os.strerror(error.errno) if error.errno else str(error)
    if error.errno == errno.ENOSPC:
        reason = "no space left on device"
    return f"could not write {path}: {reason.lower()}"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(handle)` on a temp file beside `path`, fsync, then rename it to `path` (all or nothing).

    An OSError (disk full, read-only file system, permission) becomes a one-line UserError; the previous
    file at `path`, if any, is left as it was and the temp file is removed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"cannot write {path}: it is a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(), suffix=os.path.splitext(path)[1], dir=folder)
    except OSError as error:
        raise UserError(_describe(error, path)) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except OSError as error:
        _remove_quietly(tmp)
        raise UserError(_describe(error, path)) from None
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_folder(folder)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    atomic_write(path, lambda handle: handle.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2, sort_keys: bool = False) -> None:
    """Write `obj` as JSON to `path` atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")


def save_npz(path: str | os.PathLike, compressed: bool = True, **arrays: Any) -> None:
    """np.savez(_compressed) to `path` atomically (the arrays are serialized in memory first)."""
    import numpy as np

    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """torch.save to `path` atomically."""
    import torch

    atomic_write(path, lambda handle: torch.save(obj, handle))


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
    """matplotlib `fig.savefig` to `path` atomically (format taken from the extension)."""
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, **savefig_kwargs)
    write_bytes(path, buffer.getvalue())


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Delete temp files left in `folder` by writers that are no longer running; return their paths."""
    folder = os.fspath(folder)
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        full = os.path.join(folder, name)
        if is_stale_temp(full):
            _remove_quietly(full)
            removed.append(full)
    return removed


def is_stale_temp(path: str) -> bool:
    """Whether `path` is a temp file of this module whose writer is gone: a dead pid on this host (or in a name
    without a host tag), or a file of another host untouched for STALE_ELSEWHERE_S."""
    match = _TEMP_NAME.match(os.path.basename(path))
    if match is None or not os.path.isfile(path):
        return False
    pid, host = int(match.group(1)), match.group(2)
    if host is not None and host != HOST_TAG:
        try:
            return time.time() - os.path.getmtime(path) > STALE_ELSEWHERE_S
        except OSError:
            return False
    return pid != os.getpid() and not _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (flock on the folder itself: no lock file is left behind) while the
    block runs; a second holder is refused at once with a one-line UserError naming `what`. Where the file
    system does not support it (some network file systems), the block runs unlocked."""
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
    except OSError as error:
        raise UserError(_describe(error, folder)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{folder} is in use by another {what} (started earlier, still running); wait for it to "
                            "finish, or use another --workdir") from None
        except OSError:
            pass  # no locking here: as before
        yield
    finally:
        os.close(fd)  # closing releases the lock
