"""A restore keeps the store's audit chain and appends to it; it never rewrites it.

- The store's chain head is kept (not the backup's): the store's records stay where they
  are, linked as they were.
- Chain keys: the backup's the store lacks are added (ids are unique across stores); every
  chain key the keyring opens is re-wrapped under the restored store's live master key
  (the store's own master keys are replaced by the backup's); a new chain key, sealed
  under that key, MACs everything written from now on.
- Records: a backup record the store holds (same id, same content and MAC) is skipped, as
  are those the store pruned (ids up to its anchor, when the backup is of the same chain:
  they share a chain key). The rest are copied onto the end of the chain, in order, after
  an ``audit.restored`` record that names the backup, the copies' original ids and whether
  the backup's own chain verified. Copies keep their content (time, actor, outcome, ...)
  and get new ids and MACs: `audit verify` passes, and says where they came from.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.models import AuditChainHead, AuditChainKey, AuditRecord
from keyvault.services.audit import record_event
from keyvault.services.audit_chain import (
    FIELDS,
    KEY_STARTED,
    AuditChain,
    ChainKeys,
    append,
    chain_key_aad,
    head_of,
    session_loader,
    start_chain_key,
)
from keyvault.services.audit_verify import check_records

CHAIN_TABLES = (AuditChainHead.__tablename__, AuditChainKey.__tablename__)
RESTORED = "audit.restored"
_BATCH = 500


def _merge_keys(
    session: Session, backup_keys: list[dict[str, Any]], keyring: crypto.Keyring, live_id: str
) -> bool:
    """Add the backup's chain keys, re-wrap what the keyring opens under ``live_id``;
    True if the store and the backup share a chain key (the same chain)."""
    held = set(session.scalars(select(AuditChainKey.id)))
    new = [row for row in backup_keys if row["id"] not in held]
    if new:
        session.execute(insert(cast(Table, AuditChainKey.__table__)), new)
    for row in session.scalars(select(AuditChainKey).execution_options(populate_existing=True)):
        if row.master_key_id == live_id or row.master_key_id not in keyring.keys:
            continue  # one the keyring cannot open stays as it is: verify names it
        sealed = crypto.Sealed(row.ciphertext, row.wrapped_key, row.master_key_id)
        moved = crypto.rewrap(
            keyring, sealed, chain_key_aad(row.id), to=live_id, what=f"audit chain key {row.id}"
        )
        row.wrapped_key, row.master_key_id = moved.wrapped_key, moved.master_key_id
    session.flush()
    return bool(held & {row["id"] for row in backup_keys})


def _missing(session: Session, rows: list[dict[str, Any]], same_chain: bool) -> list[dict]:
    """The backup's records the store does not hold (nor pruned), in id order."""
    table = cast(Table, AuditRecord.__table__)
    columns = [c.name for c in table.columns if c.name != "id"]
    anchor_id = head_of(session).anchor_id if same_chain else 0
    missing = []
    ordered = sorted(rows, key=lambda r: r["id"])
    for start in range(0, len(ordered), _BATCH):
        batch = [r for r in ordered[start : start + _BATCH] if r["id"] > anchor_id]
        held = {
            r.id: r._mapping
            for r in session.execute(select(table).where(table.c.id.in_([b["id"] for b in batch])))
        }
        for row in batch:
            same = held.get(row["id"])
            if same is None or any(same[c] != row[c] for c in columns):
                missing.append(row)
    return missing


def _backup_verdict(
    session: Session, rows: list[dict[str, Any]], head: list[dict[str, Any]], keys: ChainKeys
) -> str:
    if not head:
        return "could not be checked (the backup has no chain head)"
    load = session_loader(session)
    report = check_records(
        sorted(rows, key=lambda r: r["id"]),
        key_for=lambda key_id: keys.get(key_id, load),
        anchor_id=head[0]["anchor_id"],
        anchor_mac=head[0]["anchor_mac"],
        last_id=head[0]["last_id"],
        last_mac=head[0]["last_mac"],
        anchor_named=True,
    )
    return "verified" if report.ok else f"did not verify: {report.problem}"


def merge_audit_chain(
    session: Session,
    rows_by_table: dict[str, list[dict[str, Any]]],
    *,
    keyring: crypto.Keyring,
    live_id: str,
    chain: AuditChain,
    actor: str,
    source: str,
) -> int:
    """Merge the backup's chain keys and records into the store's chain (after the backup's
    master keys are in place); return how many records were copied."""
    rows = rows_by_table[AuditRecord.__tablename__]
    same_chain = _merge_keys(session, rows_by_table[AuditChainKey.__tablename__], keyring, live_id)
    start_chain_key(
        session, keyring=replace(keyring, active=live_id), keys=chain.keys, sink=chain.sink
    )
    missing = _missing(session, rows, same_chain)
    if not missing:
        return 0
    verdict = _backup_verdict(
        session, rows, rows_by_table[AuditChainHead.__tablename__], ChainKeys(keyring)
    )
    ids = f"{missing[0]['id']}-{missing[-1]['id']}" if len(missing) > 1 else str(missing[0]["id"])
    record_event(
        session,
        chain=chain,
        actor=actor,
        action=RESTORED,
        target=source,
        client="cli",
        outcome="ok",
        detail=f"the next {len(missing)} records are copies of the backup's records (original "
        f"ids {ids}) the store did not hold; the backup's own chain {verdict}",
    )
    for start in range(0, len(missing), _BATCH):
        append(
            session,
            chain=chain,
            records=[_copy(r) for r in missing[start : start + _BATCH]],
        )
    return len(missing)


def _copy(row: dict[str, Any]) -> dict[str, Any]:
    """A backup's record as a copy. A copied chain-key record names the backup's key, not a
    key this chain moves to, so it is renamed (``.copy``): only a chain key record of this
    chain steers which key comes next (``audit_chain.KEY_STARTED``)."""
    copy = {f: row[f] for f in FIELDS}
    if copy["action"] == KEY_STARTED:
        copy["action"] = f"{KEY_STARTED}.copy"
    return copy
