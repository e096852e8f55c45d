"""Row MACs of tokens over a real ``keyvault serve`` (SQLite and PostgreSQL): a database
writer without the keyring cannot insert, widen, un-revoke or copy a token.

Each tamper is plain SQL, then the revision counter is bumped (as any writer can), so the
server drops its caches and looks at the row again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from sqlalchemy import select, text, update

from keyvault.crypto import load_keyring
from keyvault.models import AccessToken, AuditRecord, Revision, utcnow
from tests.support.cli import expect
from tests.support.http import World

FORGED = "kvt_" + "f" * 43


def bump(conn) -> None:
    conn.execute(update(Revision).where(Revision.id == 1).values(value=Revision.value + 1))


def status_of(world: World, token: str, path: str = "/v1/clusters/c/root") -> tuple[int, dict]:
    """The status and, for an error, its body (a key read's body, holding a key, is not kept)."""
    with world.http() as http:
        response = http.get(path, headers={"Authorization": f"Bearer {token}"})
    if response.status_code == 200:
        return 200, {}
    leaked = world.holds_key(response.text)
    assert not leaked
    return response.status_code, response.json()


def refused_for_integrity(world: World, token: str, path: str = "/v1/clusters/c/root") -> dict:
    status, body = status_of(world, token, path)
    assert status == 401 and body["error"] == "unauthorized", body
    assert "integrity" in body["detail"], body
    return body


def test_an_inserted_token_row_is_refused_audited_and_logged(served: World, engine):
    world = served
    now = utcnow()
    with engine.begin() as conn:
        conn.execute(
            AccessToken.__table__.insert().values(
                name="forged",
                token_hash=hashlib.sha256(FORGED.encode()).hexdigest(),
                scopes=json.dumps(["root:c", "app:c/*"]),
                can_rotate=True,
                created_at=now,
            )
        )
        bump(conn)
    refused_for_integrity(world, FORGED)
    with engine.connect() as conn:
        audited = conn.execute(
            select(AuditRecord.token_name, AuditRecord.outcome).where(
                AuditRecord.token_name == "forged"
            )
        ).all()
    assert [tuple(r) for r in audited] == [("forged", "unauthorized")]
    log = world.server.log_tail(chars=20000)
    assert "integrity check failed for access_tokens row" in log and "'forged'" in log


def test_a_copied_mac_and_a_plain_hash_of_a_known_row_are_refused(served: World, engine):
    """A MAC copied from a genuine token onto a forged row (same scopes) does not verify:
    the MAC covers the row's id, name and hash."""
    world = served
    with engine.begin() as conn:
        genuine = conn.execute(
            select(AccessToken.__table__).where(AccessToken.name == "root-c")
        ).one()
        conn.execute(
            AccessToken.__table__.insert().values(
                name="copy",
                token_hash=hashlib.sha256(FORGED.encode()).hexdigest(),
                scopes=genuine.scopes,
                can_rotate=genuine.can_rotate,
                created_at=genuine.created_at,
                mac=genuine.mac,
                mac_key_id=genuine.mac_key_id,
            )
        )
        bump(conn)
    refused_for_integrity(world, FORGED)
    assert status_of(world, world.tokens["root-c"])[0] == 200  # the genuine one still works


def test_widened_scopes_and_an_unrevoked_token_are_refused(served: World, engine):
    world = served
    assert status_of(world, world.tokens["app-a1"])[0] == 403  # app-a1 may not read root
    expect(world.cli("token", "revoke", "root-c2", "--yes"))
    with engine.begin() as conn:
        conn.execute(
            update(AccessToken)
            .where(AccessToken.name == "app-a1")
            .values(scopes=json.dumps(["app:c/a1", "root:c"]))
        )
        conn.execute(
            update(AccessToken).where(AccessToken.name == "root-c2").values(revoked_at=None)
        )
        # A lifetime made longer is caught too.
        conn.execute(
            update(AccessToken).where(AccessToken.name == "app-a1a2").values(expires_at=None)
        )
        bump(conn)
    refused_for_integrity(world, world.tokens["app-a1"])
    refused_for_integrity(world, world.tokens["app-a1"], "/v1/clusters/c/apps/a1")
    refused_for_integrity(world, world.tokens["root-c2"], "/v1/clusters/c2/root")
    assert status_of(world, world.tokens["root-c"])[0] == 200
    checked = world.cli("db", "check", "--integrity", "--json")
    assert checked.exit_code != 0
    failing = {row["row"] for row in json.loads(checked.stdout)["failing"]}
    assert any("'app-a1'" in r for r in failing) and any("'root-c2'" in r for r in failing)
    assert not any("'app-a1a2'" in r for r in failing)  # its expiry was NULL already


def test_master_key_rotate_re_macs_every_row_and_tokens_keep_working(served: World, engine):
    world = served
    with engine.connect() as conn:
        old = set(conn.scalars(select(AccessToken.mac_key_id).distinct()))
    assert len(old) == 1 and None not in old
    expect(world.cli("master-key", "rotate", "--yes"))
    with engine.connect() as conn:
        new = set(conn.scalars(select(AccessToken.mac_key_id).distinct()))
        for table in ("clusters", "access_tokens"):
            ids = set(conn.scalars(text(f"SELECT DISTINCT mac_key_id FROM {table}")))
            assert ids == new, table
    assert new.isdisjoint(old)
    assert old.isdisjoint(load_keyring(Path(os.environ["KEYVAULT_MASTER_KEY_FILE"])).keys)
    # The server holds the old keyring: it reads the file again for the new MACs.
    for name in ("root-c", "app-a1", "rotator"):
        path = "/v1/clusters/c/root" if name != "app-a1" else "/v1/clusters/c/apps/a1"
        assert status_of(world, world.tokens[name], path)[0] == 200, name
    expect(world.cli("db", "check", "--integrity"))


def test_a_rotate_request_on_a_moved_cluster_is_refused_naming_it(served: World, engine):
    world = served
    with engine.begin() as conn:
        conn.execute(text("UPDATE clusters SET open_api_url = 'http://attacker.example:8992'"))
    with world.http("rotator") as http:
        response = http.post("/v1/clusters/c/root/rotate")
    assert response.status_code == 503, response.status_code
    body = response.json()
    assert body["error"] == "integrity_error"
    assert "clusters row" in body["detail"] and "'c'" in body["detail"]
