"""Atomic file writes: the one helper for every file keyvault replaces.

A reader (another process, a crash) sees either the old file or the new one,
never a part: the data goes to a temporary file in the same directory, which is
fsync'd, renamed over the target, and the directory fsync'd so the rename
survives a power cut. The temporary file is created with the final mode, so a
private file is never readable by others, not even for a moment.

Imports only ``os`` and ``contextlib``: the TA simulator's ta-tool emulator uses it on every call,
and its start-up time is part of every rotation benchmark. It lives in the client distribution
(``keyvault agent`` writes key files with it); ``keyvault.fsutil`` re-exports it.
"""

from __future__ import annotations

import contextlib
import os

TYPE_CHECKING = False  # typing itself is not imported at run time (see above)
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import BinaryIO


@contextlib.contextmanager
def atomic_writer(
    path: str | os.PathLike[str],
    *,
    mode: int = 0o600,
    durable: bool = True,
    owner: tuple[int, int] | None = None,
) -> Iterator[BinaryIO]:
    """Yield a binary stream; on a clean exit what was written replaces ``path``.

    For content written piece by piece (a backup need not fit in memory). ``durable``
    fsyncs file and directory (off where surviving a killed process is enough).
    ``owner`` (uid, gid) is given to the new file before it appears, for a root process
    writing into another user's directory; directories this call creates (mode 0700) are
    given to it too, so that user can reach its file. On an exception nothing is replaced.
    """
    path = os.fspath(path)
    parent = os.path.dirname(path) or "."
    make_dirs(parent, owner=owner)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            if owner is not None:
                os.fchown(fh.fileno(), *owner)
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed the mode given to open()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        dir_fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def make_dirs(path: str, *, owner: tuple[int, int] | None = None) -> None:
    """Create ``path`` and missing parents (mode 0700); each one created is given to
    ``owner`` (uid, gid) if set. Directories that exist are left as they are."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path.rstrip(os.sep))
    if parent and parent != path:
        make_dirs(parent, owner=owner)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return  # made meanwhile by someone else: theirs, not ours to chown
    if owner is not None:
        os.chown(path, *owner)


def atomic_write(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    mode: int = 0o600,
    durable: bool = True,
    owner: tuple[int, int] | None = None,
) -> None:
    """Replace ``path`` with ``data`` (mode ``mode``); see ``atomic_writer``."""
    with atomic_writer(path, mode=mode, durable=durable, owner=owner) as fh:
        fh.write(data)
