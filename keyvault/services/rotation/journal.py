"""The rotation journal: the one module that writes ``rotations`` rows.

Each write is its own transaction (rotation commits in named steps, see the package
doc) and every change of state goes through ``rotation_states.check_transition``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.db import transaction
from keyvault.errors import (
    InvalidInput,
    KeyvaultError,
    LeaseLost,
    NotFound,
    PreconditionFailed,
    ResolvedMeanwhile,
    RotationError,
    RotationUnresolved,
)
from keyvault.events import record_event
from keyvault.models import (
    CURRENT,
    UNRESOLVED_ROTATION_STATES,
    Cluster,
    Host,
    Rotation,
    Secret,
    SecretVersion,
    utcnow,
)
from keyvault.rotation_states import RotationState, check_transition, is_unresolved
from keyvault.scope import Scope
from keyvault.services import integrity
from keyvault.services.rotation.results import RotationResult
from keyvault.services.secrets import store_version
from keyvault.services.store import live_keyring
from keyvault.services.verify import OLD_KEY_ACCEPTED, OLD_KEY_EVENT, KeyCheckOutcome

log = logging.getLogger("keyvault.rotation")
SessionFactory = Callable[[], Session]
S = RotationState
# Called with the scope's current version number (None: no key yet) once the rotation holds
# its scope (the pending row); raises ``PreconditionFailed`` to refuse it (HTTP If-Match).
Precondition = Callable[[int | None], None]
# A lease's check in the journal's own transaction (``LeaseKeeper.guard``).
Fence = Callable[[Session], bool]


def unresolved_error(other: Rotation, cluster_name: str, scope: Scope | str) -> RotationUnresolved:
    """Why a new rotation of ``scope`` may not start while ``other`` is unresolved."""
    return RotationUnresolved(
        f"rotation {other.id} of {scope} in {cluster_name} is {other.state} "
        f"(started {other.created_at:%Y-%m-%d %H:%M:%S} UTC by {other.actor} on {other.host_label})",
        rotation_id=other.id,
        hint=f"if it is still running, wait; otherwise run `keyvault rotations recover {other.id}`",
    )


def unresolved_of(s: Session, cluster_id: int, scopes: Iterable[str]) -> dict[str, Rotation]:
    """The unresolved rotation of each of ``scopes`` that has one, by scope."""
    stmt = select(Rotation).where(
        Rotation.cluster_id == cluster_id,
        Rotation.scope.in_(list(scopes)),
        Rotation.state.in_(UNRESOLVED_ROTATION_STATES),
    )
    return {r.scope: r for r in s.scalars(stmt)}


def _current_number(s: Session, cluster_id: int, scope: Scope) -> int | None:
    """The number of the scope's current version, if it has one."""
    return s.scalar(
        select(SecretVersion.number)
        .join(Secret, SecretVersion.secret_id == Secret.id)
        .where(
            Secret.cluster_id == cluster_id,
            Secret.scope == str(scope),
            SecretVersion.state == CURRENT,
        )
    )


def _locked(s: Session, rid: str) -> Rotation:
    rotation = s.scalar(select(Rotation).where(Rotation.id == rid).with_for_update(of=Rotation))
    if rotation is None:
        raise RotationError(f"rotation {rid} is not in the journal", rotation_id=rid)
    return rotation


def _set_state(rotation: Rotation, state: RotationState) -> None:
    rotation.state = check_transition(rotation.id, rotation.state, state)
    rotation.updated_at = utcnow()


class Journal:
    """Writes of the rotation rows, each in its own committed transaction."""

    def __init__(self, factory: SessionFactory) -> None:
        self.factory = factory

    def state_of(self, rid: str) -> str:
        with transaction(self.factory) as s:
            return _get(s, rid).state

    def create_pending(
        self,
        jobs: list[tuple[str, Scope]],
        cluster: Cluster,
        host: Host,
        actor: str,
        precondition: Precondition | None = None,
        *,
        keyring: crypto.Keyring,
        fence: Fence | None = None,
    ) -> dict[str, KeyvaultError]:
        """Step 2: commit a ``pending`` row per (rotation id, scope); returns the refused, by id.

        Each row is MACed (``integrity.seal_row``, under the live master key of its own
        transaction) over its id, cluster, scope, host and creation time: recovery routes
        the key by these and refuses a row whose MAC fails.

        ``precondition`` is checked in the row's own transaction, after its insert: the
        partial unique index serialises rotations of a scope, so a concurrent rotation either
        makes this insert fail (409) or has committed its new version before this check reads
        it (PostgreSQL's read committed: the insert waited for it; SQLite: BEGIN IMMEDIATE).

        ``fence(session)`` (the scheduler's lease) is asked in each row's own transaction,
        before its insert: False raises ``LeaseLost`` and journals nothing more. A check in an
        earlier transaction is not enough: a runner that stalls after it (GC, SIGSTOP) would
        journal, from a stale plan, a scope the lease's next holder has rotated meanwhile.
        """
        now = utcnow()

        def add(s: Session, rid: str, scope: Scope) -> None:
            if fence is not None and not fence(s):
                raise LeaseLost("this runner lost its lease: no rotation started")
            row = Rotation(id=rid, cluster_id=cluster.id, scope=str(scope), state=S.PENDING.value)
            row.host_id, row.host_label, row.actor = host.id, host.label, actor
            row.created_at = row.updated_at = now
            s.add(row)
            integrity.seal_row(s, row, keyring=keyring)  # flushes it
            if precondition is not None:
                s.flush()  # the scope is ours (or the insert failed) before the version is read
                precondition(_current_number(s, cluster.id, scope))

        if len(jobs) > 1:
            try:
                with transaction(self.factory) as s:
                    for rid, scope in jobs:
                        add(s, rid, scope)
                return {}
            except LeaseLost:
                raise
            except KeyvaultError:
                pass  # another process took one of the scopes meanwhile: one by one tells which
        refused: dict[str, KeyvaultError] = {}
        for rid, scope in jobs:
            try:
                with transaction(self.factory) as s:
                    add(s, rid, scope)
            except PreconditionFailed as exc:
                refused[rid] = exc
            except LeaseLost:
                raise
            except KeyvaultError as exc:
                refused[rid] = self._why_refused(exc, cluster, scope)
        return refused

    def _why_refused(self, exc: KeyvaultError, cluster: Cluster, scope: Scope) -> KeyvaultError:
        try:
            with transaction(self.factory) as s:
                other = unresolved_of(s, cluster.id, [str(scope)]).get(str(scope))
        except KeyvaultError as unreadable:
            return unreadable
        return exc if other is None else unresolved_error(other, cluster.name, scope)

    def mark(self, rid: str, state: RotationState, *, error: str, event: str | None) -> None:
        """Record a ``failed`` or ``needs_recovery`` verdict, unless resolved meanwhile.

        Another process (a bulk run and a `recover --all`, say) may have stored the key
        between our look at the host and this write: a stored rotation is never demoted.
        """
        with transaction(self.factory) as s:
            rotation = _locked(s, rid)
            if not is_unresolved(rotation.state):
                log.warning(
                    "rotation %s is %s already; not marking it %s", rid, rotation.state, state
                )
                return
            _set_state(rotation, state)
            rotation.error = error
            if event:
                payload = {"rotation_id": rid, "cluster": rotation.cluster.name}
                payload |= {"scope": rotation.scope, "state": state.value, "error": error}
                payload["host"] = rotation.host_label
                record_event(
                    s,
                    kind=event,
                    cluster=rotation.cluster.name,
                    scope=rotation.scope,
                    payload=payload,
                )

    def store(
        self,
        rid: str,
        *,
        keyring: crypto.Keyring,
        cluster: Cluster,
        scope: Scope,
        key: str,
        actor: str,
        verified: KeyCheckOutcome | None,
        on_sealed: Callable[[], None] | None = None,
    ) -> RotationResult:
        """Step 5 in one transaction: the new current version, its event, the row ``stored``.

        A rotation resolved meanwhile (by a concurrent recovery) accepts only the same key.
        ``verified`` (a check known without TA, i.e. skipped) is recorded with it. The key
        is sealed under the live master key of this transaction (see ``store_version``),
        not necessarily ``keyring``'s; ``on_sealed`` runs before the commit (tests).
        """
        with transaction(self.factory) as s:
            # The live master key first, then the row: `master-key rotate` locks that key,
            # then re-MACs rotation rows; the other order would deadlock with it.
            keyring = live_keyring(s, keyring)
            rotation = _locked(s, rid)
            if not is_unresolved(rotation.state):
                if rotation.new_fingerprint != crypto.fingerprint(key):
                    raise ResolvedMeanwhile(
                        f"rotation {rid} was resolved meanwhile with another key", rotation_id=rid
                    )
                return RotationResult.of_row(rotation)
            stored = store_version(
                s,
                keyring=keyring,
                cluster=cluster,
                scope=scope,
                key=key,
                source="rotation",
                actor=actor,
                rotation_id=rid,
                on_sealed=on_sealed,
            )
            _set_state(rotation, S.STORED)
            rotation.old_version, rotation.new_version = stored.old_number, stored.number
            rotation.new_fingerprint, rotation.error = stored.fingerprint, None
            if verified is not None:
                _record_check(rotation, verified)
            return RotationResult.of_row(rotation).with_(old_fingerprint=stored.old_fingerprint)

    def stored_with(self, rid: str, fingerprint: str) -> RotationResult | None:
        """The rotation's result if its row records ``fingerprint`` as stored, else None."""
        with transaction(self.factory) as s:
            rotation = _get(s, rid)
            if is_unresolved(rotation.state) or rotation.new_fingerprint != fingerprint:
                return None
            return RotationResult.of_row(rotation)

    def record_cleaned(self, rids: list[str]) -> None:
        """Step 6 done for ``rids``: completed if also checked, else still ``stored``."""
        if not rids:
            return
        with transaction(self.factory) as s:
            for rotation in s.scalars(select(Rotation).where(Rotation.id.in_(rids))):
                rotation.cleaned_up = True
                checked = rotation.verify_state is not None
                _set_state(rotation, _after_stored(rotation.state, checked))

    def record_verification(self, rid: str, result: KeyCheckOutcome, fingerprint: str) -> str:
        """Step 7: the check's outcome (plus an event when it failed); returns the new state."""
        with transaction(self.factory) as s:
            rotation = _get(s, rid)
            _record_check(rotation, result)
            _set_state(rotation, _after_stored(rotation.state, bool(rotation.cleaned_up)))
            if result.state == "failed":
                payload: dict[str, Any] = {"rotation_id": rid, "cluster": rotation.cluster.name}
                payload |= {"scope": rotation.scope, "return_code": result.return_code}
                payload |= {"message": result.message, "fingerprint": fingerprint}
                record_event(
                    s,
                    kind="rotation.verification_failed",
                    cluster=rotation.cluster.name,
                    scope=rotation.scope,
                    payload=payload,
                )
            return rotation.state

    def record_old_key(
        self, rid: str, state: str, outcome: KeyCheckOutcome | None, old_version: int | None
    ) -> None:
        """Step 7, after the new key: whether TA refused the previous key (``old_key``). A key
        TA still accepts is an alert: logged and recorded as ``rotation.old_key_accepted``."""
        with transaction(self.factory) as s:
            rotation = _get(s, rid)
            rotation.old_key = state
            if state != OLD_KEY_ACCEPTED:
                return
            cluster, scope = rotation.cluster.name, rotation.scope
            log.error(
                "rotation %s: TA STILL ACCEPTS THE PREVIOUS KEY of %s in %s", rid, scope, cluster
            )
            payload: dict[str, Any] = {"rotation_id": rid, "cluster": cluster, "scope": scope}
            payload |= {"old_version": old_version, "message": outcome.message if outcome else ""}
            record_event(s, kind=OLD_KEY_EVENT, cluster=cluster, scope=scope, payload=payload)

    def abandon(self, rid: str, reason: str) -> None:
        """Give up an unresolved rotation (refused for any other)."""
        with transaction(self.factory) as s:
            rotation = s.get(Rotation, rid)
            if rotation is None or not is_unresolved(rotation.state):
                raise InvalidInput(f"rotation {rid} is not unresolved")
            _set_state(rotation, S.ABANDONED)
            rotation.error = reason


def claim_propagated(s: Session, rid: str, at: datetime) -> bool:
    """Set ``propagated_at`` of a rotation unless some process did before; True if this did.
    A conditional update, so concurrent claimers (several servers, a CLI wait) record it once."""
    claimed = s.execute(
        update(Rotation)
        .where(Rotation.id == rid, Rotation.propagated_at.is_(None))
        .values(propagated_at=at)
        .execution_options(synchronize_session=False)
    )
    return getattr(claimed, "rowcount", 0) == 1


def _get(s: Session, rid: str) -> Rotation:
    rotation = s.get(Rotation, rid)
    if rotation is None:
        raise RotationError(f"rotation {rid} is not in the journal", rotation_id=rid)
    return rotation


def _after_stored(state: str, done: bool) -> RotationState:
    """``stored`` until both clean-up and check are recorded, then ``completed``."""
    return S.COMPLETED if done or state == S.COMPLETED else S.STORED


def _record_check(rotation: Rotation, result: KeyCheckOutcome) -> None:
    rotation.verify_state, rotation.verify_code = result.state, result.return_code
    rotation.verify_message, rotation.verified_at = result.message, utcnow()


# -- reads for people (`keyvault rotations list|show`) -------------------------------------------
def list_rotations(
    s: Session, *, state: str | None = None, cluster_name: str | None = None, limit: int = 500
) -> list[Rotation]:
    """Rotations, newest first, optionally of one state or cluster."""
    stmt = select(Rotation).join(Cluster).order_by(Rotation.created_at.desc()).limit(limit)
    if state:
        stmt = stmt.where(Rotation.state == state)
    if cluster_name:
        stmt = stmt.where(Cluster.name == cluster_name)
    return list(s.scalars(stmt))


def get_rotation(s: Session, rid: str) -> Rotation:
    """One rotation, or ``NotFound``."""
    rotation = s.get(Rotation, rid)
    if rotation is None:
        raise NotFound(f"no rotation {rid!r}", hint="see `keyvault rotations list`")
    return rotation


def rotation_info(r: Rotation) -> dict[str, Any]:
    """A rotation row as plain data (no keys)."""
    return {
        "id": r.id,
        "cluster": r.cluster.name,
        "scope": r.scope,
        "state": r.state,
        "host": r.host_label,
        "actor": r.actor,
        "created_at": r.created_at.isoformat(),
        "updated_at": r.updated_at.isoformat(),
        "old_version": r.old_version,
        "new_version": r.new_version,
        "new_fingerprint": r.new_fingerprint,
        "cleaned_up": bool(r.cleaned_up),
        "verify_state": r.verify_state,
        "verify_code": r.verify_code,
        "verify_message": r.verify_message,
        "error": r.error,
    }
