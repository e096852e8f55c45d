"""Steps 4-7 of one rotation (PARSE acted on, STORE, CLEAN, VERIFY), shared by a batch
run and a recovery. Each returns the rotation's result so far, or raises its error."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keyvault import crypto
from keyvault.config import Settings
from keyvault.errors import (
    KeyvaultError,
    NeedsRecovery,
    ResolvedMeanwhile,
    RotationError,
    StoreFailed,
    TaToolMissing,
)
from keyvault.models import Cluster, Host
from keyvault.rotation_states import RotationState, is_unresolved
from keyvault.scope import Scope
from keyvault.services import spool
from keyvault.services.hosts import become_for
from keyvault.services.rotation.journal import Journal
from keyvault.services.rotation.pool import ConnectionPool, run_as_ta
from keyvault.services.rotation.results import RotationResult
from keyvault.services.rotation.verdict import Verdict, VerdictKind
from keyvault.services.verify import KeyCheckOutcome, check_previous_key, verify_scope_key
from keyvault.ssh import Connection
from keyvault.tahost import cleanup_script, parse_remote, raise_for_become

log = logging.getLogger("keyvault.rotation")
S = RotationState
StepHook = Callable[[str, str], None]


@dataclass(frozen=True)
class Runtime:
    """What every step of a run uses: settings, journal, connections and injections."""

    settings: Settings
    journal: Journal
    pool: ConnectionPool
    ta_client_factory: Callable[..., Any] | None = None
    # Injected by crash tests: called as on_step(step, rotation_id).
    on_step: StepHook = field(default=lambda step, rid: None)


# -- step 4: act on the verdict ---------------------------------------------------------------
def needs_recovery(rt: Runtime, rid: str, message: str, hint: str | None = None) -> NeedsRecovery:
    """Record ``needs_recovery`` (best effort: ``pending`` is unresolved too); the error to raise."""
    try:
        rt.journal.mark(rid, S.NEEDS_RECOVERY, error=message, event="rotation.failed")
    except KeyvaultError as exc:
        log.error("could not record needs_recovery for %s: %s", rid, exc)
    return NeedsRecovery(
        message, rotation_id=rid, hint=hint or f"run `keyvault rotations recover {rid}`"
    )


def _failed(rt: Runtime, rid: str, error: str, exc: KeyvaultError) -> KeyvaultError:
    rt.journal.mark(rid, S.FAILED, error=error, event="rotation.failed")
    return exc


def _pending_file(host: Host, rid: str) -> str:
    return f"~{host.ta_user}/.keyvault/pending/{rid}.out"


def key_or_raise(rt: Runtime, rid: str, verdict: Verdict, host: Host, pattern: str) -> str:
    """The key the verdict found; otherwise record why not (failed or needs_recovery) and raise."""
    if verdict.kind is VerdictKind.KEY and verdict.key is not None:
        return verdict.key
    label, shown = host.label, verdict.shown or "no output"
    kind = verdict.kind
    if kind is VerdictKind.TA_TOOL_FAILED:
        # ta-tool said it failed and printed nothing that looks like a key. Its output stays on
        # the host all the same: if the real tool ever prints a key in another format and exits
        # non-zero, that file is its only copy.
        message = (
            f"ta-tool failed on {label} (exit {verdict.rc}): {shown}; "
            f"its output is kept in {_pending_file(host, rid)}"
        )
        hint = "nothing was generated; fix the cause and rotate again"
        raise _failed(rt, rid, message, RotationError(message, rotation_id=rid, hint=hint))
    if kind is VerdictKind.NOT_FINISHED:
        message = f"ta-tool on {label} has not finished (no exit status, no key yet)"
        raise needs_recovery(rt, rid, message, f"wait, then run `keyvault rotations recover {rid}`")
    if kind in (VerdictKind.NO_KEY, VerdictKind.AMBIGUOUS):
        what = "no key" if kind is VerdictKind.NO_KEY else f"{verdict.candidates} candidate keys"
        message = f"ta-tool output on {label} has {what} matching {pattern}: {shown}"
        hint = "the key is kept on the host; fix the cluster's --key-pattern if needed, then run "
        raise needs_recovery(rt, rid, message, hint + f"`keyvault rotations recover {rid}`")
    raise _not_run_or_lost(rt, rid, verdict, host)


def _not_run_or_lost(rt: Runtime, rid: str, verdict: Verdict, host: Host) -> KeyvaultError:
    """The error of a report without a result: ta-tool did not run, or the report was lost."""
    label, kind = host.label, verdict.kind
    if kind is VerdictKind.NO_PENDING_DIR:
        message = f"cannot create ~{host.ta_user}/.keyvault/pending on {label}"
        hint = "nothing was generated; check that ta's home exists, is ta's and is not full"
        return _failed(rt, rid, message, RotationError(message, rotation_id=rid, hint=hint))
    if kind is VerdictKind.TA_TOOL_MISSING:
        message = f"ta-tool is not on the PATH of the ta user on {label}"
        missing = TaToolMissing(
            message, host=label, hint="nothing was generated; fix ta's login PATH"
        )
        return _failed(rt, rid, "ta-tool not found", missing)
    if kind is VerdictKind.ALREADY_CLAIMED:
        return _already_claimed(rt, rid, label)
    if kind is VerdictKind.BECOME_FAILED:
        try:
            raise_for_become(verdict.tail, label, become_for(host))
        except KeyvaultError as exc:
            return _failed(rt, rid, str(exc), exc)
    return needs_recovery(
        rt,
        rid,
        f"the connection to {label} was lost after ta-tool may have started; the key, if any, "
        f"is kept in {_pending_file(host, rid)} on the host",
    )


def _already_claimed(rt: Runtime, rid: str, label: str) -> KeyvaultError:
    state = rt.journal.state_of(rid)
    if not is_unresolved(state):
        # `rotations recover` found no pending file and claimed the id first: ta-tool did not run.
        return RotationError(
            f"rotation {rid} was resolved ({state}) by a recovery before ta-tool could run "
            f"on {label}; ta-tool did not run",
            rotation_id=rid,
            hint="nothing was generated; rotate again",
        )
    return needs_recovery(rt, rid, f"a pending file for rotation {rid} already exists on {label}")


# -- step 5 ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NewKey:
    """A key ta-tool generated, and where it belongs."""

    rid: str
    cluster: Cluster
    scope: Scope
    key: str = field(repr=False)
    actor: str
    host_label: str


def store_or_spool(
    rt: Runtime, keyring: crypto.Keyring, new: NewKey, verified: KeyCheckOutcome | None = None
) -> RotationResult:
    """Step 5; if the commit fails, the key goes to the local spool first, then the error."""
    try:
        result = rt.journal.store(
            new.rid,
            keyring=keyring,
            cluster=new.cluster,
            scope=new.scope,
            key=new.key,
            actor=new.actor,
            verified=verified,
            on_sealed=lambda: rt.on_step("sealed", new.rid),
        )
    except ResolvedMeanwhile:
        raise  # the row holds another key, stored by a concurrent recovery
    except Exception as exc:  # noqa: BLE001 - any other failure (even the row gone): the key must go somewhere durable first
        failed = _spool(rt, keyring, new, exc)
        applied = _applied_anyway(rt, new)
        if applied is None:
            raise failed from None
        result = applied.warn(
            f"the database reported an error on commit ({exc}), but the key is stored"
        )
    try:
        spool.remove_spool(rt.settings, new.rid)
    except OSError as exc:  # committed already: a stale spool file is harmless, recover skips it
        result = result.warn(f"could not delete the spool file of {new.rid}: {exc.strerror}")
    return result


def _applied_anyway(rt: Runtime, new: NewKey) -> RotationResult | None:
    """After a failed commit, the row if that commit was applied all the same: a COMMIT can
    succeed while its reply is lost (connection cut), and the key is then stored, not lost."""
    try:
        return rt.journal.stored_with(new.rid, crypto.fingerprint(new.key))
    except Exception:  # noqa: BLE001 - the database is still away: the spool holds the key
        return None


def _spool(rt: Runtime, keyring: crypto.Keyring, new: NewKey, exc: Exception) -> StoreFailed:
    cluster_name, rid = new.cluster.name, new.rid
    try:
        path = spool.write_spool(
            rt.settings,
            keyring,
            rotation_id=rid,
            cluster=cluster_name,
            scope=str(new.scope),
            key=new.key,
        )
    except Exception as spool_exc:  # noqa: BLE001
        return StoreFailed(
            f"THE NEW KEY OF {new.scope} IN {cluster_name} WAS NOT STORED ({exc}) and the spool failed too "
            f"({type(spool_exc).__name__}); it is still in the pending file on {new.host_label}",
            rotation_id=rid,
            hint=f"do not rotate again; fix the database, then `keyvault rotations recover {rid}`",
        )
    try:
        error = f"store failed: {exc}; key spooled at {path}"
        rt.journal.mark(rid, S.NEEDS_RECOVERY, error=error, event="rotation.failed")
    except Exception:  # noqa: BLE001 - the database is what failed; the spool says it all
        log.warning("could not record needs_recovery for %s", rid)
    return StoreFailed(
        f"THE NEW KEY OF {new.scope} IN {cluster_name} COULD NOT BE STORED ({exc}); it is safe, encrypted, "
        f"in {path}",
        rotation_id=rid,
        hint=f"fix the database, then run `keyvault rotations recover {rid}`",
    )


# -- steps 6 and 7 -----------------------------------------------------------------------------
def cleanup_now(
    rt: Runtime, conn: Connection, host: Host, rid: str, result: RotationResult
) -> RotationResult:
    """Step 6 at once: delete the pending file (a failure is a warning: recover retries)."""
    ran = run_as_ta(conn, host, cleanup_script(rid), rt.settings)
    if ran is None or parse_remote(rid, ran.output).state != "cleaned":
        return result.warn(
            f"could not delete the pending file on {host.label}; `keyvault rotations recover {rid}` retries"
        )
    rt.journal.record_cleaned([rid])
    return result.cleaned()


def verify_and_record(
    rt: Runtime, cluster: Cluster, scope: Scope, key: str, result: RotationResult
) -> RotationResult:
    """Step 7: call TA with the new key, then record the outcome (never discards the key)."""
    # The TA call happens outside any transaction: on SQLite a transaction holds the
    # write lock, and bulk runs must not queue their commits behind a slow TA.
    checked = verify_scope_key(
        cluster, scope, key, settings=rt.settings, client_factory=rt.ta_client_factory
    )
    assert result.rotation_id is not None
    state = rt.journal.record_verification(result.rotation_id, checked, crypto.fingerprint(key))
    # Propagation: then the previous key, which TA must refuse (recorded as ``old_key``).
    old_key, outcome = check_previous_key(
        rt.journal.factory, result.rotation_id, cluster, scope, result.old_version, checked,
        settings=rt.settings, client_factory=rt.ta_client_factory,
    )  # fmt: skip
    rt.journal.record_old_key(result.rotation_id, old_key, outcome, result.old_version)
    return result.with_(
        state=state, verify_state=checked.state, verify_message=checked.message, old_key=old_key
    )
