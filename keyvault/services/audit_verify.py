"""Checking the audit chain (`keyvault audit verify`) and pruning it (`audit prune`).

The check walks the records after the head's anchor in id order, recomputing each MAC
from the one before (``audit_chain.record_mac``), and names the first record that is
wrong and how: deleted before it (its id follows a gap and the next record links to it),
altered (its MAC no longer matches its content, but the next record links to it),
inserted (the next record links to the one before it), altered or moved (neither), no MAC
(written outside keyvault), an unknown chain key, a chain key the chain had left (keys
move on only by an ``audit.chain_key_started`` record under the key before); then the tail
and the head's key against the head row. Records at or before the anchor were written
before the chain began (migration 0007): counted, not verifiable, but no more of them and
no higher ids than the chain's start record counted. After a prune nothing may be there.

A database writer can still delete the newest records and rewind the head to match:
nothing in the database can tell. The JSON-lines sink is the witness (``check_lines``
compares the file with the database). See docs/security.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.errors import AuditChainBroken, IntegrityError
from keyvault.models import AuditChainHead, AuditRecord
from keyvault.services.audit import record_event
from keyvault.services.audit_chain import (
    COLUMNS,
    GENESIS,
    HEAD_ID,
    AuditChain,
    ChainKeys,
    _sealed_loader,
    _sql,
    canonical_at,
    head_of,
    next_key_id,
    pre_chain_counts,
    record_mac,
)
from keyvault.services.audit_sink import GAP

PRUNED = "audit.pruned"  # the chained record a prune leaves: it names the new anchor
KeyFor = Callable[[str], bytes]


@dataclass
class ChainReport:
    """What a check found: how much verified and the first problem, if any."""

    verified: int = 0
    first_id: int | None = None
    last_id: int | None = None
    before_chain: int = 0  # records at or before the anchor: unverifiable
    anchor_id: int = 0
    pruned: bool = False  # the anchor is a prune's, not the start of the chain
    problem: str | None = None
    problem_id: int | None = None
    gaps: list[tuple[int, int]] = field(default_factory=list)  # a sink file's marked gaps

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        if self.verified:
            text = f"audit chain verified: {self.verified} records (ids {self.first_id}-{self.last_id})"
        else:
            text = "audit chain verified: no chained records yet"
        if self.pruned:
            text += (
                f", from the anchor after record {self.anchor_id} (records up to it were pruned)"
            )
        if self.before_chain:
            text += f"; {self.before_chain} records before the chain began (unverifiable)"
        if self.gaps:
            marked = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in self.gaps)
            text += f"; sink gaps marked (records the sink missed, not checked here): {marked}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "verified": self.verified,
            "first_id": self.first_id,
            "last_id": self.last_id,
            "before_chain": self.before_chain,
            "anchor_id": self.anchor_id,
            "pruned": self.pruned,
            "problem": self.problem,
            "problem_id": self.problem_id,
            "gaps": [list(g) for g in self.gaps],
        }

    def raise_if_broken(self) -> None:
        if self.problem is not None:
            raise AuditChainBroken(
                f"audit chain broken at record {self.problem_id}: {self.problem}",
                record_id=self.problem_id,
                hint="compare with the JSON-lines sink or a backup; the records before it verify",
            )


_MISMATCH = "mismatch"


class _Walk:
    """One pass over the records after the anchor (see the module docstring)."""

    def __init__(self, key_for: KeyFor, anchor_id: int, anchor_mac: str, named: bool) -> None:
        self.key_for = key_for
        self.report = ChainReport(anchor_id=anchor_id, pruned=anchor_mac != GENESIS)
        self.prev_mac, self.prev_id = anchor_mac, anchor_id
        self.anchor_named = named or anchor_mac == GENESIS
        self.suspect: tuple[Mapping[str, Any], str, int] | None = None
        self.key_id: str | None = None  # the chain key the next record must use
        self.left: dict[str, int] = {}  # chain keys the chain moved on from: the record that did
        self.pre_max = 0  # the largest id at or before the anchor

    def before_anchor(self, rec: Mapping[str, Any]) -> bool:
        """Take a record at or before the anchor; False once one is found forged: after a
        prune nothing may be there, before a chain start only what its start record counts."""
        if not self.report.pruned:
            self.report.before_chain += 1
            self.pre_max = max(self.pre_max, rec["id"])
            return True
        self.fail(
            f"record {rec['id']} was inserted: it is at or before the prune anchor "
            f"(record {self.report.anchor_id}), where every record was deleted",
            rec["id"],
        )
        return False

    def key_order(self, rec: Mapping[str, Any]) -> str | None:
        """A verified record's chain key against the order the chain's key records set."""
        key_id = rec["chain_key_id"]
        if key_id != self.key_id and key_id in self.left:
            return (
                f"record {rec['id']} is MACed under chain key {key_id}, which the chain left at "
                f"record {self.left[key_id]}: an old chain key was used again"
            )
        if self.key_id is not None and key_id != self.key_id:
            self.left[self.key_id] = rec["id"]  # moved without a key record: a chain from before
        counts = pre_chain_counts(rec)
        if counts is not None and self.report.verified == 0:
            extra = self.pre_chain_extra(*counts)
            if extra is not None:
                return extra
        self.key_id = next_key_id(key_id, rec["action"], rec["target"])
        if self.key_id != key_id:
            self.left[key_id] = rec["id"]
        return None

    def pre_chain_extra(self, count: int, max_id: int) -> str | None:
        found = self.report.before_chain
        if found <= count and self.pre_max <= max_id:
            return None
        self.report.problem_id = self.pre_max if self.pre_max > max_id else None
        return (
            f"{found} records are before the chain, but it started after {count} (ids up to "
            f"{max_id}): records were inserted before the chain (largest id {self.pre_max})"
        )

    def links(self, rec: Mapping[str, Any], prev_mac: str) -> bool:
        try:
            key = self.key_for(rec["chain_key_id"])
        except IntegrityError:
            return False
        return rec["chain_mac"] is not None and crypto.mac_matches(
            rec["chain_mac"], record_mac(key, prev_mac, rec)
        )

    def check(self, rec: Mapping[str, Any]) -> str | None:
        if rec["chain_mac"] is None or rec["chain_key_id"] is None:
            return f"record {rec['id']} has no chain MAC: written outside keyvault (forged)"
        try:
            self.key_for(rec["chain_key_id"])
        except IntegrityError as exc:
            return f"record {rec['id']} names chain key {rec['chain_key_id']}, which cannot be opened ({exc.message})"
        return None if self.links(rec, self.prev_mac) else _MISMATCH

    def feed(self, rec: Mapping[str, Any]) -> bool:
        """Take the next record; False once a problem is found."""
        if self.suspect is not None:
            self.fail(self.classify(rec), self.suspect[0]["id"])
            return False
        problem = self.check(rec)
        if problem == _MISMATCH:
            self.suspect = (rec, self.prev_mac, self.prev_id)
            return True
        if problem is None:
            problem = self.key_order(rec)
        if problem is not None:
            self.fail(problem, self.report.problem_id or rec["id"])
            return False
        report = self.report
        report.verified += 1
        report.first_id = report.first_id or rec["id"]
        report.last_id = rec["id"]
        self.prev_mac, self.prev_id = rec["chain_mac"], rec["id"]
        if rec["action"] == PRUNED and rec["target"] == f"audit:..{report.anchor_id}":
            self.anchor_named = True
        return True

    def classify(self, nxt: Mapping[str, Any] | None, head: tuple[int, str] | None = None) -> str:
        rec, prev_mac, prev_id = self.suspect  # type: ignore[misc]
        if nxt is not None and self.links(nxt, prev_mac):
            return f"record {rec['id']} was inserted: the next record, {nxt['id']}, links to record {prev_id}"
        genuine = (nxt is not None and self.links(nxt, rec["chain_mac"])) or (
            nxt is None and head == (rec["id"], rec["chain_mac"])
        )
        if genuine and rec["id"] > prev_id + 1:
            gone = (
                f"{prev_id + 1}" if rec["id"] == prev_id + 2 else f"{prev_id + 1}-{rec['id'] - 1}"
            )
            return f"record {gone} was deleted: record {rec['id']} links to a record that is gone"
        if genuine:
            return f"record {rec['id']} was altered: its content does not match its MAC"
        return (
            f"record {rec['id']} was altered or moved: its MAC matches neither its content "
            "nor the next record's link"
        )

    def fail(self, problem: str, record_id: int | None) -> None:
        self.report.problem, self.report.problem_id = problem, record_id

    def finish(self, last_id: int, last_mac: str, key_id: str | None = None) -> ChainReport:
        report = self.report
        if report.problem is not None:
            return report
        if key_id is not None and self.suspect is None and self.key_id not in (None, key_id):
            self.fail(
                f"the chain's head names chain key {key_id}, but the chain moved to chain key "
                f"{self.key_id}: the head was altered",
                last_id,
            )
            return report
        if self.suspect is not None:
            self.fail(self.classify(None, (last_id, last_mac)), self.suspect[0]["id"])
        elif (self.prev_id, self.prev_mac) != (last_id, last_mac):
            if last_id > self.prev_id:
                self.fail(
                    f"records after {self.prev_id} are missing: the chain's head names record "
                    f"{last_id} as its last (deleted from the end)",
                    self.prev_id + 1,
                )
            else:
                self.fail(
                    f"the chain's head names record {last_id}, but the chain goes on to record "
                    f"{self.prev_id} (the head was altered)",
                    last_id,
                )
        elif not self.anchor_named:
            self.fail(
                f"the chain starts after record {report.anchor_id}, but no {PRUNED} record says "
                "so: records were deleted and the head's anchor moved",
                report.anchor_id,
            )
        return report


def check_records(
    records: Iterable[Mapping[str, Any]],
    *,
    key_for: KeyFor,
    anchor_id: int,
    anchor_mac: str,
    last_id: int,
    last_mac: str,
    anchor_named: bool = False,
    key_id: str | None = None,
) -> ChainReport:
    """Check ``records`` (in id order) against the anchor and head given (pure).

    ``anchor_named``: do not require an ``audit.pruned`` record naming the anchor (a sink
    file, or a backup's records, may start anywhere)."""
    walk = _Walk(key_for, anchor_id, anchor_mac, anchor_named)
    for rec in records:
        if rec["id"] <= anchor_id:
            if not walk.before_anchor(rec):
                return walk.report
        elif not walk.feed(rec):
            return walk.report
    return walk.finish(last_id, last_mac, key_id)


def _rows(cur: Any, sql: str, params: tuple[Any, ...] = (), size: int = 2000) -> Iterator[dict]:
    cur.execute(sql, params)
    names = [d[0] for d in cur.description]
    while batch := cur.fetchmany(size):
        for values in batch:
            yield dict(zip(names, values, strict=True))


def check_connection(conn: Any, *, sqlite: bool, keys: ChainKeys) -> ChainReport:
    """Check the chain through a DBAPI connection whose transaction sees one snapshot."""
    head_cur, key_cur, cur = conn.cursor(), conn.cursor(), conn.cursor()
    try:
        head_cur.execute(
            "SELECT last_id, last_mac, anchor_id, anchor_mac, key_id FROM audit_chain WHERE id = 1"
        )
        head = head_cur.fetchone()
        if head is None:
            return ChainReport(problem="the audit chain has no head row", problem_id=None)
        last_id, last_mac, anchor_id, anchor_mac, key_id = head
        load = _sealed_loader(key_cur, sqlite)
        records = _rows(cur, f"SELECT {', '.join(COLUMNS)} FROM audit_log ORDER BY id")
        return check_records(
            records,
            key_for=lambda key_id: keys.get(key_id, load),
            anchor_id=anchor_id,
            anchor_mac=anchor_mac,
            last_id=last_id,
            last_mac=last_mac,
            key_id=key_id,
        )
    finally:
        for c in (head_cur, key_cur, cur):
            c.close()


def verify_store(engine: Engine, *, keys: ChainKeys) -> ChainReport:
    """Check the whole chain from one snapshot, without blocking writers (SQLite: a deferred
    read transaction in WAL; PostgreSQL: REPEATABLE READ, read only)."""
    sqlite = engine.dialect.name == "sqlite"
    conn = engine.raw_connection()
    try:
        cur = conn.cursor()
        cur.execute(
            "BEGIN" if sqlite else "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"
        )
        cur.close()
        return check_connection(conn, sqlite=sqlite, keys=keys)
    finally:
        conn.rollback()
        conn.close()


# --- prune -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PrunePlan:
    before: datetime
    through_id: int  # records with ids up to this are deleted (0: none)
    count: int


def plan_prune(session: Session, *, before: datetime) -> PrunePlan:
    """What ``prune`` would delete: the oldest records up to the first one at or after
    ``before`` (a prefix by id, so the chain stays one piece)."""
    head = head_of(session)
    first_kept = session.scalar(select(func.min(AuditRecord.id)).where(AuditRecord.at >= before))
    through = head.last_id if first_kept is None else min(first_kept - 1, head.last_id)
    count = session.scalar(select(func.count()).where(AuditRecord.id <= through)) or 0
    return PrunePlan(before=before, through_id=through if count else 0, count=count)


def prune(session: Session, *, chain: AuditChain, before: datetime, actor: str) -> PrunePlan:
    """Delete the records older than ``before``; the chain then starts from an anchor (the
    last deleted record's id and MAC), named by a chained ``audit.pruned`` record.

    Refuses (``AuditChainBroken``) if the chain does not verify: pruning would hide it."""
    head_of(session, lock=True)  # no append until this commits
    sqlite = session.get_bind().dialect.name == "sqlite"
    check_connection(
        session.connection().connection, sqlite=sqlite, keys=chain.keys
    ).raise_if_broken()
    plan = plan_prune(session, before=before)
    if not plan.count:
        return plan
    head = head_of(session)
    through = plan.through_id
    anchor_mac = head.anchor_mac
    if through > head.anchor_id:
        anchor_mac = session.scalar(select(AuditRecord.chain_mac).where(AuditRecord.id == through))
    session.execute(delete(AuditRecord).where(AuditRecord.id <= through))
    session.execute(
        update(AuditChainHead)
        .where(AuditChainHead.id == HEAD_ID)
        .values(anchor_id=max(through, head.anchor_id), anchor_mac=anchor_mac or GENESIS)
    )
    record_event(
        session,
        chain=chain,
        actor=actor,
        action=PRUNED,
        target=f"audit:..{max(through, head.anchor_id)}",
        outcome="ok",
        detail=f"deleted {plan.count} records (ids up to {through}) older than {canonical_at(before)}",
    )
    return plan


def check_lines(lines: Iterable[str], *, key_for: KeyFor) -> tuple[ChainReport, list[dict]]:
    """Check a JSON-lines sink file on its own: each line's MAC over its content and the
    MAC it names as previous, and that each line links to the line before (by id); records
    missing in a gap the sink marked (``audit_sink.GAP``) start the check afresh after it.
    Returns the report and the records (for comparing with the database)."""
    records: dict[int, dict] = {}
    gaps: list[tuple[int, int]] = []
    report = ChainReport()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if GAP in rec:
                gaps.append((int(rec[GAP]["from"]), int(rec[GAP]["to"])))
                continue
            rec_id = int(rec["id"])
            _ = [rec[c] for c in COLUMNS], rec["prev_mac"]
        except (ValueError, KeyError, TypeError):
            report.problem, report.problem_id = f"line {number} is not an audit record", None
            return report, []
        if records.get(rec_id, rec) != rec:
            report.problem = f"record {rec_id} appears twice in the file, with different content"
            report.problem_id = rec_id
            return report, []
        records[rec_id] = rec
    ordered = [records[i] for i in sorted(records)]
    report.gaps = sorted(gaps)
    for segment in _segments(ordered, gaps):
        found = check_records(
            segment,
            key_for=key_for,
            anchor_id=segment[0]["id"] - 1,
            anchor_mac=segment[0]["prev_mac"],
            last_id=segment[-1]["id"],
            last_mac=segment[-1]["chain_mac"],
            anchor_named=True,
        )
        report.verified += found.verified
        report.first_id = report.first_id or found.first_id
        report.last_id = found.last_id or report.last_id
        if not found.ok:
            report.problem, report.problem_id = found.problem, found.problem_id
            break
    return report, ordered


def _segments(ordered: list[dict], gaps: list[tuple[int, int]]) -> Iterator[list[dict]]:
    """``ordered`` cut where the ids missing between two records are all in marked gaps
    (a file may start anywhere in the chain; any other missing id is the chain's to name)."""
    start = 0
    for i in range(1, len(ordered)):
        missing = range(ordered[i - 1]["id"] + 1, ordered[i]["id"])
        if missing and _covered(missing, gaps):
            yield ordered[start:i]
            start = i
    if ordered:
        yield ordered[start:]


def _covered(missing: range, gaps: list[tuple[int, int]]) -> bool:
    """Whether every id in ``missing`` is in one of ``gaps`` (walked range by range)."""
    at = missing[0]
    for first, last in sorted(gaps):
        if first <= at <= last:
            at = last + 1
            if at > missing[-1]:
                return True
    return False


def compare_with_store(conn: Any, *, sqlite: bool, records: list[dict]) -> str | None:
    """How the sink file's ``records`` disagree with the database, if they do: a record the
    database holds differently, or records after the database's last one (its tail cut)."""
    cur = conn.cursor()
    try:
        cur.execute("SELECT last_id, anchor_id FROM audit_chain WHERE id = 1")
        last_id, anchor_id = cur.fetchone()
        stored = {
            row["id"]: row["chain_mac"]
            for row in _rows(
                cur,
                _sql("SELECT id, chain_mac FROM audit_log WHERE id >= ? AND id <= ?", sqlite),
                (records[0]["id"], records[-1]["id"]),
            )
        }
    finally:
        cur.close()
    for rec in records:
        if rec["id"] > last_id:
            return (
                f"record {rec['id']} is in the file but after the database's last record "
                f"({last_id}): the database's chain was cut after record {last_id}"
            )
        if rec["id"] > anchor_id and stored.get(rec["id"]) != rec["chain_mac"]:
            what = "is missing from" if rec["id"] not in stored else "differs in"
            return f"record {rec['id']} {what} the database"
    return None


def verify_file(engine: Engine, path: Any, *, keys: ChainKeys) -> ChainReport:
    """Check the sink file at ``path`` on its own, then against the database."""
    sqlite = engine.dialect.name == "sqlite"
    conn = engine.raw_connection()
    try:
        cur = conn.cursor()
        load = _sealed_loader(cur, sqlite)
        with open(path, encoding="utf-8", errors="replace") as lines:
            report, records = check_lines(lines, key_for=lambda key_id: keys.get(key_id, load))
        cur.close()
        if report.ok and records:
            differs = compare_with_store(conn, sqlite=sqlite, records=records)
            if differs is not None:
                report.problem, report.problem_id = differs, None
        return report
    finally:
        conn.rollback()
        conn.close()
