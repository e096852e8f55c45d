"""The audit chain's pure parts: linking records and naming the first bad one (no database)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta

from keyvault.services.audit_chain import GENESIS, canonical_at, link
from keyvault.services.audit_verify import check_records

KEY = secrets.token_bytes(32)
KEY_ID = "ck-test"
START = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)


def chain(n: int = 8) -> list[dict]:
    records = [
        {"at": START + timedelta(seconds=i), "token_name": "t", "action": "read", "outcome": "ok"}
        for i in range(n)
    ]
    return link(KEY, KEY_ID, GENESIS, 1, records)


def check(rows: list[dict], *, last: dict | None = None):
    last = last or rows[-1]
    return check_records(
        rows,
        key_for=lambda key_id: KEY,
        anchor_id=0,
        anchor_mac=GENESIS,
        last_id=last["id"],
        last_mac=last["chain_mac"],
    )


def test_a_linked_chain_verifies_and_its_times_are_canonical():
    rows = chain()
    report = check(rows)
    assert report.ok and report.verified == 8 and (report.first_id, report.last_id) == (1, 8)
    assert rows[0]["prev_mac"] == GENESIS and rows[1]["prev_mac"] == rows[0]["chain_mac"]
    assert rows[0]["at"] == "2026-12-03T10:00:00.000000"
    # The database's forms of the same time give the same canonical text.
    assert canonical_at("2026-12-03 10:00:00.000000") == rows[0]["at"]
    assert canonical_at(datetime(2026, 12, 3, 10, 0)) == rows[0]["at"]


def test_each_kind_of_damage_is_named_at_the_first_bad_record():
    rows = chain()
    altered = [*rows[:3], {**rows[3], "outcome": "forbidden"}, *rows[4:]]
    assert check(altered).problem_id == 4
    assert "record 4 was altered: its content" in check(altered).problem

    deleted = rows[:3] + rows[4:]
    assert check(deleted).problem == "record 4 was deleted: record 5 links to a record that is gone"

    # A record slipped in between 3 and 4 (an id the chain never used), with a made-up MAC.
    forged = {**rows[3], "id": 3.5, "chain_mac": "00" * 32}
    report = check([*rows[:3], forged, *rows[3:]])
    assert report.problem_id == 3.5 and "was inserted" in report.problem

    moved = [*rows[:2], rows[4], rows[3], rows[2], *rows[5:]]
    report = check(sorted(({**r, "id": i} for i, r in enumerate(moved, 1)), key=lambda r: r["id"]))
    assert report.problem_id == 3 and "altered or moved" in report.problem

    unmaced = [*rows[:5], {**rows[5], "chain_mac": None}, *rows[6:]]
    assert "record 6 has no chain MAC" in check(unmaced).problem

    cut = rows[:6]
    assert "deleted from the end" in check(cut, last=rows[-1]).problem
