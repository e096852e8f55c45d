"""The JSON-lines audit sink: every committed audit record, one JSON object per line.

A copy outside the database (``audit_sink`` in keyvault.toml's ``[audit]`` table, or
``KEYVAULT_AUDIT_SINK``): a file path, appended to by every process (``O_APPEND``, one
``write`` per batch, so lines of several processes never interleave), or ``-`` for the
server's stdout (journald). Each line carries the record with its chain MAC and the MAC
it links to, so `keyvault audit verify --file` checks the copy on its own, and a database
writer who rewinds the chain's tail cannot rewind this file too.

Lines are written after the records commit (a rolled-back record is never in the file).
``json.dumps`` escapes every control character: a hostile request path stays one line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from sqlalchemy import event
from sqlalchemy.orm import Session

from keyvault.errors import ConfigError

log = logging.getLogger("keyvault.audit")
_PENDING = "keyvault.audit_sink.pending"


class AuditSink:
    """An open sink; ``write`` appends lines, never raising (the records are committed)."""

    def __init__(self, target: str, *, fd: int | None = None, stream: TextIO | None = None):
        self.target = target
        self._fd = fd
        self._stream = stream
        self._lock = threading.Lock()
        self.failures = 0

    def write(self, rows: Sequence[Mapping[str, Any]]) -> bool:
        """Append one line per row; False (and logged) if the sink could not take them."""
        if not rows:
            return True
        data = "".join(json.dumps(dict(r), separators=(",", ":")) + "\n" for r in rows)
        try:
            with self._lock:
                if self._stream is not None:
                    self._stream.write(data)
                    self._stream.flush()
                else:
                    assert self._fd is not None
                    raw = memoryview(data.encode())
                    while raw:
                        raw = raw[os.write(self._fd, raw) :]
            return True
        except (OSError, ValueError) as exc:
            self.failures += 1
            log.error(
                "audit sink %s: records %s-%s are committed but not written to it: %s",
                self.target, rows[0].get("id"), rows[-1].get("id"), exc,
            )  # fmt: skip
            return False

    def after_commit(self, session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write ``rows`` once ``session``'s transaction commits (never if it rolls back)."""
        pending = session.info.get(_PENDING)
        if pending is None:
            pending = session.info[_PENDING] = []

            def committed(done: Session) -> None:
                self.write(done.info.pop(_PENDING, []))

            def rolled_back(done: Session, _previous: Any = None) -> None:
                done.info.pop(_PENDING, None)

            event.listen(session, "after_commit", committed, once=True)
            event.listen(session, "after_soft_rollback", rolled_back, once=True)
        pending.extend(rows)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_sink(target: str, *, dash: TextIO | None = None) -> AuditSink:
    """Open the sink named by ``target``; ``ConfigError`` (one clear line) if it cannot be
    written: a missing directory, no permission, a read-only file system."""
    if target == "-":
        return AuditSink("-", stream=dash or sys.stderr)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"cannot open the audit sink {target}: {exc.strerror}",
            hint="create its directory and make it writable by keyvault, or fix audit_sink "
            "([audit] sink in keyvault.toml, KEYVAULT_AUDIT_SINK)",
        ) from None
    return AuditSink(target, fd=fd)
