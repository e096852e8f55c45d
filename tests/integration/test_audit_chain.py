"""The audit log's hash chain, end to end: HTTP reads through a real `keyvault serve` and CLI
actions in this process make one chain that `audit verify` accepts; deleting, altering,
swapping and forging records is named at the first bad record; master-key rotation, prune,
backup/restore and the JSON-lines sink keep it verifiable. Both databases."""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime

from sqlalchemy import text

from keyvault.db import make_engine
from tests.support.cli import audit_report as verify
from tests.support.cli import expect, one_error_line
from tests.support.db import run_sql as sql
from tests.support.http import Server

CHAINED = "SELECT id, chain_mac FROM audit_log ORDER BY id"


def some_traffic(world, reads: int = 5) -> None:
    with world.http("root-c") as http:
        for _ in range(reads):
            assert http.get("/v1/clusters/c/root").status_code == 200
        assert http.get("/v1/clusters/c2/root").status_code == 403  # refused: audited too
    expect(world.cli("secrets", "show", "--cluster", "c", "--root", "--reveal", "--json"))
    world.import_key("c", "app:a1")


def ids(db_url: str) -> list[int]:
    return [row[0] for row in sql(db_url, CHAINED)]


def test_http_reads_and_cli_actions_make_one_chain_that_verifies(served):
    some_traffic(served)
    report = verify(served.cli)
    assert report["ok"] and report["problem"] is None, report
    assert report["verified"] == len(ids(served.db_url)) > 10
    assert all(mac for _, mac in sql(served.db_url, CHAINED))
    summary = expect(served.cli("audit", "verify")).stdout
    assert summary.startswith("audit chain verified:")


def test_an_altered_record_is_named(served):
    some_traffic(served)
    url, cli = served.db_url, served.cli
    all_ids = ids(url)
    victim = all_ids[len(all_ids) // 2]
    sql(url, "UPDATE audit_log SET client = 'elsewhere' WHERE id = :i", i=victim)
    line = one_error_line(cli("audit", "verify"), 1, f"record {victim} was altered")
    assert line.startswith(f"error: audit chain broken at record {victim}:")
    report = verify(cli)
    assert not report["ok"] and report["problem_id"] == victim, report


def test_deleted_records_are_named_in_the_middle_and_at_the_end(served):
    some_traffic(served)
    url, cli = served.db_url, served.cli
    rows = ids(url)
    gone = rows[6]
    sql(url, "DELETE FROM audit_log WHERE id = :i", i=gone)
    one_error_line(cli("audit", "verify"), 1, f"record {gone} was deleted", f"record {gone + 1}")
    # The tail cut, the head not rewound: named.
    sql(url, "DELETE FROM audit_log WHERE id >= :i", i=gone)
    one_error_line(cli("audit", "verify"), 1, "deleted from the end", f"after {gone - 1}")
    # The head rewound too (the known limit, docs/security.md): the database alone cannot
    # tell; the sink file can (test_the_sink_file_..._witnesses_a_cut_tail).
    mac = sql(url, "SELECT chain_mac FROM audit_log WHERE id = :i", i=gone - 1)[0][0]
    sql(url, "UPDATE audit_chain SET last_id = :i, last_mac = :m", i=gone - 1, m=mac)
    assert verify(cli)["ok"]


def test_two_records_with_swapped_contents_are_named(served):
    some_traffic(served)
    url, cli = served.db_url, served.cli
    rows = ids(url)
    a, b = rows[4], rows[9]
    columns = ("at", "token_name", "action", "cluster", "scope", "version", "client", "outcome")
    listed = ", ".join(columns)
    first, second = (
        sql(url, f"SELECT {listed} FROM audit_log WHERE id = :i", i=i)[0]._asdict() for i in (a, b)
    )
    assignments = ", ".join(f"{name} = :{name}" for name in columns)
    sql(url, f"UPDATE audit_log SET {assignments} WHERE id = :i", i=a, **second)
    sql(url, f"UPDATE audit_log SET {assignments} WHERE id = :i", i=b, **first)
    report = verify(cli)
    assert not report["ok"] and report["problem_id"] == a, report
    # Whole rows moved (content and MAC together): named too.
    sql(url, f"UPDATE audit_log SET {assignments} WHERE id = :i", i=a, **first)
    sql(url, f"UPDATE audit_log SET {assignments} WHERE id = :i", i=b, **second)
    assert verify(cli)["ok"]
    mac_a, mac_b = (
        sql(url, "SELECT chain_mac FROM audit_log WHERE id = :i", i=i)[0][0] for i in (a, b)
    )
    sql(
        url,
        f"UPDATE audit_log SET {assignments}, chain_mac = :m WHERE id = :i",
        i=a,
        m=mac_b,
        **second,
    )
    sql(
        url,
        f"UPDATE audit_log SET {assignments}, chain_mac = :m WHERE id = :i",
        i=b,
        m=mac_a,
        **first,
    )
    one_error_line(cli("audit", "verify"), 1, f"record {a} was altered or moved")


def test_a_forged_record_is_named(served):
    some_traffic(served)
    url, cli = served.db_url, served.cli
    last = ids(url)[-1]
    # Without a MAC, after the last record (the head not moved).
    sql(
        url,
        "INSERT INTO audit_log (id, at, token_name, action, outcome) "
        "VALUES (:i, :at, 'root-c', 'read', 'ok')",
        i=last + 1,
        at=datetime.now(UTC).replace(tzinfo=None),
    )
    one_error_line(cli("audit", "verify"), 1, f"record {last + 1} has no chain MAC")
    # With a made-up MAC and the head moved to it.
    sql(url, "UPDATE audit_log SET chain_key_id = (SELECT key_id FROM audit_chain), "
        "chain_mac = :m WHERE id = :i", m="ab" * 32, i=last + 1)  # fmt: skip
    sql(url, "UPDATE audit_chain SET last_id = :i, last_mac = :m", i=last + 1, m="ab" * 32)
    one_error_line(cli("audit", "verify"), 1, f"record {last + 1} was altered")


def test_concurrent_http_reads_and_cli_writes_make_one_linear_chain(served):
    stop = threading.Event()
    statuses: list[int] = []

    def reader() -> None:
        with served.http("root-c") as http:
            while not stop.is_set():
                statuses.append(http.get("/v1/clusters/c/root").status_code)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(4):
            served.import_key("c", "app:a2")
            expect(served.cli("secrets", "show", "--cluster", "c", "--root", "--reveal", "--json"))
        expect(served.cli("master-key", "rotate", "--yes"))  # a new chain key mid-traffic
        for _ in range(3):
            served.import_key("c", "app:a2")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert statuses and set(statuses) == {200}, set(statuses)
    report = verify(served.cli)
    assert report["ok"], report
    chained = ids(served.db_url)
    assert chained == list(range(chained[0], chained[0] + len(chained)))  # one line, no gap
    keys = {row[0] for row in sql(served.db_url, "SELECT DISTINCT chain_key_id FROM audit_log")}
    assert len(keys) == 2  # before and after the master-key rotation


def test_master_key_rotation_keeps_old_records_verifiable_without_the_old_key(cli, home):
    expect(cli("init"))
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
    old = json.loads(home.master_key_file.read_text())["active"]
    expect(cli("master-key", "rotate", "--yes"))
    expect(cli("cluster", "set", "c", "--login-name", "admin"))
    expect(cli("master-key", "rotate", "--yes"))
    ring = json.loads(home.master_key_file.read_text())
    assert old not in ring["keys"] and len(ring["keys"]) == 1  # the old key left the file
    report = verify(cli)
    assert report["ok"] and report["verified"] >= 8, report
    # Every chain key is now sealed under the live master key, and a new one was started.
    rows = sql(home.database_url, "SELECT master_key_id FROM audit_chain_keys")
    assert len(rows) == 3 and {r[0] for r in rows} == {ring["active"]}


def test_prune_keeps_the_chain_verifiable_and_a_deletion_after_the_anchor_is_caught(cli, home):
    expect(cli("init"))
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
    expect(cli("cluster", "set", "c", "--login-name", "a"))
    cut = datetime.now(UTC).isoformat()
    expect(cli("cluster", "set", "c", "--login-name", "b"))
    url = home.database_url
    before = ids(url)
    # On a pipe without --yes it asks, so it refuses.
    one_error_line(cli("audit", "prune", "--before", cut), 2, "--yes")
    out = json.loads(expect(cli("audit", "prune", "--before", cut, "--yes", "--json")).stdout)
    assert out["deleted"] >= 4 and out["through_id"] < before[-1]
    report = verify(cli)
    assert report["ok"] and report["pruned"] and report["anchor_id"] == out["through_id"], report
    rows = json.loads(expect(cli("audit", "list", "--json")).stdout)
    assert {"audit.prune", "audit.pruned"} <= {r["action"] for r in rows}
    # A record right after the anchor deleted: caught.
    sql(url, "DELETE FROM audit_log WHERE id = :i", i=out["through_id"] + 1)
    one_error_line(cli("audit", "verify"), 1, f"record {out['through_id'] + 1}")
    # And a prune of a broken chain is refused: it would hide the damage.
    now = datetime.now(UTC).isoformat()
    one_error_line(cli("audit", "prune", "--before", now, "--yes"), 1, "audit chain broken")


def test_the_anchor_moved_without_a_prune_record_is_caught(cli, home):
    expect(cli("init"))
    for name in ("a", "b", "c"):
        expect(cli("cluster", "add", name, "--open-api-url", "http://127.0.0.1:9"))
    url = home.database_url
    third = ids(url)[2]
    mac = sql(url, "SELECT chain_mac FROM audit_log WHERE id = :i", i=third)[0][0]
    sql(url, "DELETE FROM audit_log WHERE id <= :i", i=third)
    sql(url, "UPDATE audit_chain SET anchor_id = :i, anchor_mac = :m", i=third, m=mac)
    one_error_line(cli("audit", "verify"), 1, "no audit.pruned record")


def test_the_sink_file_verifies_matches_the_database_and_witnesses_a_cut_tail(
    cli, home, monkeypatch, tmp_path
):
    sink = tmp_path / "audit.jsonl"
    monkeypatch.setenv("KEYVAULT_AUDIT_SINK", str(sink))
    expect(cli("init"))
    server = Server(tmp_path).start()  # the sink from os.environ
    try:
        expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
        token = json.loads(
            expect(cli("token", "create", "t", "--scope", "root:c", "--json")).stdout
        )
        import httpx

        with httpx.Client(base_url=server.url, trust_env=False, timeout=15) as http:
            auth = {"Authorization": f"Bearer {token['token']}"}
            assert http.get("/v1/clusters/c/root", headers=auth).status_code == 404
            # A hostile path: control characters in the record stay one escaped JSON line.
            http.get("/v1/clusters/%1b%5b2J%0aforged/root", headers=auth)
    finally:
        server.stop()
    lines = sink.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert any("\x1b" in (r["cluster"] or "") and "\n" in r["cluster"] for r in records)
    assert all("\x1b" not in line for line in lines)
    stored = {row[0]: row[1] for row in sql(home.database_url, CHAINED)}
    assert {r["id"]: r["chain_mac"] for r in records} == stored
    assert expect(cli("audit", "verify", "--file", str(sink))).stdout.startswith(
        f"{sink}: audit chain verified"
    )
    # The database's tail cut and its head rewound: the database alone verifies, the file does not.
    last = max(stored)
    sql(home.database_url, "DELETE FROM audit_log WHERE id = :i", i=last)
    sql(
        home.database_url,
        "UPDATE audit_chain SET last_id = :i, last_mac = :m",
        i=last - 1,
        m=stored[last - 1],
    )
    monkeypatch.delenv("KEYVAULT_AUDIT_SINK")
    assert verify(cli)["ok"]
    one_error_line(cli("audit", "verify", "--file", str(sink)), 1, f"record {last}", "cut")
    # A line removed from the file is named.
    sink.write_text("\n".join(line for line in lines if json.loads(line)["id"] != last - 2) + "\n")
    one_error_line(cli("audit", "verify", "--file", str(sink)), 1, f"record {last - 2}")


def test_a_sink_that_cannot_be_written_is_a_clear_error_at_start(cli, home, monkeypatch, tmp_path):
    expect(cli("init"))
    missing = tmp_path / "no-such-dir" / "audit.jsonl"
    monkeypatch.setenv("KEYVAULT_AUDIT_SINK", str(missing))
    result = cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9")
    one_error_line(result, 1, f"cannot open the audit sink {missing}")
    monkeypatch.delenv("KEYVAULT_AUDIT_SINK")
    assert "c" not in expect(cli("cluster", "list")).stdout.split()  # nothing was done
    server = Server(tmp_path, env={**os.environ, "KEYVAULT_AUDIT_SINK": str(missing)}).launch()
    try:
        assert server.proc.wait(timeout=120) != 0
        assert f"cannot open the audit sink {missing}" in server.log_tail()
    finally:
        server.stop()


def test_backup_and_restore_keep_the_chain_verifiable(cli, home, tmp_path):
    expect(cli("init"))
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
    backup = tmp_path / "store.kvbak"
    expect(cli("backup", str(backup)))
    expect(cli("cluster", "set", "c", "--login-name", "after-backup"))
    expect(cli("restore", str(backup), "--replace", "--yes"))
    report = verify(cli)
    assert report["ok"], report
    actions = [r["action"] for r in json.loads(expect(cli("audit", "list", "--json")).stdout)]
    assert "restore" in actions and "cluster.set" in actions  # kept, and the restore chained


def test_records_from_before_the_chain_are_counted_not_failed(cli, home):
    from keyvault.db import downgrade, upgrade

    expect(cli("init"))
    engine = make_engine(home.database_url)
    try:
        downgrade(engine, "0006")  # a store as 0006 left it, with records of its own
        with engine.begin() as conn:
            for day in range(1, 4):
                conn.execute(
                    text("INSERT INTO audit_log (at, token_name, action, outcome) "
                         "VALUES (:at, 'old', 'read', 'ok')"),
                    {"at": datetime(2026, 1, day)},
                )  # fmt: skip
        upgrade(engine)
    finally:
        engine.dispose()
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
    report = verify(cli)
    # Verified: the chain's start (which counts the 3 before it), the intent and the outcome.
    assert report["ok"] and report["before_chain"] == 3 and report["verified"] == 3, report
    summary = expect(cli("audit", "verify")).stdout
    assert "3 records before the chain began (unverifiable)" in summary


def test_several_cli_processes_and_a_server_append_one_chain(served):
    """Real processes through the real writers: four CLI processes, each writing its intent
    and outcome records, while the server writes read records in batches."""
    from tests.support.cli import KEYVAULT, spawn_process
    from tests.support.timeouts import TIMEOUT

    stop = threading.Event()
    statuses: list[int] = []

    def reader() -> None:
        with served.http("app-all") as http:
            while not stop.is_set():
                statuses.append(http.get("/v1/clusters/c/apps/a1").status_code)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        children = [
            spawn_process([*KEYVAULT, "cluster", "set", "c2", "--login-name", f"user{i}"])
            for i in range(4)
        ]
        for child in children:
            _, err = child.communicate(timeout=TIMEOUT)
            assert child.returncode == 0, err
    finally:
        stop.set()
        thread.join()
    assert statuses and set(statuses) == {200}
    report = verify(served.cli)
    assert report["ok"], report
    rows = json.loads(expect(served.cli("audit", "list", "--json", "--limit", "100000")).stdout)
    assert sum(r["action"] == "cluster.set" for r in rows) == 8  # 4 intents, 4 outcomes
    assert sum(r["action"] == "read" for r in rows) >= len(statuses)


def test_a_restore_into_a_fresh_store_keeps_the_chain_verifiable(cli, home, monkeypatch, tmp_path):
    expect(cli("init"))
    expect(cli("cluster", "add", "c", "--open-api-url", "http://127.0.0.1:9"))
    expect(cli("cluster", "set", "c", "--login-name", "admin"))
    backup = tmp_path / "store.kvbak"
    expect(cli("backup", str(backup)))
    originals = json.loads(expect(cli("audit", "list", "--json")).stdout)
    # Another database, initialised with the same keyring file.
    monkeypatch.setenv("KEYVAULT_DATABASE_URL", f"sqlite:///{tmp_path / 'fresh.db'}")
    expect(cli("init"))
    expect(cli("restore", str(backup)))
    report = verify(cli)
    assert report["ok"], report
    rows = json.loads(expect(cli("audit", "list", "--json")).stdout)
    (marker,) = [r for r in rows if r["action"] == "audit.restored"]
    assert "the backup's own chain verified" in marker["detail"]
    copied = {(r["action"].removesuffix(".copy"), r["at"], r["phase"]) for r in rows}
    # Every record the backup held (the backup's outcome was written after it) was copied.
    held = {(r["action"], r["at"], r["phase"]) for r in originals if r["action"] != "backup"}
    assert held <= copied
