"""Row MAC adoption happens once, for the transition to row MACs (SQLite and PostgreSQL).

A database writer who inserts a row, or strips a row's MAC after changing it, gains nothing
from a routine `db upgrade` or `db adopt`: only the rows migration 0012 found without a MAC
are ever adopted, once. A MAC under a retired master key is refused even when the keyring
file still holds that key.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from sqlalchemy import select, text

from keyvault import crypto
from keyvault.db import downgrade, upgrade
from keyvault.errors import IntegrityError
from keyvault.models import AccessToken, AuditRecord, Cluster, utcnow
from keyvault.services import integrity
from keyvault.services.store import open_keyring
from tests.integration.test_row_macs import failing_rows, rotate, sql, world  # noqa: F401
from tests.support.cli import expect, one_error_line

ATTACKER_HASH = hashlib.sha256(b"kvt_attacker").hexdigest()


def insert_attacker_token(world) -> None:
    sql(
        world,
        "INSERT INTO access_tokens (name, token_hash, scopes, can_rotate, created_at) "
        "VALUES ('evil', :h, '[\"root:c\"]', :f, :now)",
        h=ATTACKER_HASH,
        f=False,
        now=utcnow().replace(tzinfo=None),
    )


def test_a_routine_upgrade_or_adopt_never_macs_an_inserted_token_or_a_moved_cluster(world):
    cli = world["cli"]
    insert_attacker_token(world)
    sql(
        world,
        "UPDATE clusters SET open_api_url = 'http://attacker', mac = NULL, mac_key_id = NULL",
    )
    upgraded = cli("db", "upgrade", "--json")
    expect(upgraded)
    assert json.loads(upgraded.stdout)["adopted"] is None  # nothing to migrate: no adoption
    one_error_line(cli("db", "adopt", "--yes"), 1, "adopted already", "never adopted again")
    rows = failing_rows(world)
    assert any("token 'evil'" in r for r in rows) and any("cluster 'c'" in r for r in rows)
    with pytest.raises(IntegrityError, match="no MAC"):
        rotate(world)


def test_adoption_takes_only_the_rows_the_migration_found_and_only_once(world):
    cli, engine = world["cli"], world["engine"]
    expect(cli("token", "create", "t1", "--scope", "root:c"))
    sql(world, "UPDATE hosts SET username = 'ta\x1b[2Jroot'")  # before MACs: anything goes
    downgrade(engine, "0006")  # a store made before row MACs
    upgrade(engine)  # the migration alone (no keyring): cluster, host, token recorded
    insert_attacker_token(world)  # after the migration: never adoptable
    # Without --yes and without a terminal: nothing adopted.
    refused = cli("db", "adopt")
    assert refused.exit_code != 0 and "--yes" in refused.output
    assert len(failing_rows(world)) == 4
    adopted = cli("db", "adopt", "--yes")
    expect(adopted)
    listed = [line for line in adopted.output.splitlines() if line.startswith("would adopt ")]
    assert len(listed) == 3 and not any("evil" in line for line in listed)
    assert any("open_api_url=" in line and "key_pattern=" in line for line in listed)
    assert "\x1b" not in adopted.output and "ta\\x1b[2Jroot" in adopted.output
    assert "adopted 3 row(s)" in adopted.output
    assert failing_rows(world) == ["access_tokens row 2 (token 'evil')"]
    with world["factory"]() as s:
        assert "db.adopt" in set(s.scalars(select(AuditRecord.action)))
    # A writer resets the record and strips a genuine row: still nothing is adopted again.
    sql(world, "UPDATE row_mac_adoption SET closed_at = NULL, row_ids = '[1, 2]'")
    sql(world, "UPDATE clusters SET open_api_url = 'http://attacker', mac = NULL")
    one_error_line(cli("db", "adopt", "--yes"), 1, "adopted already")
    upgraded = cli("db", "upgrade", "--json")
    expect(upgraded)
    assert json.loads(upgraded.stdout)["adopted"] is None
    assert len(failing_rows(world)) == 2


def test_a_store_already_macing_is_closed_by_the_migration(world):
    cli, engine = world["cli"], world["engine"]
    insert_attacker_token(world)  # stripped or inserted before this keyvault's upgrade
    downgrade(engine, "0009")
    expect(cli("db", "upgrade"))
    with world["engine"].connect() as conn:
        closed = conn.execute(text("SELECT closed_at FROM row_mac_adoption")).scalars().all()
    assert closed and all(c is not None for c in closed)
    assert failing_rows(world) == ["access_tokens row 1 (token 'evil')"]


def test_a_mac_under_a_retired_master_key_is_refused_though_the_file_holds_it(world):
    cli, path = world["cli"], world["settings"].master_key_file
    old_ring = crypto.load_keyring(path)
    with world["factory"]() as s:
        before = s.scalars(select(Cluster)).one()
        old = (before.open_api_url, before.mac, before.mac_key_id)
    expect(cli("master-key", "rotate", "--yes"))
    expect(cli("cluster", "set", "c", "--open-api-url", "http://127.0.0.1:9/moved"))
    # The file still holds the retired key (as it does for a spool file) ...
    ring = crypto.load_keyring(path)
    crypto.save_keyring(path, crypto.Keyring(ring.active, {**old_ring.keys, **ring.keys}))
    # ... and a writer puts back the cluster's genuine earlier state, MACed under it.
    sql(
        world,
        "UPDATE clusters SET open_api_url = :u, mac = :m, mac_key_id = :k",
        u=old[0],
        m=old[1],
        k=old[2],
    )
    assert failing_rows(world) == ["clusters row 1 (cluster 'c')"]
    with world["factory"]() as s:
        keyring = open_keyring(s, settings=world["settings"])
        assert old[2] in keyring.retired and old[2] in keyring.keys
        row = s.scalars(select(Cluster)).one()
        assert "retired" in (integrity.failure(row, keyring=keyring) or "")
        assert s.scalars(select(AccessToken)).all() == []
