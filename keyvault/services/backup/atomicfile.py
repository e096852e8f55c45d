"""A private file written as a stream and put in place atomically.

The same guarantees as ``keyvault.fsutil.atomic_write`` (a temporary file created with
mode 0600 in the target's directory, fsync'd, renamed over the target, the directory
fsync'd), but written chunk by chunk so a backup never needs to fit in memory.
``fsutil`` only takes whole byte strings; see /work/wt/notes/restore-requests.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


@contextlib.contextmanager
def private_file_writer(path: Path) -> Iterator[BinaryIO]:
    """Yield a stream; on a clean exit its content replaces ``path`` (mode 0600)."""
    parent = path.parent
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = parent / f".{path.name}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
