"""The HTTP audit writer's appends on PostgreSQL: one round trip while no one else writes.

``keyvault.services.audit_chain`` links, MACs and appends records for every writer; this is
its PostgreSQL append for the HTTP server's group-committing writer
(``keyvault.http.audit_writer``), which owns an autocommit connection. The records and the
chain are the same; only the number of round trips differs (one per batch in the common
case, instead of a lock, a read, the inserts, a head update and a commit).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keyvault.errors import DatabaseError
from keyvault.services.audit_chain import (
    COLUMNS,
    ChainKeys,
    SealedLoader,
    _locked_head,
    _sealed_loader,
    _values,
    link,
)

_PG_TYPES = {"id": "integer", "at": "timestamp", "version": "integer", "intent_id": "integer"}
# Moves the head from where the writer expects it (same id, MAC and chain key, no row above
# it) to the batch's last record, and inserts the batch only if it did: one statement, so
# one round trip and one transaction in autocommit. A head moved by anyone else meanwhile
# leaves nothing written (0 rows); READ COMMITTED re-checks the condition on the newest
# head after waiting for a writer that holds its lock.
_MOVE_HEAD = (
    "WITH moved AS (UPDATE audit_chain"
    " SET last_id = %(new_id)s::integer, last_mac = %(new_mac)s::text"
    " WHERE id = 1 AND last_id = %(last_id)s::integer AND last_mac = %(last_mac)s::text"
    " AND key_id = %(key_id)s::text"
    " AND coalesce((SELECT max(id) FROM audit_log), 0) < %(first_id)s::integer"
    " RETURNING 1), "
    # As append_records: the sequence past the chain's ids, for rows inserted without one.
    "seq AS (SELECT setval(pg_get_serial_sequence('audit_log', 'id'), %(new_id)s::integer)"
    " FROM moved) "
    f"INSERT INTO audit_log ({', '.join(COLUMNS)}) "
)
_PUT_ONE = (
    _MOVE_HEAD
    + "SELECT "
    + ", ".join(f"%({c})s::{_PG_TYPES.get(c, 'text')}" for c in COLUMNS)
    + " FROM seq"
)
# Any number of records in one prepared statement: a column of values per array.
_PUT_MANY = (
    _MOVE_HEAD
    + "SELECT r.* FROM seq, unnest("
    + ", ".join(f"%({c})s::{_PG_TYPES.get(c, 'text')}[]" for c in COLUMNS)
    + ") AS r"
)


@dataclass(frozen=True)
class FastAppend:
    """A batch linked after the appender's end, and the one statement that appends it."""

    linked: list[dict[str, Any]]
    sql: str
    params: dict[str, Any]


@dataclass(frozen=True)
class ChainEnd:
    """Where an append left the chain: its last record's id and MAC, under ``key_id``."""

    last_id: int
    last_mac: str
    key_id: str


class PgAppender:
    """The HTTP audit writer's appends on PostgreSQL, on its own autocommit connection.

    While the head is where this appender's last batch left it (one server process writing,
    the common case), a batch is one statement, one round trip: linked after that end, and
    inserted only if the head is still there (``_MOVE_HEAD``). Otherwise nothing is written
    and the batch is appended under the head's lock as ``append_records`` does (lock and
    read the head, link, the same statement, commit), and its end remembered for the next.
    After a miss (another process wrote), the next batches take the locked way at once, a
    few more after each miss in a row, so writers that alternate do not pay for both.
    """

    def __init__(self, keys: ChainKeys) -> None:
        self.keys = keys
        self.end: ChainEnd | None = None
        # The records of the statement last sent: if its answer is lost they may be committed.
        self.sent: list[dict[str, Any]] | None = None
        self._skip = 0
        self._misses = 0
        self.fast = 0  # batches appended in one round trip
        self.locked = 0  # batches appended under the head's lock

    def append(self, conn: Any, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Append ``records`` and commit (``conn``: psycopg, autocommit); the linked records."""
        self.sent = None
        cur = conn.cursor()
        try:
            fast = self.fast_statement(records, _sealed_loader(cur, False))
            if fast is not None:
                cur.execute(fast.sql, fast.params)
                if self.fast_result(fast, cur.rowcount):
                    return fast.linked
        finally:
            cur.close()
        with conn.transaction():
            cur = conn.cursor()
            try:
                first_id, last_id, key_id, last_mac, key = _locked_head(cur, False, self.keys)
                linked = link(key, key_id, last_mac, first_id, records)
                self.sent = linked
                cur.execute(*_put(linked, last_id, last_mac))
                if cur.rowcount != len(linked):  # a row inserted above the head meanwhile
                    raise DatabaseError(
                        "the audit log changed while its head was locked",
                        hint="retry; something writes audit_log rows outside the chain",
                    )
            finally:
                cur.close()
        self.locked += 1
        return self._ended(linked)

    def committed(self, conn: Any, linked: Sequence[Mapping[str, Any]]) -> bool:
        """Whether a batch whose answer was lost is in the log (its last record, by id and MAC)."""
        last = linked[-1]
        cur = conn.cursor()
        try:
            cur.execute(
                "SELECT 1 FROM audit_log WHERE id = %s AND chain_mac = %s",
                (last["id"], last["chain_mac"]),
            )
            return cur.fetchone() is not None
        finally:
            cur.close()

    def fast_statement(
        self, records: Sequence[Mapping[str, Any]], load: SealedLoader | None
    ) -> FastAppend | None:
        """The one-statement append of ``records`` after this appender's end, for the caller
        to send (on any connection, sync or async) and pass to ``fast_result``; None when the
        locked way is due: no end known, backing off after misses, or (``load`` None) the
        chain key not yet unsealed in this process."""
        end, self.end = self.end, None  # known again once this batch is committed
        if end is None or self._skip:
            self._skip = max(0, self._skip - 1)
            return None
        key = self.keys.cached(end.key_id)
        if key is None:
            if load is None:
                return None
            key = self.keys.get(end.key_id, load)
        linked = link(key, end.key_id, end.last_mac, end.last_id + 1, records)
        self.sent = linked
        return FastAppend(linked, *_put(linked, end.last_id, end.last_mac))

    def fast_result(self, fast: FastAppend, rowcount: int) -> bool:
        """Whether ``fast`` appended its batch (``rowcount``: its statement's); if not, the
        head had moved, nothing was written, and the batch takes the locked way."""
        if rowcount == len(fast.linked):
            self.fast += 1
            self._misses = 0
            self._ended(fast.linked)
            return True
        self.sent = None
        self._misses += 1
        self._skip = min(2**self._misses - 1, 63)
        return False

    def _ended(self, linked: list[dict[str, Any]]) -> list[dict[str, Any]]:
        last = linked[-1]
        self.end = ChainEnd(last["id"], last["chain_mac"], last["chain_key_id"])
        return linked


def _put(
    linked: Sequence[Mapping[str, Any]], last_id: int, last_mac: str
) -> tuple[str, dict[str, Any]]:
    """The statement appending ``linked`` after the head (``last_id``, ``last_mac``)."""
    rows = [dict(zip(COLUMNS, _values(row, False), strict=True)) for row in linked]
    params: dict[str, Any] = {
        "new_id": rows[-1]["id"],
        "new_mac": rows[-1]["chain_mac"],
        "last_id": last_id,
        "last_mac": last_mac,
        "key_id": rows[0]["chain_key_id"],
        "first_id": rows[0]["id"],
    }
    if len(rows) == 1:
        params.update(rows[0])
        return _PUT_ONE, params
    params.update({c: [row[c] for row in rows] for c in COLUMNS})
    return _PUT_MANY, params
