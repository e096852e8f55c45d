"""Row MACs (SQLite and PostgreSQL): a database writer without the keyring cannot redirect
keys or change what is rotated. Each tamper is plain SQL; what uses the row refuses it
before acting (no connection, no ta-tool run, no request to the moved URL), naming the row,
and an operator holding the keyring takes it back by re-creating or re-setting it.

Token rows over a real server: test_row_macs_http.py.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select, text

from keyvault.config import load_settings
from keyvault.db import downgrade, make_engine, session_factory, transaction, upgrade
from keyvault.errors import IntegrityError
from keyvault.models import AuditRecord, Cluster, Webhook, WebhookDelivery, utcnow
from keyvault.sandbox import state
from keyvault.scope import root_scope
from keyvault.services.rotation import RotationService
from keyvault.services.scheduler import Scheduler
from keyvault.services.store import open_keyring
from tests.support.cli import expect, one_error_line
from tests.support.cluster import (
    NO_OPEN_API,
    add_emulated_cluster,
    install_ta_tool,
    local_connector,
)
from tests.support.http import CountingReceiver
from tests.support.leak_guard import new_key


@pytest.fixture
def world(tmp_path, cli):
    """An initialised store, cluster `c` with host ta-a (local emulated ta-tool), a root key."""
    expect(cli("init"))
    ta = install_ta_tool(tmp_path / "ta-c", ["app1"])
    settings = load_settings()
    engine = make_engine(settings.database_url)
    factory = session_factory(engine)
    with transaction(factory) as s:
        add_emulated_cluster(s, "c", ta, host="ta-a")
    expect(cli("import", "--cluster", "c", "--root", "--any-format", input=new_key()))
    yield {
        "settings": settings,
        "factory": factory,
        "engine": engine,
        "state": ta.state_dir,
        "connector": local_connector(tmp_path / "ta-home"),
        "cli": cli,
    }
    engine.dispose()


def sql(world, statement: str, **params) -> None:
    with world["engine"].begin() as conn:
        conn.execute(text(statement), params)


def rotate(world):
    return RotationService(
        world["factory"], settings=world["settings"], connector=world["connector"]
    ).rotate("c", root_scope(), actor="t")


def failing_rows(world) -> list[str]:
    result = world["cli"]("db", "check", "--integrity", "--json")
    rows = [r["row"] for r in json.loads(result.stdout)["failing"]]
    assert (result.exit_code != 0) == bool(rows)
    return rows


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("open_api_url", None),  # the receiver's URL
        ("key_pattern", "[a-z]+"),
        ("options", json.dumps({"generate_root_command": "ta-tool generate_root_secret -x"})),
    ],
)
def test_a_changed_cluster_is_refused_before_any_key_goes_anywhere(world, column, value):
    receiver = CountingReceiver()
    try:
        sql(world, f"UPDATE clusters SET {column} = :v", v=value or receiver.url[: -len("/hook")])
        with pytest.raises(IntegrityError) as info:
            rotate(world)
        assert "clusters row" in str(info.value) and "'c'" in str(info.value)
        assert "cluster set" in (info.value.hint or "")
        refused = world["cli"]("verify", "--cluster", "c", "--root")
        one_error_line(refused, 1, "integrity check failed for clusters row", "'c'")
        assert receiver.requests == 0
        assert world["connector"].connections == [] and state.generations(world["state"]) == 0
        assert failing_rows(world) == ["clusters row 1 (cluster 'c')"]
    finally:
        receiver.close()
    # The operator re-sets it with the keyring: the row is MACed as it then stands.
    if column == "key_pattern":
        expect(world["cli"]("cluster", "set", "c", "--key-pattern", "[A-Za-z0-9]{64}"))
    if column != "options":
        expect(world["cli"]("cluster", "set", "c", "--open-api-url", NO_OPEN_API))
        assert failing_rows(world) == []


def test_a_moved_or_unpinned_host_is_refused_before_connecting(world):
    for statement in (
        "UPDATE hosts SET address = 'attacker.example'",
        "UPDATE hosts SET host_key_fingerprint = NULL",
        "UPDATE hosts SET username = 'root', become = 'su'",
    ):
        with world["engine"].begin() as conn:
            saved = conn.execute(text("SELECT * FROM hosts")).one()._mapping
            conn.execute(text(statement))
        with pytest.raises(IntegrityError) as info:
            rotate(world)
        assert "hosts row 1" in str(info.value), statement
        refused = world["cli"]("host", "check", "c")
        one_error_line(refused, 1, "integrity check failed for hosts row 1")
        assert world["connector"].connections == [] and state.generations(world["state"]) == 0
        with world["engine"].begin() as conn:  # put back as it was: the MAC verifies again
            conn.execute(
                text(
                    "UPDATE hosts SET address = :address, host_key_fingerprint = "
                    ":host_key_fingerprint, username = :username, become = :become"
                ),
                dict(saved),
            )
    outcome = rotate(world)
    assert outcome.state == "completed"


def test_a_mac_copied_to_another_row_is_refused(world):
    cli = world["cli"]
    expect(cli("cluster", "add", "d", "--open-api-url", NO_OPEN_API))
    with world["engine"].begin() as conn:
        c = conn.execute(select(Cluster.__table__).where(Cluster.name == "c")).one()
        conn.execute(
            Cluster.__table__.update()
            .where(Cluster.name == "d")
            .values(
                open_api_url=c.open_api_url,
                key_pattern=c.key_pattern,
                options=c.options,
                mac=c.mac,
                mac_key_id=c.mac_key_id,
            )
        )
    assert failing_rows(world) == ["clusters row 2 (cluster 'd')"]


def test_a_changed_policy_is_refused_by_the_scheduler_and_reported(world):
    cli = world["cli"]
    expect(cli("policy", "set", "--cluster", "c", "--root", "--max-age", "3650d"))
    scheduler = Scheduler(
        world["factory"],
        settings=world["settings"],
        connector=world["connector"],
        clock=utcnow,
    )
    assert [r.status for r in scheduler.plan()] == ["skipped"]  # not due for ten years
    sql(world, "UPDATE rotation_policies SET max_age_seconds = 1")
    report = scheduler.run()
    (result,) = report.results
    assert result.status == "failed" and "rotation_policies row 1" in result.reason
    assert report.count("failed") == 1 and state.generations(world["state"]) == 0
    # The operator sets it again (with the keyring): it is MACed as it then stands.
    expect(cli("policy", "set", "--cluster", "c", "--root", "--max-age", "3650d"))
    assert [r.status for r in scheduler.plan()] == ["skipped"]


def test_a_moved_webhook_gets_nothing_and_the_error_names_it(world):
    cli = world["cli"]
    genuine, attacker = CountingReceiver(), CountingReceiver()
    try:
        expect(cli("webhook", "add", "--allow-private-network", genuine.url, "--scope", "root:c"))
        sql(world, "UPDATE webhooks SET url = :u", u=attacker.url)
        expect(cli("import", "--cluster", "c", "--root", "--any-format", input=new_key()))
        delivered = cli("webhook", "deliver", "--allow-private-network", "--json")
        expect(delivered)
        assert json.loads(delivered.stdout)["delivered"] == 0
        assert (genuine.requests, attacker.requests) == (0, 0)
        with transaction(world["factory"]) as s:
            errors = set(s.scalars(select(WebhookDelivery.last_error)))
            assert len(errors) == 1
            (error,) = errors
            assert "integrity check failed for webhooks row 1" in error
            assert s.scalars(select(Webhook.url)).one() == attacker.url
    finally:
        genuine.close()
        attacker.close()


def test_restore_refuses_a_backup_whose_rows_fail_and_restores_a_sound_one(world, tmp_path):
    cli = world["cli"]
    good, bad = tmp_path / "good.kvb", tmp_path / "bad.kvb"
    expect(cli("backup", str(good)))
    sql(world, "UPDATE clusters SET open_api_url = 'http://attacker.example:8992'")
    expect(cli("backup", str(bad)))  # a backup copies what the store holds
    refused = cli("restore", str(bad), "--replace", "--yes")
    one_error_line(
        refused, 1, "fail their integrity check", "clusters row 1", "nothing was restored"
    )
    expect(cli("restore", str(good), "--replace", "--yes"))
    assert failing_rows(world) == []
    assert rotate(world).state == "completed"
    # A byte of the file changed by hand: refused before any row is read.
    data = bytearray(good.read_bytes())
    data[-40] ^= 1
    edited = tmp_path / "edited.kvb"
    edited.write_bytes(bytes(data))
    one_error_line(cli("restore", str(edited), "--replace", "--yes"), 1, "integrity")


def test_an_upgraded_store_refuses_rows_until_they_are_adopted(world):
    cli, engine = world["cli"], world["engine"]
    expect(cli("policy", "set", "--cluster", "c", "--root", "--max-age", "30d"))
    expect(cli("token", "create", "t1", "--scope", "root:c"))
    downgrade(engine, "0006")  # a store made before row MACs: no mac columns
    upgrade(engine)  # the migration alone (no keyring): the rows have no MAC
    rows = failing_rows(world)
    assert len(rows) == 4  # cluster, host, policy, token
    with pytest.raises(IntegrityError, match="no MAC"):
        rotate(world)
    adopted = cli("db", "adopt", "--json", "--yes")
    expect(adopted)
    assert len(json.loads(adopted.stdout)["adopted"]) == 4
    assert failing_rows(world) == []
    assert rotate(world).state == "completed"
    with transaction(world["factory"]) as s:
        actions = set(s.scalars(select(AuditRecord.action)))
    assert "db.adopt" in actions
    # `db upgrade` with the keyring at hand adopts by itself, and says how many.
    downgrade(engine, "0006")
    upgraded = cli("db", "upgrade")
    expect(upgraded)
    assert "adopted 5 row(s)" in upgraded.stdout  # and the rotation's row (schema 0011)
    assert failing_rows(world) == []


def test_a_store_without_the_keyring_is_left_unadopted_and_says_so(world, tmp_path, monkeypatch):
    cli, engine = world["cli"], world["engine"]
    downgrade(engine, "0006")
    monkeypatch.setenv("KEYVAULT_MASTER_KEY_FILE", str(tmp_path / "nowhere.key"))
    upgraded = cli("db", "upgrade")
    expect(upgraded)
    assert "refused until adopted" in upgraded.stderr and "keyvault db adopt" in upgraded.stderr
    monkeypatch.setenv("KEYVAULT_MASTER_KEY_FILE", str(world["settings"].master_key_file))
    assert len(failing_rows(world)) == 2  # cluster and host
    with transaction(world["factory"]) as s:
        open_keyring(s, settings=world["settings"])  # the store itself is fine
