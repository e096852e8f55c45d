"""Finishing interrupted rotations (`keyvault rotations recover`) and giving them up.

Recovery never runs ta-tool again: the key comes from the local spool or from the
pending file on the host the rotation ran on (see docs/rotation.md, "Recovery").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import or_, select

from keyvault import crypto
from keyvault.db import transaction
from keyvault.errors import (
    InvalidInput,
    KeyvaultError,
    NotFound,
    RotationError,
    RowIntegrityError,
)
from keyvault.models import UNRESOLVED_ROTATION_STATES, Cluster, Host, Rotation
from keyvault.rotation_states import RotationState, is_unresolved
from keyvault.scope import Scope, parse_scope
from keyvault.services import integrity, spool
from keyvault.services.clusters import get_cluster
from keyvault.services.hosts import ssh_target
from keyvault.services.rotation.pool import run_as_ta
from keyvault.services.rotation.results import RotationResult
from keyvault.services.rotation.steps import (
    NewKey,
    Runtime,
    cleanup_now,
    key_or_raise,
    store_or_spool,
    verify_and_record,
)
from keyvault.services.rotation.verdict import VerdictKind, read_verdict
from keyvault.services.secrets import get_version, reveal
from keyvault.services.store import open_keyring
from keyvault.ssh import Connection
from keyvault.tahost import fetch_script, find_keys, parse_remote

S = RotationState
FINISHED = (S.COMPLETED, S.FAILED, S.ABANDONED)
# A `stored` rotation untouched this long is not being finished by its own run any more:
# the scheduler settles it (clean-up, check), and `keyvault status` reports it an hour later.
SETTLE_AFTER = timedelta(minutes=15)


def check_routing(rotation: Rotation, *, keyring: crypto.Keyring) -> None:
    """Refuse a rotation whose row cannot be trusted to say where its key goes.

    Before any host is asked for a key or any key is stored or sent to an Open API URL:
    the rotation row's MAC (its id, cluster, scope, host and creation time), its cluster's
    and host's MACs, and the host belonging to the rotation's cluster (the host's MAC covers
    its cluster). A refusal leaves the pending file on the TA host and the spool untouched.
    """
    integrity.check_rows(rotation, rotation.cluster, rotation.host, keyring=keyring)
    host = rotation.host
    if host is not None and host.cluster_id != rotation.cluster_id:
        what = integrity.describe(rotation)
        raise RowIntegrityError(
            f"integrity check failed for {what}: its host {host.label} belongs to another "
            "cluster than the rotation; it is not used",
            what=what,
            hint="the key is untouched on the rotation's TA host; restore the rotations row "
            "from a backup, then recover again",
        )


@dataclass(frozen=True)
class _Loaded:
    """A rotation as read from the journal before recovering it."""

    keyring: crypto.Keyring = field(repr=False)
    cluster: Cluster
    scope: Scope
    host: Host | None
    result: RotationResult


class Recovery:
    """Recover one or every interrupted rotation; abandon one."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def _load(self, rid: str) -> _Loaded:
        with transaction(self.rt.journal.factory) as s:
            rotation = s.get(Rotation, rid)
            if rotation is None:
                raise NotFound(f"no rotation {rid!r}", hint="see `keyvault rotations list`")
            keyring = open_keyring(s, settings=self.rt.settings)
            check_routing(rotation, keyring=keyring)
            scope = parse_scope(rotation.scope, r".+")
            result = RotationResult.of_row(rotation)
            return _Loaded(keyring, rotation.cluster, scope, rotation.host, result)

    def recover(self, rid: str, *, actor: str) -> RotationResult:
        """Complete an interrupted rotation from the local spool or the remote pending file."""
        loaded = self._load(rid)
        result, state = loaded.result, loaded.result.state or ""
        spooled = spool.read_spool(self.rt.settings, loaded.keyring, rid)
        if spooled is not None and not is_unresolved(state):
            result = self._drop_stored_spool(loaded, spooled.key, result)
        if state in FINISHED:
            return result.warn(f"rotation {rid} is already {state}; nothing to do")
        key: str | None = None
        if spooled is not None and is_unresolved(state):
            new = NewKey(rid, loaded.cluster, loaded.scope, spooled.key, actor, result.host or "")
            result, key = store_or_spool(self.rt, loaded.keyring, new), spooled.key
        host = loaded.host
        if host is None:
            raise InvalidInput(
                f"the host of rotation {rid} was removed", hint="re-add it, then recover again"
            )
        conn = self.rt.pool.connector.connect(ssh_target(host, self.rt.settings))
        try:
            if key is None and is_unresolved(state):
                fetched = self._from_host(conn, host, loaded, actor)
                if fetched is None:
                    return self._never_ran(rid, host, result)
                key, result = fetched
            if key is None:  # stored earlier: the key is in the database
                key = self._stored_key(loaded, result.new_version)
            result = cleanup_now(self.rt, conn, host, rid, result)
        finally:
            conn.close()
        return verify_and_record(self.rt, loaded.cluster, loaded.scope, key, result)

    def _drop_stored_spool(
        self, loaded: _Loaded, key: str, result: RotationResult
    ) -> RotationResult:
        """Delete a spool file whose key is stored: the version the rotation row names,
        decrypted, is that very key (the row alone is not trusted with a key's only copy).

        A commit can succeed while its caller sees an error (the connection cut between the
        commit and its reply): the key was spooled, and the row says ``stored`` with that
        very key. Any other spool file of a resolved rotation is kept and reported."""
        rid = result.rotation_id or ""
        fingerprint = crypto.fingerprint(key)
        stored = (
            result.state in (S.STORED, S.COMPLETED)
            and result.new_fingerprint == fingerprint
            and self._holds(loaded, result.new_version, key)
        )
        if not stored:
            raise RotationError(
                f"rotation {rid} is {result.state} but the local spool holds a key "
                f"({fingerprint}) that is not its stored one",
                rotation_id=rid,
                hint=f"keep {spool.spool_path(self.rt.settings, rid)}; compare it with "
                "`keyvault secrets history` and TA before removing it",
            )
        spool.remove_spool(self.rt.settings, rid)
        return result.warn(
            f"removed the spool file of {rid}: its key is stored (version {result.new_version})"
        )

    def _from_host(
        self, conn: Connection, host: Host, loaded: _Loaded, actor: str
    ) -> tuple[str, RotationResult] | None:
        """The key in the host's pending file, stored; None when ta-tool never ran."""
        rid = loaded.result.rotation_id or ""
        ran = run_as_ta(conn, host, fetch_script(rid), self.rt.settings)
        remote = parse_remote(rid, ran.output if ran else b"")
        verdict = read_verdict(remote, ran.exit_status if ran else None, loaded.cluster.key_pattern)
        if verdict.kind is VerdictKind.ABSENT:
            return None
        if verdict.kind is VerdictKind.CLEANED:
            raise RotationError(
                f"the pending file of {rid} was deleted but the key is not stored",
                rotation_id=rid,
                hint="check `keyvault secrets history`; then rotate again",
            )
        key = key_or_raise(self.rt, rid, verdict, host, loaded.cluster.key_pattern)
        new = NewKey(rid, loaded.cluster, loaded.scope, key, actor, host.label)
        return key, store_or_spool(self.rt, loaded.keyring, new)

    def _never_ran(self, rid: str, host: Host, result: RotationResult) -> RotationResult:
        message = f"no pending file for rotation {rid} on {host.label}: ta-tool never ran for it"
        self.rt.journal.mark(rid, S.FAILED, error=message, event=None)
        return result.with_(state=S.FAILED.value).warn(
            message + "; nothing was generated, rotate again"
        )

    def _holds(self, loaded: _Loaded, number: int | None, key: str) -> bool:
        """Whether version ``number`` of the scope decrypts to ``key`` (missing: it does not)."""
        try:
            return self._stored_key(loaded, number) == key
        except KeyvaultError:  # deleted, altered or unreadable: keep the spooled copy
            return False

    def _stored_key(self, loaded: _Loaded, number: int | None) -> str:
        with transaction(self.rt.journal.factory) as s:
            version = get_version(
                s, cluster_name=loaded.cluster.name, scope=loaded.scope, number=number
            )
            return reveal(loaded.keyring, version)

    def recover_all(self, *, actor: str, cluster_name: str | None = None) -> list[RotationResult]:
        """Recover every unresolved rotation, and every stored one not yet cleaned up.

        For after a crash or a dropped bulk run. Safe even while a run is still going: a
        recovery can only make its not-yet-started rotations fail, never lose a key.
        Oldest first; one rotation's trouble never stops the others.
        """
        states = (*UNRESOLVED_ROTATION_STATES, S.STORED.value)
        todo = self._todo(states, cluster_name, None, spool.spooled_rotations(self.rt.settings))
        return self._recover_each(todo, actor)

    def settle_stored(
        self, *, actor: str, stored_before: datetime, cluster_name: str | None = None
    ) -> list[RotationResult]:
        """Finish the ``stored`` rotations last touched before ``stored_before``.

        Their key is committed, but a process died before the clean-up or the check: the
        pending file on the TA host (a copy of the current key) is still there. Only old
        ones are taken, so a run still finishing its own rotations is left alone (and a
        clean-up or check done twice is harmless). Unresolved rotations are not touched:
        one may still be running; they are the operator's (`rotations recover`).
        """
        todo = self._todo((S.STORED.value,), cluster_name, stored_before)
        return self._recover_each(todo, actor)

    def _todo(
        self,
        states: tuple[str, ...],
        cluster_name: str | None,
        updated_before: datetime | None,
        spooled: Sequence[str] = (),
    ) -> list[tuple[str, str, str]]:
        """The rotations in ``states`` (or with a spool file, whatever their state)."""
        with transaction(self.rt.journal.factory) as s:
            wanted = Rotation.state.in_(states)
            stmt = select(Rotation).where(or_(wanted, Rotation.id.in_(list(spooled))))
            if cluster_name is not None:
                stmt = stmt.where(Rotation.cluster_id == get_cluster(s, name=cluster_name).id)
            if updated_before is not None:
                stmt = stmt.where(Rotation.updated_at < updated_before)
            rows = s.scalars(stmt.order_by(Rotation.created_at, Rotation.id))
            return [(r.id, r.cluster.name, r.scope) for r in rows]

    def _recover_each(self, todo: list[tuple[str, str, str]], actor: str) -> list[RotationResult]:
        results = []
        for rid, cluster, scope in todo:
            try:
                results.append(self.recover(rid, actor=actor))
            except Exception as exc:  # noqa: BLE001 - one rotation's trouble never stops the others
                results.append(RotationResult.failed(cluster, scope, exc, rid))
        return results

    def abandon(self, rid: str, *, reason: str) -> None:
        """Give up an unresolved rotation (the operator chose to regenerate).

        Refused while the rotation's host still holds a parseable key for it, or a
        spooled key exists: that key is the valid one and must be recovered instead.
        """
        with transaction(self.rt.journal.factory) as s:
            rotation = s.get(Rotation, rid)
            if rotation is None or not is_unresolved(rotation.state):
                raise InvalidInput(f"rotation {rid} is not unresolved")
            host, pattern = rotation.host, rotation.cluster.key_pattern
            keyring = open_keyring(s, settings=self.rt.settings)
            check_routing(rotation, keyring=keyring)
        if spool.read_spool(self.rt.settings, keyring, rid) is not None:
            raise RotationError(
                f"rotation {rid} has a key in the local spool",
                rotation_id=rid,
                hint=f"run `keyvault rotations recover {rid}` without --regenerate",
            )
        if host is not None and self._host_holds_key(host, rid, pattern):
            raise RotationError(
                f"the host {host.label} holds the key ta-tool generated for rotation {rid}; it is the valid one",
                rotation_id=rid,
                hint=f"run `keyvault rotations recover {rid}` without --regenerate",
            )
        self.rt.journal.abandon(rid, reason)

    def _host_holds_key(self, host: Host, rid: str, pattern: str) -> bool:
        conn = self.rt.pool.connector.connect(ssh_target(host, self.rt.settings))
        try:
            ran = run_as_ta(conn, host, fetch_script(rid), self.rt.settings)
        finally:
            conn.close()
        remote = parse_remote(rid, ran.output if ran else b"")
        return remote.state == "result" and len(find_keys(remote.output, pattern)) == 1
