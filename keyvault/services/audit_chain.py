"""The audit log's hash chain: the one place that links, MACs and appends audit records.

Each record carries ``chain_mac`` = ``crypto.mac(key, prev_mac, id, at, action, token_name,
actor, target, cluster, scope, version, client, outcome, phase, intent_id, detail,
chain_key_id)``: the previous record's MAC is inside, so deleting, altering, inserting or
moving a record breaks the chain at that record (``audit_verify`` finds it).

The MAC key is an *audit chain key*: 32 random bytes sealed under the live master key
(``audit_chain_keys``), not the master key or a key derived from it, so old records stay
verifiable after their master key is retired and leaves the keyring file (`master-key
rotate` re-wraps every chain key and starts a new one, which a leaked old master key cannot
open). Each process unseals a chain key once and keeps it (``ChainKeys``).

Appends are serialised by one head row (``audit_chain``, id 1): every writer locks it
(PostgreSQL ``FOR UPDATE``; SQLite's write transaction already serialises), reads the last
id and MAC, inserts its records with the next ids, and moves the head, all in the
transaction that commits the records. So the HTTP writer's batches, the CLI's intents and
outcomes, several processes, serve workers and machines make one linear chain.

``append_records`` works on the DBAPI connection (the HTTP writer's own, or a session's):
one lock and read of the head, the inserts, one head update per batch.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.config import Settings
from keyvault.errors import DatabaseError, IntegrityError, WrongMasterKey
from keyvault.models import AuditChainHead, AuditChainKey, AuditRecord, utcnow
from keyvault.services.audit_sink import AuditSink, open_sink
from keyvault.services.store import live_keyring, open_keyring

# The record's content, in the order the MAC covers it (after prev_mac and id).
FIELDS = (
    "at",
    "action",
    "token_name",
    "actor",
    "target",
    "cluster",
    "scope",
    "version",
    "client",
    "outcome",
    "phase",
    "intent_id",
    "detail",
)
COLUMNS = ("id", *FIELDS, "chain_key_id", "chain_mac")
GENESIS = ""  # the "previous MAC" of a chain's first record
HEAD_ID = 1


def canonical_at(at: datetime | str) -> str:
    """The record time as the MAC covers it: naive UTC ISO with microseconds (what both
    databases store and return), whether given aware, naive-UTC or already as this string."""
    if isinstance(at, str) and len(at) == 26 and at[10] == "T":
        return at  # already canonical (the common case: link() made it)
    if isinstance(at, str):  # SQLite's text form ("2026-12-03 10:00:00.000000"), a sink line's
        at = datetime.fromisoformat(at)
    if at.tzinfo is not None:
        at = at.astimezone(UTC).replace(tzinfo=None)
    return at.isoformat(sep="T", timespec="microseconds")


def record_mac(key: bytes, prev_mac: str, record: Mapping[str, Any]) -> str:
    """The chain MAC of ``record`` (its content, ``id`` and ``chain_key_id``) after ``prev_mac``."""
    content = [record[f] for f in FIELDS[1:]]
    return crypto.mac(
        key, prev_mac, record["id"], canonical_at(record["at"]), *content, record["chain_key_id"]
    )


def link(
    key: bytes, key_id: str, prev_mac: str, first_id: int, records: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """``records`` numbered from ``first_id``, each MACed after the one before (pure).

    Each result is also a JSON-lines sink line: ``at`` in its canonical text form, and the
    ``prev_mac`` it links to (not a column)."""
    linked = []
    for offset, record in enumerate(records):
        row = {f: record.get(f) for f in FIELDS}
        row.update(
            id=first_id + offset,
            at=canonical_at(record["at"]),
            chain_key_id=key_id,
            prev_mac=prev_mac,
        )
        row["chain_mac"] = prev_mac = record_mac(key, prev_mac, row)
        linked.append(row)
    return linked


def chain_key_aad(key_id: str) -> bytes:
    return f"keyvault/v1/audit-chain-key|{key_id}".encode()


def new_chain_key_id() -> str:
    """A unique chain key id (``ck-20261203-3fa9c1d2``): unique across stores, so a restore
    can merge another store's chain keys with this one's."""
    return f"ck-{datetime.now(UTC):%Y%m%d}-{secrets.token_hex(4)}"


SealedLoader = Callable[[str], crypto.Sealed | None]


class ChainKeys:
    """The chain keys this process has unsealed, by id (each is unsealed once).

    The keyring is read from its file on first use, and again when a chain key is sealed
    under a master key it does not hold (a `master-key rotate` by another process).
    """

    def __init__(
        self,
        keyring: crypto.Keyring | None = None,
        *,
        keyring_file: Path | None = None,
        settings: Settings | None = None,
    ) -> None:
        self._keyring = keyring
        self._settings = settings
        if settings is not None:
            keyring_file = settings.master_key_file
        self._file = keyring_file if keyring is None else keyring.source
        self._keys: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def prove(self, session: Session) -> None:
        """Check the keyring file against the store once (``store.open_keyring``), so a wrong
        or foreign keyring gets the store's own error before any chain key is opened."""
        if self._settings is not None:
            self._keyring = open_keyring(session, settings=self._settings)
            self._settings = None

    @property
    def keyring(self) -> crypto.Keyring:
        if self._keyring is None:
            if self._file is None:
                raise WrongMasterKey("no keyring to open the audit chain keys with")
            self._keyring = crypto.load_keyring(self._file)
        return self._keyring

    def remember(self, key_id: str, key: bytes) -> None:
        with self._lock:
            self._keys[key_id] = key

    def cached(self, key_id: str) -> bytes | None:
        """The chain key ``key_id`` if this process has unsealed it already."""
        with self._lock:
            return self._keys.get(key_id)

    def get(self, key_id: str, load: SealedLoader) -> bytes:
        """The chain key ``key_id``; ``load`` reads its sealed form when it is not cached."""
        with self._lock:
            key = self._keys.get(key_id)
        if key is not None:
            return key
        sealed = load(key_id)
        if sealed is None:
            raise IntegrityError(
                f"audit chain key {key_id} is not in the store",
                what=f"audit chain key {key_id}",
                hint="its row was deleted: the records it MACed cannot be verified",
            )
        keyring = self.keyring
        if sealed.master_key_id not in keyring.keys and self._file is not None:
            self._keyring = keyring = crypto.load_keyring(self._file)  # rotated meanwhile
        key = crypto.unseal(
            keyring, sealed, chain_key_aad(key_id), what=f"audit chain key {key_id}"
        )
        self.remember(key_id, key)
        return key


@dataclass
class AuditChain:
    """A process's audit device: its chain keys and, if configured, its JSON-lines sink."""

    keys: ChainKeys
    sink: AuditSink | None = None


def chain_for(settings: Settings, *, dash: Any = None) -> AuditChain:
    """An audit chain for ``settings``, made once per entrypoint and kept by it (the server's
    state, the CLI's context). The sink is opened now, so a sink that cannot be written is a
    ``ConfigError`` at start. ``dash``: the stream the sink "-" means here (the server's
    stdout; by default stderr, so a command's own output stays parseable)."""
    sink = open_sink(settings.audit_sink, dash=dash) if settings.audit_sink else None
    return AuditChain(ChainKeys(settings=settings), sink)


# --- the DB step: one statement set for both databases, on a DBAPI connection ----------


def _sql(statement: str, sqlite: bool) -> str:
    return statement if sqlite else statement.replace("?", "%s")


def _sealed_loader(cur: Any, sqlite: bool) -> SealedLoader:
    def load(key_id: str) -> crypto.Sealed | None:
        cur.execute(
            _sql(
                "SELECT ciphertext, wrapped_key, master_key_id FROM audit_chain_keys WHERE id = ?",
                sqlite,
            ),
            (key_id,),
        )
        row = cur.fetchone()
        return None if row is None else crypto.Sealed(bytes(row[0]), bytes(row[1]), row[2])

    return load


_INSERT = f"INSERT INTO audit_log ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
_HEAD = (
    "SELECT last_id, last_mac, key_id, (SELECT MAX(id) FROM audit_log), "
    "(SELECT chain_key_id FROM audit_log WHERE id = audit_chain.last_id), "
    "(SELECT action FROM audit_log WHERE id = audit_chain.last_id), "
    "(SELECT target FROM audit_log WHERE id = audit_chain.last_id) "
    "FROM audit_chain WHERE id = 1"
)

# The chained record that starts a chain key: its target names the key. The first one (the
# chain's start) is MACed under the key it names and counts the records from before the
# chain; every later one under the key before it, so only a holder of the current key can
# move the chain on, and the order of keys is in the chain itself, not in a column.
KEY_STARTED = "audit.chain_key_started"
KEY_TARGET = "audit-chain-key:"


def next_key_id(key_id: str | None, action: str | None, target: str | None) -> str | None:
    """The chain key the record after this one must use (None: no record to go by)."""
    if action == KEY_STARTED and target and target.startswith(KEY_TARGET):
        return target[len(KEY_TARGET) :]
    return key_id


# SQLite's next rowid follows the largest; PostgreSQL's sequence is moved past the ids given
# here, so a row inserted without an id (by anything else) cannot take one the chain needs.
_HEAD_UPDATE = "UPDATE audit_chain SET last_id = ?, last_mac = ? WHERE id = 1"
_HEAD_UPDATE_PG = (
    "WITH moved AS (SELECT setval(pg_get_serial_sequence('audit_log', 'id'), ?)) "
    "UPDATE audit_chain SET last_id = ?, last_mac = ? FROM moved WHERE audit_chain.id = 1"
)


def append_records(
    conn: Any, *, sqlite: bool, keys: ChainKeys, records: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Link ``records`` after the chain's head and insert them, in the connection's open
    transaction (SQLite: begun IMMEDIATE by the caller); the caller commits.

    Returns the records as inserted (ids, chain key, MACs, and ``prev_mac``)."""
    cur = conn.cursor()
    try:
        first_id, _, key_id, last_mac, key = _locked_head(cur, sqlite, keys)
        linked = link(key, key_id, last_mac, first_id, records)
        values = [_values(row, sqlite) for row in linked]
        if len(values) == 1:  # executemany costs more for one row
            cur.execute(_sql(_INSERT, sqlite), values[0])
        else:
            cur.executemany(_sql(_INSERT, sqlite), values)
        last_id, last_mac = linked[-1]["id"], linked[-1]["chain_mac"]
        if sqlite:
            cur.execute(_HEAD_UPDATE, (last_id, last_mac))
        else:
            cur.execute(_sql(_HEAD_UPDATE_PG, sqlite), (last_id, last_id, last_mac))
        return linked
    finally:
        cur.close()


def _locked_head(cur: Any, sqlite: bool, keys: ChainKeys) -> tuple[int, int, str, str, bytes]:
    """Lock and read the chain's head (in the open transaction): the id of the next record,
    the head's id, the chain key's id, the MAC to link to, and the key."""
    cur.execute(_HEAD if sqlite else _HEAD + " FOR UPDATE")
    head = cur.fetchone()
    if head is None or head[2] is None:
        raise DatabaseError(
            "the audit chain has no head row or no chain key, so no record can be written",
            hint="run `keyvault db upgrade`; if it is at head, the audit_chain table was altered",
        )
    last_id, last_mac, key_id, max_id, *last = head
    expected = next_key_id(*last)
    if expected is not None and expected != key_id:
        raise IntegrityError(
            f"the audit chain's head names chain key {key_id}, but the chain moved to "
            f"chain key {expected}: the head was altered",
            what="audit chain head",
            hint="run `keyvault audit verify`; restore the head's key_id from a backup",
        )
    key = keys.get(key_id, _sealed_loader(cur, sqlite))
    # After the head and after any row written outside the chain (verify reports those).
    return max(last_id, max_id or 0) + 1, last_id, key_id, last_mac, key


def _values(row: Mapping[str, Any], sqlite: bool) -> tuple[Any, ...]:
    at = row["at"]  # canonical (link)
    # Stored as the UTCDateTime column stores it: naive UTC (SQLite: its text form).
    at_value = at.replace("T", " ") if sqlite else datetime.fromisoformat(at)
    return tuple(at_value if c == "at" else row[c] for c in COLUMNS)


# --- through a session (the CLI, restore, master-key rotate) ---------------------------


def append(
    session: Session, *, chain: AuditChain, records: Sequence[Mapping[str, Any]]
) -> list[dict]:
    """Append ``records`` in the session's transaction; the sink gets them after it commits."""
    session.flush()
    chain.keys.prove(session)
    ensure_chain_key(session, keys=chain.keys, sink=chain.sink)
    dialect = session.get_bind().dialect
    try:
        linked = append_records(
            session.connection().connection,
            sqlite=dialect.name == "sqlite",
            keys=chain.keys,
            records=records,
        )
    except dialect.loaded_dbapi.Error as exc:  # the driver's own errors, on its connection
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise DatabaseError(
            f"cannot append to the audit log: {reason}", hint="check the database"
        ) from None
    if chain.sink is not None:
        chain.sink.after_commit(session, linked)
    return linked


def ensure_chain_key(session: Session, *, keys: ChainKeys, sink: AuditSink | None = None) -> None:
    """Start a chain key if the chain has none yet (a new store, or one migrated from 0006)."""
    key_id = session.scalar(select(AuditChainHead.key_id).where(AuditChainHead.id == HEAD_ID))
    if key_id is None:
        keyring = live_keyring(session, keys.keyring)  # share-locks the live master key
        start_chain_key(session, keyring=keyring, keys=keys, sink=sink)


def start_chain_key(
    session: Session,
    *,
    keyring: crypto.Keyring,
    keys: ChainKeys | None = None,
    sink: AuditSink | None = None,
) -> str:
    """A new chain key sealed under ``keyring``'s active key; records from now on use it.

    Chained in a ``KEY_STARTED`` record naming it: MACed under the key before it (so an old
    key cannot be put back in the head, nor a tail re-MACed under it, unseen), or, for the
    chain's first key, under itself, counting the records written before the chain began."""
    head = head_of(session, lock=True)
    previous = head.key_id
    key_id, raw = new_chain_key_id(), secrets.token_bytes(crypto.KEY_BYTES)
    sealed = crypto.seal(keyring, raw, chain_key_aad(key_id))
    session.add(
        AuditChainKey(
            id=key_id,
            ciphertext=sealed.ciphertext,
            wrapped_key=sealed.wrapped_key,
            master_key_id=sealed.master_key_id,
            created_at=utcnow(),
        )
    )
    session.flush()
    keys = keys or ChainKeys(keyring)
    keys.remember(key_id, raw)
    record: dict[str, Any] = {
        "at": utcnow(),
        "action": KEY_STARTED,
        "actor": "keyvault",
        "target": KEY_TARGET + key_id,
        "outcome": "ok",
    }
    if previous is None:  # the chain begins: count what came before, inside the chain
        count, max_id = session.execute(
            select(func.count(), func.coalesce(func.max(AuditRecord.id), 0)).where(
                AuditRecord.id <= head.anchor_id
            )
        ).one()
        record["detail"] = f"chain started after {count} records (ids up to {max_id})"
        _set_head_key(session, key_id)
    else:
        record["detail"] = f"chain key {previous} is followed by {key_id}"
    dialect = session.get_bind().dialect
    linked = append_records(
        session.connection().connection,
        sqlite=dialect.name == "sqlite",
        keys=keys,
        records=[record],
    )
    if previous is not None:
        _set_head_key(session, key_id)
    if sink is not None:
        sink.after_commit(session, linked)
    return key_id


def _set_head_key(session: Session, key_id: str) -> None:
    session.execute(
        update(AuditChainHead).where(AuditChainHead.id == HEAD_ID).values(key_id=key_id)
    )


_PRE_CHAIN = re.compile(r"chain started after (\d+) records \(ids up to (\d+)\)")


def pre_chain_counts(record: Mapping[str, Any]) -> tuple[int, int] | None:
    """What the chain's first ``KEY_STARTED`` record says came before the chain: the count
    and the largest id (None: not such a record)."""
    if record.get("action") != KEY_STARTED:
        return None
    found = _PRE_CHAIN.fullmatch(record.get("detail") or "")
    return None if found is None else (int(found[1]), int(found[2]))


def rewrap_audit_chain_keys(session: Session, *, keyring: crypto.Keyring, to: str) -> int:
    """Re-wrap every chain key under master key ``to`` (`master-key rotate`, restore)."""
    count = 0
    for row in session.scalars(select(AuditChainKey).with_for_update()):
        if row.master_key_id == to:
            continue
        sealed = crypto.Sealed(row.ciphertext, row.wrapped_key, row.master_key_id)
        moved = crypto.rewrap(
            keyring, sealed, chain_key_aad(row.id), to=to, what=f"audit chain key {row.id}"
        )
        row.wrapped_key, row.master_key_id = moved.wrapped_key, moved.master_key_id
        count += 1
    return count


def chain_key_master_ids(session: Session) -> set[str]:
    """The master keys chain keys are sealed under (`master-key rotate` keeps them)."""
    return set(session.scalars(select(AuditChainKey.master_key_id).distinct()))


def session_loader(session: Session) -> SealedLoader:
    """Reads a chain key's sealed form through ``session``."""

    def load(key_id: str) -> crypto.Sealed | None:
        row = session.get(AuditChainKey, key_id)
        return (
            None
            if row is None
            else crypto.Sealed(row.ciphertext, row.wrapped_key, row.master_key_id)
        )

    return load


def head_of(session: Session, *, lock: bool = False) -> AuditChainHead:
    """The head row (``lock``: locked against appends until the transaction ends)."""
    stmt = (
        select(AuditChainHead)
        .where(AuditChainHead.id == HEAD_ID)
        .execution_options(populate_existing=True)
    )
    head = session.scalar(stmt.with_for_update() if lock else stmt)
    if head is None:
        raise DatabaseError(
            "the audit chain has no head row",
            hint="run `keyvault db upgrade`; then check the store",
        )
    return head
