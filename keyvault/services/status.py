"""`keyvault status`: is anything waiting for a person? Each finding says what to do.

Checks, in order: the schema (at head?), the spool (keys waiting to be stored), the
keyring (does the master key open the store?), project id mappings that are invalid
(stored before they were validated), rotations left unresolved, previous keys TA still
accepted after a scope's last rotation (docs/propagation.md), scopes the
scheduler paused, the scheduler's last completed run (when policies exist), keys older
than their policy allows, tokens about to expire (or
expired and not revoked) and webhook deliveries dead-lettered recently. When the schema
or the keyring fail, the later checks are skipped: their answers would mean nothing.

Like `initialise`, this is an entrypoint-level read: it owns its one (read-only)
transaction, because it checks the files beside the database too.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from keyvault.config import Settings
from keyvault.db import SCHEMA_HEAD, require_head, session_factory, transaction
from keyvault.errors import KeyvaultError
from keyvault.models import (
    ROTATE_DUE_LEASE,
    UNRESOLVED_ROTATION_STATES,
    AccessToken,
    Cluster,
    Lease,
    Rotation,
    RotationPolicy,
    ScopeSchedule,
    Webhook,
    WebhookDelivery,
)
from keyvault.services import leases
from keyvault.services.clusters import cluster_options, list_clusters, validate_project_id
from keyvault.services.policies import candidates
from keyvault.services.propagation import old_keys_accepted
from keyvault.services.rotation import SETTLE_AFTER
from keyvault.services.spool import spooled_rotations
from keyvault.services.store import open_keyring

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

OK = "ok"
ATTENTION = "attention"
SKIPPED = "skipped"
DEFAULT_TOKEN_DAYS = 14
DEFAULT_SCHEDULER_HOURS = 24
# Dead deliveries older than this were seen (and either fixed or accepted) already.
DEAD_DELIVERY_WINDOW = timedelta(days=7)


@dataclass(frozen=True)
class Finding:
    """One line of the status: a check, its state, what was found and what to do."""

    check: str
    status: str  # ok, attention or skipped
    detail: str
    action: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class StatusReport:
    findings: list[Finding]

    @property
    def needs_attention(self) -> bool:
        return any(f.status == ATTENTION for f in self.findings)

    def as_dict(self) -> dict[str, object]:
        return {
            "ok": not self.needs_attention,
            "findings": [f.as_dict() for f in self.findings],
        }


def collect_status(
    engine: Engine,
    *,
    settings: Settings,
    now: datetime,
    token_days: int = DEFAULT_TOKEN_DAYS,
    scheduler_hours: int = DEFAULT_SCHEDULER_HOURS,
) -> StatusReport:
    """Run every check; a failing schema or keyring skips the checks that need them."""
    findings = [check_schema(engine)]
    if findings[0].status != OK:
        return StatusReport([*findings, _skipped("keyring, rotations, keys, tokens, webhooks")])
    findings += check_spool(settings)
    with transaction(session_factory(engine)) as session:
        keyring = check_keyring(session, settings=settings)
        findings.append(keyring)
        if keyring.status == OK:
            findings += check_project_ids(session, appid_pattern=settings.appid_pattern)
            findings += check_rotations(session, now=now)
            findings += check_old_keys(session)  # propagation (services/propagation.py)
            findings += check_paused(session)
            findings.append(check_scheduler(session, now=now, hours=scheduler_hours))
            findings += check_key_ages(session, now=now)
            findings += check_tokens(session, now=now, days=token_days)
            findings += check_webhooks(session, now=now)
            findings.append(check_leases(session))
        else:
            findings.append(_skipped("rotations, keys, tokens, webhooks"))
    return StatusReport(findings)


def _skipped(what: str) -> Finding:
    return Finding("rest", SKIPPED, f"not checked: {what}", "fix the problems above first")


def _ok_or(check: str, problems: list[Finding], fine: str) -> list[Finding]:
    return problems or [Finding(check, OK, fine)]


def check_schema(engine: Engine) -> Finding:
    """The database is reachable and its schema is at this keyvault's head."""
    try:
        require_head(engine)
    except KeyvaultError as exc:
        return Finding("schema", ATTENTION, exc.message, exc.hint or "")
    return Finding("schema", OK, f"at head {SCHEMA_HEAD}")


def check_keyring(session: Session, *, settings: Settings) -> Finding:
    """The keyring file opens the store."""
    try:
        keyring = open_keyring(session, settings=settings)
    except KeyvaultError as exc:
        return Finding("keyring", ATTENTION, exc.message, exc.hint or "")
    return Finding("keyring", OK, f"master key {keyring.active} opens the store")


def check_spool(settings: Settings) -> list[Finding]:
    """No generated key is waiting in the local spool."""
    problems = [
        Finding(
            "spool",
            ATTENTION,
            f"rotation {rid} has a new key waiting in {settings.spool_dir}",
            f"run `keyvault rotations recover {rid}` to store it",
        )
        for rid in spooled_rotations(settings)
    ]
    return _ok_or("spool", problems, "no key waiting")


def check_project_ids(session: Session, *, appid_pattern: str) -> list[Finding]:
    """No cluster maps an invalid APPID (stored before mappings were validated): every
    `rotate app --all` and `rotate due` of that cluster would fail on it."""
    problems = []
    for cluster in list_clusters(session):
        for appid, project_id in cluster_options(cluster)["project_ids"].items():
            try:
                validate_project_id(appid, project_id, appid_pattern)
            except KeyvaultError as exc:
                problems.append(
                    Finding(
                        "project_ids",
                        ATTENTION,
                        f"cluster {cluster.name}: {exc.message}",
                        f"`keyvault cluster set {cluster.name} --remove-project-id {shlex.quote(appid)}`, "
                        "then map it again with a valid --project-id APPID=N",
                    )
                )
    return _ok_or("project_ids", problems, "every APPID -> project id mapping is valid")


def check_rotations(session: Session, *, now: datetime) -> list[Finding]:
    """No rotation is left pending or needing recovery, nor stored but never settled.

    A ``stored`` rotation still has its pending file (a copy of the current key) on the TA
    host, or was never checked against TA; the scheduler settles those older than
    ``SETTLE_AFTER``, so one older than an hour past that is stuck.
    """
    stuck_before = now - SETTLE_AFTER - timedelta(hours=1)
    rows = session.scalars(
        select(Rotation)
        .where(
            or_(
                Rotation.state.in_(UNRESOLVED_ROTATION_STATES),
                (Rotation.state == "stored") & (Rotation.updated_at < stuck_before),
            )
        )
        .order_by(Rotation.created_at)
    )
    problems = [
        Finding(
            "rotations",
            ATTENTION,
            f"rotation {r.id} of {r.scope} in {r.cluster.name} is {r.state} "
            f"(since {r.created_at.isoformat(timespec='seconds')})"
            + ("; its pending file on the host is not removed" if r.state == "stored" else ""),
            f"run `keyvault rotations recover {r.id}` (see docs/rotation.md)",
        )
        for r in rows
    ]
    return _ok_or("rotations", problems, "none unresolved or unsettled")


def check_old_keys(session: Session) -> list[Finding]:
    """TA refused the previous key after each scope's last rotation (or it was not checked)."""
    problems = [
        Finding(
            "old_keys",
            ATTENTION,
            f"TA still accepted the previous key of {scope} in {cluster} after rotation {rid}",
            f"it was not invalidated: check ta-tool on the TA hosts, then `keyvault rotate` "
            f"{'root' if scope == 'root' else 'app'} --cluster {shlex.quote(cluster)} again",
        )
        for cluster, scope, rid in old_keys_accepted(session)
    ]
    return _ok_or("old_keys", problems, "no previous key still accepted by TA")


def _scope_options(scope: str) -> str:
    return "--root" if scope == "root" else f"--appid {scope[4:]}"


def check_paused(session: Session) -> list[Finding]:
    """No scope is paused by the scheduler after repeated failures."""
    rows = session.execute(
        select(ScopeSchedule, Cluster.name)
        .join(Cluster, ScopeSchedule.cluster_id == Cluster.id)
        .where(ScopeSchedule.paused_at.is_not(None))
        .order_by(Cluster.name, ScopeSchedule.scope)
    )
    problems = [
        Finding(
            "paused",
            ATTENTION,
            f"{row.scope} of {cluster} paused after {row.consecutive_failures} failures"
            + (f": {row.last_error}" if row.last_error else ""),
            f"fix the cause, then `keyvault policy resume --cluster {cluster} "
            f"{_scope_options(row.scope)}`",
        )
        for row, cluster in rows
    ]
    return _ok_or("paused", problems, "no scope paused")


def check_scheduler(session: Session, *, now: datetime, hours: int) -> Finding:
    """With a policy, the scheduler completed a run within ``hours`` (a dead timer shows here)."""
    if session.scalar(select(func.count()).select_from(RotationPolicy)) == 0:
        return Finding("scheduler", OK, "no rotation policy: nothing for it to do")
    lease = session.get(Lease, ROTATE_DUE_LEASE)
    success = lease.last_success_at if lease else None
    age = None if success is None else timedelta(seconds=int((now - success).total_seconds()))
    detail = "no run completed yet" if age is None else f"last completed run ended {age} ago"
    if lease is not None and lease.last_outcome == "failed":
        later = "the last run" if age is None else "the run after it"
        detail += f"; {later} failed: {lease.last_error}"
    if age is not None and age <= timedelta(hours=hours):
        return Finding("scheduler", OK, detail)
    return Finding(
        "scheduler",
        ATTENTION,
        detail,
        "check that `keyvault rotate due` runs: `systemctl status keyvault-rotate.timer` "
        "and `journalctl -u keyvault-rotate`, or the servers' --scheduler",
    )


def check_key_ages(session: Session, *, now: datetime) -> list[Finding]:
    """No key is older than its policy's max age."""
    problems = []
    for c in candidates(session, now=now):
        if c.age_seconds is None or c.max_age_seconds is None:
            continue
        if c.age_seconds > c.max_age_seconds:
            problems.append(
                Finding(
                    "key_age",
                    ATTENTION,
                    f"{c.scope} of {c.cluster} is {timedelta(seconds=int(c.age_seconds))} old, "
                    f"its policy allows {timedelta(seconds=c.max_age_seconds)} ({c.reason})",
                    "check that `keyvault rotate due` runs (timer or serve --scheduler), "
                    f"or rotate now: `keyvault rotate app|root --cluster {c.cluster}`",
                )
            )
    return _ok_or("key_age", problems, "every key with a policy is within its max age")


def check_tokens(session: Session, *, now: datetime, days: int) -> list[Finding]:
    """No token that is not revoked expires within ``days`` (or has expired)."""
    horizon = now + timedelta(days=days)
    rows = session.scalars(
        select(AccessToken)
        .where(AccessToken.revoked_at.is_(None), AccessToken.expires_at.is_not(None))
        .where(AccessToken.expires_at <= horizon)
        .order_by(AccessToken.expires_at)
    )
    problems = []
    for t in rows:
        assert t.expires_at is not None  # by the query
        when = t.expires_at.isoformat(timespec="seconds")
        expired = t.expires_at <= now
        problems.append(
            Finding(
                "tokens",
                ATTENTION,
                f"token {t.name} {'expired' if expired else 'expires'} at {when}",
                f"`keyvault token revoke {t.name}` if nothing uses it any more"
                if expired
                else f"create a successor (`keyvault token create`), hand it over, "
                f"then `keyvault token revoke {t.name}`",
            )
        )
    return _ok_or("tokens", problems, f"none expiring within {days} days")


def check_webhooks(session: Session, *, now: datetime) -> list[Finding]:
    """No delivery of a live webhook was dead-lettered recently."""
    since = now - DEAD_DELIVERY_WINDOW
    rows = session.execute(
        select(Webhook.id, Webhook.url, func.count(WebhookDelivery.id))
        .join(WebhookDelivery, WebhookDelivery.webhook_id == Webhook.id)
        .where(Webhook.removed_at.is_(None), WebhookDelivery.status == "dead")
        .where(WebhookDelivery.created_at >= since)
        .group_by(Webhook.id, Webhook.url)
        .order_by(Webhook.id)
    )
    problems = [
        Finding(
            "webhooks",
            ATTENTION,
            f"webhook {hook_id} ({url}): {count} deliveries dead-lettered in the last "
            f"{DEAD_DELIVERY_WINDOW.days} days",
            f"fix the receiver; see `keyvault webhook deliveries --failed --webhook {hook_id}`",
        )
        for hook_id, url, count in rows
    ]
    return _ok_or("webhooks", problems, "no dead deliveries")


def check_leases(session: Session) -> Finding:
    """Who runs the scheduler and the webhook deliveries now (information: always ok)."""
    now = leases.database_now(session)
    parts = []
    for info in leases.read_all(session):
        if info.holder is None or info.expires_at is None:
            state = "free"
        elif leases.live(info, now):
            since = info.acquired_at.isoformat() if info.acquired_at else "?"
            state = f"held by {info.holder} since {since}, until {info.expires_at.isoformat()}"
        else:
            state = f"expired (last holder {info.holder}): the next runner takes it"
        parts.append(f"{info.name}: {state} (epoch {info.epoch})")
    return Finding("leases", OK, "; ".join(parts) or "no lease")
