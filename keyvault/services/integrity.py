"""Row MACs: a database writer cannot forge, widen or redirect configuration.

Every row that steers where keys go, who may read them, or what gets rotated when (tokens,
clusters, hosts, webhooks, rotation policies, scope schedules, and the identity of rotation
journal rows, by which recovery routes a key) carries ``mac``: HMAC-SHA256
(``crypto.mac``) under a key derived from a master key (``crypto.subkey``, purpose
``config-mac``), over the table name, the row's id and natural key, and every column that
matters (``mac_fields``); ``mac_key_id`` names that master key. Without the keyring nobody
can make a MAC, so an inserted token, a moved Open API URL, an un-revoked token or a MAC
copied from another row fails ``check_row`` and is refused with ``IntegrityError`` naming it.

Writers call ``seal_row`` after every change (under the live master key, held against a
concurrent `master-key rotate` like every sealing step: ``store.live_keyring``); readers
call ``check_row`` before the row is used. `master-key rotate` moves every verifying row to
its new key (``remac_all``) in the transaction that retires the old one, and a MAC under a
retired key is refused. Rows of a store upgraded to row MACs have no MAC until adopted
(``adopt``), and are refused until then; adoption takes only the rows migration 0012
recorded, once (``row_mac_adoption``), so a row a writer inserts or strips later never is.

What this does not stop: putting back an earlier, genuine state of a row (with its MAC)
made under a master key that is still live. See docs/security.md.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.errors import IntegrityError, RowIntegrityError
from keyvault.models import (
    AccessToken,
    Cluster,
    Host,
    Rotation,
    RotationPolicy,
    RowMac,
    RowMacAdoption,
    ScopeSchedule,
    Webhook,
    utcnow,
)
from keyvault.rotation_states import is_unresolved
from keyvault.services.store import live_keyring
from keyvault.textsafe import printable

# Every model carrying a row MAC, in the order they are checked and adopted.
MAC_MODELS: tuple[type[RowMac], ...] = (
    Cluster,
    Host,
    AccessToken,
    Webhook,
    RotationPolicy,
    ScopeSchedule,
    Rotation,
)


def _t(value: datetime | None) -> str | None:
    # One spelling whatever the driver returns (aware UTC) or the writer set (any zone).
    return None if value is None else value.astimezone(UTC).isoformat()


def mac_fields(row: RowMac) -> list[Any]:
    """What a row's MAC covers: table, id, natural key and every security-relevant column."""
    if isinstance(row, AccessToken):
        return [
            "access_tokens",
            row.id,
            row.name,
            row.token_hash,
            row.scopes,
            bool(row.can_rotate),
            _t(row.expires_at),
            _t(row.revoked_at),
        ]
    if isinstance(row, Cluster):
        return ["clusters", row.id, row.name, row.open_api_url, row.key_pattern, row.options]
    if isinstance(row, Host):
        return [
            "hosts",
            row.id,
            row.cluster_id,
            row.address,
            row.port,
            row.username,
            row.identity_file,
            row.become,
            row.ta_user,
            row.host_key_fingerprint,
        ]
    if isinstance(row, Webhook):
        return ["webhooks", row.id, row.url, row.scopes, _t(row.created_at), _t(row.removed_at)]
    if isinstance(row, RotationPolicy):
        return [
            "rotation_policies",
            row.id,
            row.cluster_id,
            row.target,
            row.max_age_seconds,
            row.window,
        ]
    if isinstance(row, ScopeSchedule):
        return [
            "scope_schedules",
            row.id,
            row.cluster_id,
            row.scope,
            row.consecutive_failures or 0,
            _t(row.next_attempt_at),
            _t(row.paused_at),
        ]
    if isinstance(row, Rotation):
        # Only what the row is created with: recovery routes the key by these (which cluster,
        # which scope, which host holds the pending file); state and outcome change later.
        return [
            "rotations",
            row.id,
            row.cluster_id,
            row.scope,
            row.host_id,
            _t(row.created_at),
        ]
    raise TypeError(f"{type(row).__name__} carries no row MAC")


def describe(row: RowMac) -> str:
    """The row as an operator finds it: table and name or id."""
    if isinstance(row, AccessToken):
        return f"access_tokens row {row.id} (token {row.name!r})"
    if isinstance(row, Cluster):
        return f"clusters row {row.id} (cluster {row.name!r})"
    if isinstance(row, Host):
        # A row that fails may hold anything: never a raw control character in a log line.
        return f"hosts row {row.id} ({printable(f'{row.username}@{row.address}:{row.port}')})"
    if isinstance(row, Webhook):
        return f"webhooks row {row.id} (webhook {row.id})"
    if isinstance(row, RotationPolicy):
        return f"rotation_policies row {row.id} (policy {row.target!r})"
    if isinstance(row, ScopeSchedule):
        return f"scope_schedules row {row.id} (schedule of {row.scope!r})"
    if isinstance(row, Rotation):
        return f"rotations row {printable(row.id)} (rotation {printable(row.id)})"
    raise TypeError(f"{type(row).__name__} carries no row MAC")


_FIX = {
    AccessToken: "revoke it (`keyvault token revoke NAME`) and create a new token",
    Cluster: "check it (`keyvault cluster list --json`), then `keyvault cluster set NAME "
    "--open-api-url URL` re-MACs the row as it then stands",
    Host: "remove it and add it again (`keyvault host remove` / `host add`), or "
    "`keyvault host trust` re-MACs it as it then stands",
    Webhook: "remove it (`keyvault webhook remove ID`) and add it again",
    RotationPolicy: "set it again (`keyvault policy set ...`)",
    ScopeSchedule: "check it, then `keyvault policy resume --cluster NAME --scope SCOPE`",
}


def _hint(row: RowMac) -> str:
    if isinstance(row, Rotation):
        return (
            "its cluster, scope or host was changed outside keyvault, so it cannot say where "
            "the key goes; the key ta-tool generated is not lost: it stays untouched in the "
            f"pending file ~/.keyvault/pending/{printable(row.id)}.out on the rotation's TA "
            "host (and in the local spool if it was spooled); restore the rotations row from "
            "a backup, then recover again; `keyvault db check --integrity` lists every such row"
        )
    fix = _FIX[type(row)]  # type: ignore[index]
    return (
        f"it was changed outside keyvault; restore it from a backup, or {fix} "
        "(an operator holding the master key file re-MACs it); `keyvault db check "
        "--integrity` lists every such row"
    )


@functools.lru_cache(maxsize=16)
def _mac_key(key_id: str, master: bytes) -> bytes:
    # One HKDF per master key and process: the token read path checks a MAC per cold lookup.
    return crypto.subkey(
        crypto.Keyring(active=key_id, keys={key_id: master}), key_id, crypto.PURPOSE_CONFIG_MAC
    )


def compute(row: RowMac, *, keyring: crypto.Keyring, key_id: str) -> str:
    """The MAC of ``row`` as it stands, under master key ``key_id`` of ``keyring``."""
    return crypto.mac(_mac_key(key_id, keyring.key(key_id)), *mac_fields(row))


def _set(row: RowMac, keyring: crypto.Keyring, key_id: str) -> None:
    row.mac, row.mac_key_id = compute(row, keyring=keyring, key_id=key_id), key_id


def seal_row(session: Session, row: RowMac, *, keyring: crypto.Keyring) -> None:
    """MAC ``row`` as it stands under the store's live master key (call after every change)."""
    live = live_keyring(session, keyring)
    if getattr(row, "id", None) is None:
        session.add(row)
        session.flush()  # the id is part of what the MAC covers
    _set(row, live, live.active)
    session.flush()


def failure(row: RowMac, *, keyring: crypto.Keyring) -> str | None:
    """Why ``row`` fails its MAC check, or None when it verifies."""
    if isinstance(row, Rotation) and row.host_id is None and not is_unresolved(row.state):
        # `host remove` clears the host of resolved rotations only (unresolved ones keep it
        # from being removed). Such a row routes no key: a recovery stops at "host removed"
        # and never reads the spool into its cluster (that needs an unresolved state).
        return None
    if row.mac is None or row.mac_key_id is None:
        return (
            "it has no MAC (only rows an upgrade to row MACs found are adopted, once: "
            "`keyvault db adopt`)"
        )
    if row.mac_key_id in keyring.retired:
        # Every genuine row moved off it when it was retired (`remac_all`): an older state.
        return f"its MAC is under master key {row.mac_key_id[:64]!r}, which is retired"
    if row.mac_key_id not in keyring.keys and keyring.source is not None:
        # A `master-key rotate` meanwhile; what this keyring knew retired stays retired.
        keyring = replace(crypto.load_keyring(keyring.source), retired=keyring.retired)
    if row.mac_key_id not in keyring.keys:
        return f"its MAC names master key {row.mac_key_id[:64]!r}, which is not in the keyring"
    if not crypto.mac_matches(row.mac, compute(row, keyring=keyring, key_id=row.mac_key_id)):
        return "its MAC does not match its contents"
    return None


def check_row(row: RowMac, *, keyring: crypto.Keyring) -> None:
    """Refuse ``row`` (``IntegrityError`` naming it and what to do) unless its MAC verifies."""
    why = failure(row, keyring=keyring)
    if why is not None:
        what = describe(row)
        raise RowIntegrityError(
            f"integrity check failed for {what}: {why}; it is not used", what=what, hint=_hint(row)
        )


def check_rows(*rows: RowMac | None, keyring: crypto.Keyring) -> None:
    """``check_row`` each of ``rows`` (None: absent, skipped), the first failure raised."""
    for row in rows:
        if row is not None:
            check_row(row, keyring=keyring)


def _rows(session: Session, models: tuple[type[RowMac], ...] = MAC_MODELS) -> Iterator[RowMac]:
    for model in models:
        yield from session.scalars(select(model).order_by(model.id))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class RowProblem:
    """A row that fails its check: where it is and why (never a secret)."""

    table: str
    row_id: int
    what: str
    reason: str
    missing: bool = False  # no MAC at all (not adopted), rather than a wrong one

    def as_dict(self) -> dict[str, object]:
        return {"table": self.table, "id": self.row_id, "row": self.what, "reason": self.reason}


def problems(
    session: Session,
    *,
    keyring: crypto.Keyring,
    models: tuple[type[RowMac], ...] = MAC_MODELS,
) -> list[RowProblem]:
    """Every row (of ``models``) that fails its MAC check (`keyvault db check --integrity`)."""
    out = []
    for row in _rows(session, models):
        why = failure(row, keyring=keyring)
        if why is not None:
            table = mac_fields(row)[0]
            missing = row.mac is None or row.mac_key_id is None
            out.append(RowProblem(table, row.id, describe(row), why, missing))  # type: ignore[attr-defined]
    return out


def remac_all(session: Session, *, keyring: crypto.Keyring, to: str) -> tuple[int, int]:
    """Move every verifying row's MAC to master key ``to`` (`master-key rotate`, step 2).

    A row that fails (or has none) is left as it is, still refused: re-MACing it would
    launder a change nobody made with the keyring. Returns (re-MACed, left failing).
    """
    moved = failing = 0
    for row in _rows(session):
        if failure(row, keyring=keyring) is None:
            _set(row, keyring, to)
            moved += 1
        else:
            failing += 1
    session.flush()
    return moved, failing


def check_restored(
    session: Session, *, keyring: crypto.Keyring, tokens: bool, token_ids: list[int]
) -> None:
    """A restore: every row MAC the backup brought must verify (``IntegrityError`` naming the
    first that fails; the caller rolls back). A row without a MAC (not adopted in the backed-up
    store) is restored as it is and stays refused until adopted (`keyvault db adopt`).
    ``tokens`` false: the store kept its own tokens (not checked here); those in ``token_ids``
    verified before the backup revoked them and are re-MACed with their revocation."""
    models = MAC_MODELS if tokens else tuple(m for m in MAC_MODELS if m is not AccessToken)
    found = [p for p in problems(session, keyring=keyring, models=models) if not p.missing]
    if found:
        raise IntegrityError(
            f"the backup holds {len(found)} row(s) that fail their integrity check, the first "
            f"{found[0].what}: {found[0].reason}; nothing was restored",
            what="backup file",
            hint="use another copy of the backup; a store that fails `keyvault db check "
            "--integrity` makes backups that do not restore",
        )
    for token_id in token_ids:
        row = session.get(AccessToken, token_id)
        if row is not None:
            seal_row(session, row, keyring=keyring)


# The columns ``mac_fields`` covers after table and id, by name (what `db adopt` shows).
_COLUMNS: dict[type[RowMac], tuple[str, ...]] = {
    AccessToken: ("name", "token_hash", "scopes", "can_rotate", "expires_at", "revoked_at"),
    Cluster: ("name", "open_api_url", "key_pattern", "options"),
    Host: (
        "cluster_id",
        "address",
        "port",
        "username",
        "identity_file",
        "become",
        "ta_user",
        "host_key_fingerprint",
    ),
    Webhook: ("url", "scopes", "created_at", "removed_at"),
    RotationPolicy: ("cluster_id", "target", "max_age_seconds", "window"),
    ScopeSchedule: ("cluster_id", "scope", "consecutive_failures", "next_attempt_at", "paused_at"),
}


def shown(row: RowMac) -> str:
    """The row and every column its MAC would cover, control characters escaped."""
    values = mac_fields(row)[2:]
    columns = ", ".join(
        f"{name}={value!r}" for name, value in zip(_COLUMNS[type(row)], values, strict=True)
    )
    return printable(f"{describe(row)}: {columns}")


def _eligible_ids(session: Session) -> dict[type[RowMac], list[int | str]] | None:
    """The ids each table may still adopt, or None once adoption is over for the store.

    Over: a table without its record (a writer deleted it), a record closed, or a row the
    upgrade found without a MAC carries one now (adoption ran; a writer reset the record).
    """
    records = {r.table_name: r for r in session.scalars(select(RowMacAdoption))}
    eligible: dict[type[RowMac], list[int | str]] = {}
    for model in MAC_MODELS:
        table: Any = model  # the mixin declares no id or __tablename__; every model has both
        record = records.get(table.__tablename__)
        if record is None or record.closed_at is not None:
            return None
        ids = [i for i in json.loads(record.row_ids) if isinstance(i, int | str)]  # rotations: str
        eligible[model] = ids
        macs = (
            select(func.count()).select_from(table).where(table.id.in_(ids), table.mac.is_not(None))
        )
        if ids and session.scalar(macs):
            return None
    return eligible


def adoptable(session: Session) -> list[RowMac] | None:
    """The rows adoption would MAC now, or None when the store has been adopted already."""
    eligible = _eligible_ids(session)
    if eligible is None:
        return None
    rows: list[RowMac] = []
    for model, ids in eligible.items():
        if ids:
            table: Any = model
            query = select(table).where(table.id.in_(ids), table.mac.is_(None))
            rows.extend(session.scalars(query.order_by(table.id)))
    return rows


def adopt(session: Session, *, keyring: crypto.Keyring, only: set[str] | None = None) -> list[str]:
    """MAC the rows the upgrade to row MACs found without one, then close adoption for good.

    Trust on first use, once: the rows are taken as they stand now. ``only`` (``describe``
    of each row an operator confirmed) limits it to those. No other row is ever adopted: a
    row inserted, or stripped of its MAC, later stays refused.
    """
    rows = adoptable(session)
    if rows is None:
        raise IntegrityError(
            "this store's rows were adopted already; rows without a MAC are never adopted again",
            what="database",
            hint="`keyvault db check --integrity` names them: restore each from a backup, or "
            "re-create it (an operator holding the master key file MACs it)",
        )
    live = live_keyring(session, keyring)
    adopted = []
    for row in rows:
        if only is None or describe(row) in only:
            _set(row, live, live.active)
            adopted.append(describe(row))
    now = utcnow()
    for record in session.scalars(select(RowMacAdoption)):
        record.closed_at = now
    session.flush()
    return adopted
