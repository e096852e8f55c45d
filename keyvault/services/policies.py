"""Rotation policies: how old a key may get, and the window in which it may be rotated."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import select
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.errors import InvalidInput, NotFound
from keyvault.models import (
    CURRENT,
    Cluster,
    RotationPolicy,
    RowMac,
    ScopeSchedule,
    Secret,
    SecretVersion,
    utcnow,
)
from keyvault.services import integrity
from keyvault.services.clusters import cluster_options, get_cluster
from keyvault.timespec import parse_duration

_WINDOW = re.compile(
    r"^(?:(?P<days>[A-Za-z,-]+)\s+)?(?P<start>\d{1,2}:\d{2})-(?P<end>\d{1,2}:\d{2})(?:\s+(?P<tz>\S+))?$"
)
ALL_APPS = "all-apps"


@dataclass(frozen=True)
class Window:
    """Days of the week and a time range in a time zone; a range may cross midnight."""

    days: frozenset[int]
    start: time
    end: time
    tz: str

    def contains(self, now: datetime) -> bool:
        """True if ``now`` (aware) falls inside the window."""
        local = now.astimezone(ZoneInfo(self.tz))
        t, day = local.time(), local.weekday()
        if self.start <= self.end:
            return day in self.days and self.start <= t < self.end
        # Crosses midnight: the part after midnight belongs to the previous day's window.
        return (day in self.days and t >= self.start) or (
            (day - 1) % 7 in self.days and t < self.end
        )


DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def _day(name: str) -> int:
    """Monday = 0: a day's three-letter abbreviation or its full English name, nothing else."""
    for index, full in enumerate(DAY_NAMES):
        if name in (full, full[:3]):
            return index
    raise ValueError(name)


def _parse_days(text: str | None) -> frozenset[int]:
    if text is None or text.lower() in ("daily", "every"):
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.lower().split(","):
        first, dash, last = part.partition("-")
        if dash:
            i, j = _day(first), _day(last)
            days.update(range(i, j + 1) if i <= j else [*range(i, 7), *range(j + 1)])
        else:
            days.add(_day(part))
    return frozenset(days)


def parse_window(text: str) -> Window:
    """``'Tue 02:00-04:00 UTC'``, ``'Mon-Fri 22:00-02:00 Europe/Berlin'``, ``'03:00-05:00'``."""
    m = _WINDOW.match(text.strip())
    try:
        if not m:
            raise ValueError(text)
        start, end = (time.fromisoformat(m.group(g).zfill(5)) for g in ("start", "end"))
        tz = m.group("tz") or "UTC"
        ZoneInfo(tz)
        if start == end:
            raise ValueError("empty window")
        return Window(days=_parse_days(m.group("days")), start=start, end=end, tz=tz)
    except (ValueError, ZoneInfoNotFoundError):
        raise InvalidInput(
            f"invalid window {text!r}",
            hint="use e.g. 'Tue 02:00-04:00 UTC', 'Mon-Fri 22:00-02:00 Europe/Berlin' or "
            "'daily 03:00-05:00' (days as Mon or Monday)",
        ) from None


def set_policy(
    session: Session,
    *,
    keyring: crypto.Keyring,
    cluster_name: str,
    target: str,
    max_age: str,
    window: str | None,
) -> RotationPolicy:
    """Create or replace the policy of a target (``root``, ``app:<APPID>`` or ``all-apps``)."""
    cluster = get_cluster(session, name=cluster_name)
    seconds = int(parse_duration(max_age).total_seconds())
    if window is not None:
        parse_window(window)
    policy = session.scalar(
        select(RotationPolicy).where(
            RotationPolicy.cluster_id == cluster.id, RotationPolicy.target == target
        )
    )
    if policy is None:
        policy = RotationPolicy(
            cluster_id=cluster.id,
            target=target,
            created_at=utcnow(),
            max_age_seconds=seconds,
            window=window,
        )
        session.add(policy)
    policy.max_age_seconds, policy.window = seconds, window
    integrity.seal_row(session, policy, keyring=keyring)
    return policy


def list_policies(session: Session, *, cluster_name: str | None = None) -> list[RotationPolicy]:
    """All policies (of one cluster)."""
    stmt = select(RotationPolicy).join(Cluster).order_by(Cluster.name, RotationPolicy.target)
    if cluster_name is not None:
        stmt = stmt.where(Cluster.name == get_cluster(session, name=cluster_name).name)
    return list(session.scalars(stmt))


def remove_policy(session: Session, *, cluster_name: str, target: str) -> dict:
    """Delete a policy; return what it was (`policy_info`)."""
    cluster = get_cluster(session, name=cluster_name)
    policy = session.scalar(
        select(RotationPolicy).where(
            RotationPolicy.cluster_id == cluster.id, RotationPolicy.target == target
        )
    )
    if policy is None:
        raise NotFound(
            f"no policy for {target} in cluster {cluster_name}", hint="see `keyvault policy list`"
        )
    removed = policy_info(policy)
    session.delete(policy)
    session.flush()
    return removed


def resume(
    session: Session,
    *,
    keyring: crypto.Keyring,
    cluster_name: str,
    scope: str | None,
    now: datetime,
) -> int:
    """Clear the pause and failure count of one scope (or every scope) of a cluster (each
    row re-MACed: this is also how an operator takes a failing schedule back)."""
    cluster = get_cluster(session, name=cluster_name)
    stmt = select(ScopeSchedule).where(ScopeSchedule.cluster_id == cluster.id)
    if scope is not None:
        stmt = stmt.where(ScopeSchedule.scope == scope)
    count = 0
    for row in session.scalars(stmt):
        if row.paused_at is not None or row.consecutive_failures or row.next_attempt_at:
            count += 1
        row.paused_at, row.consecutive_failures, row.next_attempt_at, row.updated_at = (
            None,
            0,
            None,
            now,
        )
        integrity.seal_row(session, row, keyring=keyring)
    session.flush()
    return count


@dataclass(frozen=True)
class Candidate:
    """A scope with a policy, and why it is or is not due now."""

    cluster: str
    scope: str
    due: bool
    reason: str
    age_seconds: float | None
    max_age_seconds: int | None = None  # the policy's
    # The rows the decision rests on (policy, and schedule if any), for their MAC check.
    rows: tuple[RowMac, ...] = field(default=(), compare=False, repr=False)


def app_scopes_of(session: Session, cluster: Cluster) -> list[str]:
    """Every app scope keyvault knows for a cluster: stored secrets and configured project ids."""
    stored = set(
        session.scalars(
            select(Secret.scope).where(Secret.cluster_id == cluster.id, Secret.scope.like("app:%"))
        )
    )
    stored |= {f"app:{a}" for a in cluster_options(cluster)["project_ids"]}
    return sorted(stored)


def candidates(
    session: Session, *, now: datetime, cluster_name: str | None = None
) -> list[Candidate]:
    """Every scope covered by a policy, each with its due decision at ``now``."""
    out: list[Candidate] = []
    by_cluster: dict[int, dict[str, RotationPolicy]] = {}
    for policy in list_policies(session, cluster_name=cluster_name):
        by_cluster.setdefault(policy.cluster_id, {})[policy.target] = policy
    for policies in by_cluster.values():
        cluster = next(iter(policies.values())).cluster
        scopes: dict[str, RotationPolicy] = {}
        if ALL_APPS in policies:
            scopes.update(dict.fromkeys(app_scopes_of(session, cluster), policies[ALL_APPS]))
        scopes.update(
            {t: p for t, p in policies.items() if t != ALL_APPS}
        )  # specific beats all-apps
        schedules = {
            r.scope: r
            for r in session.scalars(
                select(ScopeSchedule).where(ScopeSchedule.cluster_id == cluster.id)
            )
        }
        for scope, policy in sorted(scopes.items()):
            out.append(_decide(session, cluster, scope, policy, schedules.get(scope), now))
    return out


def _decide(session, cluster, scope, policy, schedule, now) -> Candidate:
    created = session.scalar(
        select(SecretVersion.created_at)
        .join(Secret, SecretVersion.secret_id == Secret.id)
        .where(
            Secret.cluster_id == cluster.id, Secret.scope == scope, SecretVersion.state == CURRENT
        )
    )
    age = (now - created).total_seconds() if created is not None else None
    rows = (policy,) if schedule is None else (policy, schedule)
    make = lambda due, reason: Candidate(  # noqa: E731
        cluster.name, scope, due, reason, age, policy.max_age_seconds, rows
    )
    if schedule is not None and schedule.paused_at is not None:
        return make(
            False,
            f"paused after {schedule.consecutive_failures} consecutive failures "
            f"(`keyvault policy resume --cluster {cluster.name}`)",
        )
    if age is not None and age < policy.max_age_seconds:
        return make(
            False,
            f"not due: key is {timedelta(seconds=int(age))} old, max {timedelta(seconds=policy.max_age_seconds)}",
        )
    if (
        schedule is not None
        and schedule.next_attempt_at is not None
        and schedule.next_attempt_at > now
    ):
        return make(
            False,
            f"backing off after {schedule.consecutive_failures} failure(s) until "
            f"{schedule.next_attempt_at.isoformat()}",
        )
    if policy.window and not parse_window(policy.window).contains(now):
        return make(False, f"outside window {policy.window}")
    return make(True, "no key yet" if age is None else f"key is {timedelta(seconds=int(age))} old")


def policy_info(policy: RotationPolicy) -> dict:
    """A JSON-ready policy."""
    return {
        "cluster": policy.cluster.name,
        "target": policy.target,
        "max_age": str(timedelta(seconds=policy.max_age_seconds)),
        "max_age_seconds": policy.max_age_seconds,
        "window": policy.window,
        "created_at": policy.created_at.isoformat(),
    }
