"""`keyvault consumers` from real `keyvault serve` reads (SQLite and PostgreSQL): the consumer
header, its default, conditional reads, names that break the grammar, and escaping on output."""

from __future__ import annotations

import json
import time

from sqlalchemy import text

from keyvault.models import utcnow
from tests.support.cli import expect
from tests.support.http import World
from tests.support.timeouts import TIMEOUT


def _wait_rows(world: World, count: int) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while True:
        rows = json.loads(expect(world.cli("consumers", "--json")).stdout)
        if len(rows) >= count:
            return {(r["token"], r["consumer"], r["cluster"], r["scope"]): r for r in rows}
        assert time.monotonic() < deadline, rows
        time.sleep(0.05)  # a poll interval, not a synchronisation


def test_reads_name_their_consumer_or_count_as_the_client_address(served: World):
    world = served
    with world.http("app-all") as http:
        first = http.get("/v1/clusters/c/apps/a1", headers={"X-Keyvault-Consumer": "billing-1"})
        assert first.status_code == 200
        etag = first.headers["etag"]
        not_modified = http.get(
            "/v1/clusters/c/apps/a2",
            headers={"X-Keyvault-Consumer": "billing-2", "If-None-Match": '"v1"'},
        )
        assert not_modified.status_code == 304 and etag == '"v1"'
        for bad in ("two words", "x" * 65, "semi;colon", ""):
            assert (
                http.get("/v1/clusters/c/apps/a1", headers={"X-Keyvault-Consumer": bad}).status_code
                == 200
            )
    with world.http("root-c") as http:  # no header at all: the client address
        assert http.get("/v1/clusters/c/root").status_code == 200
    rows = _wait_rows(world, 4)
    assert set(rows) == {
        ("app-all", "billing-1", "c", "app:a1"),
        ("app-all", "billing-2", "c", "app:a2"),  # a 304 proves it holds v1 too
        ("app-all", "127.0.0.1", "c", "app:a1"),
        ("root-c", "127.0.0.1", "c", "root"),
    }
    assert all(r["version"] == 1 and not r["stale"] for r in rows.values())

    world.import_key("c", "app:a1")  # v2: whoever read a1 now holds a dead key
    rows = {
        (r["consumer"], r["scope"]): r["stale"]
        for r in json.loads(expect(world.cli("consumers", "--cluster", "c", "--json")).stdout)
    }
    assert rows == {
        ("billing-1", "app:a1"): True,
        ("127.0.0.1", "app:a1"): True,
        ("billing-2", "app:a2"): False,
        ("127.0.0.1", "root"): False,
    }
    only = json.loads(
        expect(world.cli("consumers", "--cluster", "c", "--appid", "a2", "--json")).stdout
    )
    assert [r["consumer"] for r in only] == ["billing-2"]
    assert (
        json.loads(expect(world.cli("consumers", "--cluster", "c2", "--root", "--json")).stdout)
        == []
    )


def test_if_none_match_star_is_no_proof_of_holding_the_current_version(served: World):
    world = served
    with world.http("app-all") as http:
        for consumer, condition in (("star", "*"), ("listed", '"v0", "v1"')):
            answer = http.get(
                "/v1/clusters/c/apps/a1",
                headers={"X-Keyvault-Consumer": consumer, "If-None-Match": condition},
            )
            assert answer.status_code == 304, consumer
        # Read last: a recorded `*` would be written in the same flush or an earlier one.
        marker = http.get("/v1/clusters/c/apps/a1", headers={"X-Keyvault-Consumer": "marker"})
        assert marker.status_code == 200
    rows = _wait_rows(world, 2)
    assert {consumer for _, consumer, _, _ in rows} == {"listed", "marker"}


def test_control_characters_in_stored_names_are_escaped_on_output(served: World, engine):
    now = utcnow()
    with engine.begin() as conn:  # a row no server would write (the grammar refuses it)
        conn.execute(
            text(
                "INSERT INTO consumer_reads (token_name, consumer, cluster, scope, version,"
                " version_seen_at, last_read_at) VALUES ('t\x1b[31m', :c, 'c', 'root', 1, :at, :at)"
            ),
            {"c": "evil\x1b]0;title\x07\nforged", "at": now.replace(tzinfo=None)},
        )
    table = expect(served.cli("consumers")).stdout
    assert "\x1b" not in table and "\x07" not in table
    assert "evil\\x1b]0;title\\x07\\x0aforged" in table and "t\\x1b[31m" in table
    assert len(table.strip().splitlines()) == 2  # the header and one row: no forged line
    [row] = json.loads(expect(served.cli("consumers", "--json")).stdout)
    assert row["consumer"] == "evil\x1b]0;title\x07\nforged"  # JSON escapes it itself
