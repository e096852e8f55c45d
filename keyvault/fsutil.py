"""Atomic file writes: the one helper for every file keyvault replaces.

A reader (another process, a crash) sees either the old file or the new one,
never a part: the data goes to a temporary file in the same directory, which is
fsync'd, renamed over the target, and the directory fsync'd so the rename
survives a power cut. The temporary file is created with the final mode, so a
private file is never readable by others, not even for a moment.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def atomic_write(path: Path | str, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` (mode ``mode``); ``durable`` fsyncs file and directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed the mode given to open()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
