"""The files of audit durability ``journal`` (``keyvault.http.audit_journal``).

``<home>/audit-journal/`` (0700) holds, per server process, ``<host>-<pid>-<id>-<n>.jsonl``
(0600): one JSON line per audit record, appended with one ``write(2)``, under an exclusive
``flock`` for the process's life (an unlocked journal is an orphan: its process is gone),
and beside it ``.shipped``, how many of its lines are committed to the database (rewritten
after each batch, not fsynced: a lag only makes the replay check the database).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from keyvault.errors import ConfigError
from keyvault.http.audit_writer import AuditEntry

log = logging.getLogger("keyvault.audit")

FIELDS = ("token_name", "action", "cluster", "scope", "version", "client", "outcome")


class JournalFile:
    """One journal: lines appended by this process, and how many of them are in the database."""

    def __init__(self, path: Path, fd: int, mark_fd: int, *, lines: int = 0, shipped: int = 0):
        self.path = path
        self._fd = fd
        self._mark_fd = mark_fd
        self.lines = lines  # lines written
        self.shipped = shipped  # lines committed to the database
        self.size = 0

    @classmethod
    def create(cls, directory: Path, writer_id: str, number: int = 1) -> JournalFile:
        """A new journal, locked before it is visible under its name (never taken for an orphan)."""
        name = f"{socket.gethostname()}-{os.getpid()}-{writer_id}-{number}"
        path = directory / f"{name}.jsonl"
        making = directory / f"{name}.new"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        fd = os.open(making, flags, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(making, path)
        return cls(path, fd, _open_mark(path))

    @property
    def writer_id(self) -> str:
        """The id of the writer that wrote it (its database session's application_name)."""
        return self.path.stem.rsplit("-", 2)[-2]

    def append(self, entry: AuditEntry) -> None:
        """One ``write(2)`` of one whole line (O_APPEND); OSError if it is not all written."""
        line = _line(entry)
        written = os.write(self._fd, line)
        if written != len(line):  # a full disk: cut the fragment, or the next line joins it
            os.ftruncate(self._fd, self.size)
            raise OSError(f"short write to the audit journal {self.path}")
        self.size += written
        self.lines += 1

    def mark(self, shipped: int) -> None:
        self.shipped = shipped
        os.pwrite(self._mark_fd, f"{shipped:020d}\n".encode(), 0)

    def remove(self) -> None:
        """All its lines are in the database: the files go (journal first, then its mark)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_mark_path(self.path))
        self.close()

    def close(self) -> None:
        for fd in (self._fd, self._mark_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


@dataclass
class Orphan:
    """The journal of a process that is gone, claimed (locked) by this one."""

    file: JournalFile
    entries: list[AuditEntry]  # its records after the mark, in order
    ends: list[int]  # the mark once each of them is shipped (its line number, from 1)
    unreadable: int  # lines that are not records (a tail torn by an OS crash)


def private_directory(directory: Path) -> None:
    """Create ``directory`` (0700), or check that it is a directory of this user that no
    one else can write or read: whoever can write it can add records to the chain."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ConfigError(
            f"the audit journal directory {directory} must be a directory of this user "
            f"with mode 0700 (it is {stat.filemode(st.st_mode)}, uid {st.st_uid})",
            hint=f"chown it to this user and chmod 700 {directory}, or remove it",
        )


def claim_orphans(directory: Path) -> list[Orphan]:
    """The journals in ``directory`` that no live process holds, each locked and read (in
    the order they were written: by process, then by number). A file that cannot be opened
    as a journal is logged and left alone."""
    for mark in directory.glob("*.shipped"):  # left by a removal cut short
        if not mark.with_suffix(".jsonl").exists():
            with contextlib.suppress(FileNotFoundError):
                mark.unlink()
    orphans = []
    for path in sorted(directory.glob("*.jsonl"), key=_written_order):
        try:
            orphan = _claim(path)
        except (OSError, ValueError) as exc:
            log.error("audit journal %s cannot be read, left alone: %s", path, exc)
            continue
        if orphan is not None:
            orphans.append(orphan)
    return orphans


def _written_order(path: Path) -> tuple[str, int]:
    process, _, number = path.stem.rpartition("-")
    return (process, int(number) if number.isdigit() else 0)


def _claim(path: Path) -> Orphan | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:  # shipped by another process meanwhile
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # a live process's journal
        os.close(fd)
        return None
    if not path.exists():  # claimed, shipped and removed by another process meanwhile
        os.close(fd)
        return None
    try:
        return _read_orphan(path, fd)
    except BaseException:
        os.close(fd)
        raise


def _read_orphan(path: Path, fd: int) -> Orphan:
    mark_fd = _open_mark(path)
    raw = os.pread(mark_fd, 32, 0).strip()
    shipped = int(raw) if raw.isdigit() else 0
    with os.fdopen(os.dup(fd), "rb") as journal:
        lines = journal.read().split(b"\n")
    entries, ends, unreadable = [], [], 0
    for number, line in enumerate(lines[shipped:], start=shipped + 1):
        entry = _entry(line)
        if entry is not None:
            entries.append(entry)
            ends.append(number)
        elif line:
            unreadable += 1
    physical = len(lines) - (lines[-1] == b"")  # the last line ends with a newline
    file = JournalFile(path, fd, mark_fd, lines=physical, shipped=shipped)
    return Orphan(file, entries, ends, unreadable)


def _open_mark(journal: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    return os.open(_mark_path(journal), flags, 0o600)


def _line(entry: AuditEntry) -> bytes:
    fields = {f: getattr(entry, f) for f in FIELDS}
    return (
        json.dumps({"at": entry.at.isoformat(), **fields}, separators=(",", ":")).encode() + b"\n"
    )


def _entry(line: bytes) -> AuditEntry | None:
    """The entry of a journal line; None if it is not one (a torn tail)."""
    try:
        data = json.loads(line)
        return AuditEntry(datetime.fromisoformat(data["at"]), *(data[f] for f in FIELDS))
    except (ValueError, KeyError, TypeError):
        return None


def _mark_path(journal: Path) -> Path:
    return journal.with_suffix(".shipped")
