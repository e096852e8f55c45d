"""The JSON-lines audit sink: every committed audit record, one JSON object per line.

A copy outside the database (``audit_sink`` in keyvault.toml's ``[audit]`` table, or
``KEYVAULT_AUDIT_SINK``): a file path, appended to by every process (``O_APPEND``, one
``write`` per batch, so lines of several processes never interleave), or ``-`` for the
server's stdout (journald). Each line carries the record with its chain MAC and the MAC
it links to, so `keyvault audit verify --file` checks the copy on its own, and a database
writer who rewinds the chain's tail cannot rewind this file too.

Lines are written after the outer transaction commits (a record rolled back, with its
transaction or its savepoint, is never in the file); records the sink missed are marked
as a gap (``GAP``) at the next write that succeeds.
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


GAP = "sink_gap"  # a marker line's one key: {"sink_gap": {"from": id, "to": id}}


class AuditSink:
    """An open sink; ``write`` appends lines, never raising (the records are committed).

    Records that could not be written (a failed write, or a commit whose outcome is
    unknown) are remembered as gaps, and the next write that succeeds puts a marker line
    for each before its records: `audit verify --file` reports a marked gap as a gap, not
    as records deleted, and verifies the records on both sides of it."""

    def __init__(self, target: str, *, fd: int | None = None, stream: TextIO | None = None):
        self.target = target
        self._fd = fd
        self._stream = stream
        self._lock = threading.Lock()
        self.failures = 0
        self._gaps: list[tuple[int, int]] = []  # (first id, last id) not yet marked

    def missed(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Remember ``rows`` as a gap to mark (they may be committed, and are not written)."""
        if rows:
            with self._lock:
                self._gaps.append((int(rows[0]["id"]), int(rows[-1]["id"])))

    def write(self, rows: Sequence[Mapping[str, Any]]) -> bool:
        """Append one line per row; False (logged, and remembered as a gap) if the sink
        could not take them."""
        if not rows:
            return True
        data = "".join(json.dumps(dict(r), separators=(",", ":")) + "\n" for r in rows)
        try:
            with self._lock:
                marks = "".join(
                    json.dumps({GAP: {"from": first, "to": last}}) + "\n"
                    for first, last in self._gaps
                )
                self._put(marks + data)
                self._gaps.clear()
            return True
        except (OSError, ValueError) as exc:
            self.failures += 1
            log.error(
                "audit sink %s: records %s-%s are committed but not written to it: %s",
                self.target, rows[0].get("id"), rows[-1].get("id"), exc,
            )  # fmt: skip
            self.missed(rows)
            return False

    def _put(self, data: str) -> None:
        if self._stream is not None:
            self._stream.write(data)
            self._stream.flush()
            return
        assert self._fd is not None
        raw = memoryview(data.encode())
        while raw:
            raw = raw[os.write(self._fd, raw) :]

    def after_commit(self, session: Session, rows: Sequence[Mapping[str, Any]]) -> None:
        """Write ``rows`` once ``session``'s outer transaction commits; never if it, or the
        savepoint they were appended in, rolls back."""
        key = (_PENDING, id(self))
        if key not in session.info:
            session.info[key] = []
            # For the session's life: a listener removed while its event runs would break
            # the dispatch, and the state is in session.info anyway.
            event.listen(session, "after_commit", self._committed(key))
            event.listen(session, "after_soft_rollback", _rolled_back(key))
        transaction = session.get_nested_transaction() or session.get_transaction()
        session.info[key].append((transaction, rows))

    def _committed(self, key: tuple[str, int]) -> Any:
        def committed(done: Session) -> None:
            pending = done.info.get(key) or []
            done.info[key] = []
            self.write([row for _, rows in pending for row in rows])

        return committed

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _rolled_back(key: tuple[str, int]) -> Any:
    def rolled_back(done: Session, previous: Any) -> None:
        # A savepoint's rollback drops only what was appended inside it; the outer
        # transaction's drops everything (none of it committed).
        pending = done.info.get(key) or []
        done.info[key] = [(t, rows) for t, rows in pending if not _within(t, previous)]

    return rolled_back


def _within(transaction: Any, ancestor: Any) -> bool:
    """Whether ``transaction`` is ``ancestor`` or nested inside it."""
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False


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
