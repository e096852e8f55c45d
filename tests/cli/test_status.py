"""`keyvault status`: exit 0 when all is fine, 3 when something needs a person, with what to do."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import update

from keyvault.db import make_engine, session_factory, transaction
from keyvault.models import (
    Cluster,
    Event,
    Rotation,
    ScopeSchedule,
    SecretVersion,
    WebhookDelivery,
    utcnow,
)
from tests.support.cli import Cli

CLUSTER = "ta2"
KEY = "Q" * 64  # a key-shaped value; never printed by status


def ok(result, code: int = 0):
    assert result.exit_code == code, f"exit {result.exit_code}; stderr: {result.stderr!r}"
    return result


def status_json(cli, *args: str, code: int) -> dict:
    return json.loads(ok(cli("status", "--json", *args), code).stdout)


def attention(report: dict) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for f in report["findings"]:
        if f["status"] == "attention":
            found.setdefault(f["check"], []).append(f)
    return found


@pytest.fixture
def store(cli, home):
    ok(cli("init"))
    ok(cli("cluster", "add", CLUSTER, "--open-api-url", "http://ta2:8992"))
    engine = make_engine(home.database_url)
    yield session_factory(engine)
    engine.dispose()


def test_a_fresh_store_is_all_ok(cli, store):
    report = status_json(cli, code=0)
    assert report["ok"] is True
    assert [f["check"] for f in report["findings"]] == [
        "schema",
        "spool",
        "keyring",
        "project_ids",
        "rotations",
        "old_keys",
        "paused",
        "scheduler",
        "key_age",
        "tokens",
        "webhooks",
        "leases",
    ]
    assert {f["status"] for f in report["findings"]} == {"ok"}
    table = ok(cli("status")).stdout
    assert "ATTENTION" not in table and table.startswith("schema")


def test_each_problem_is_reported_with_what_to_do(cli, store, home):
    ok(cli("import", "--cluster", CLUSTER, "--appid", "app1", input=KEY + "\n"))
    ok(cli("policy", "set", "--cluster", CLUSTER, "--appid", "app1", "--max-age", "30d"))
    ok(cli("token", "create", "soon", "--scope", f"root:{CLUSTER}", "--expires", "2d"))
    ok(cli("token", "create", "later", "--scope", f"root:{CLUSTER}", "--expires", "60d"))
    ok(
        cli(
            "webhook",
            "add",
            "--allow-private-network",
            "https://hooks.example.com/kv",
            "--scope",
            f"root:{CLUSTER}",
        )
    )
    now = utcnow()
    with transaction(store) as session:
        cluster = session.query(Cluster).one()
        session.execute(update(SecretVersion).values(created_at=now - timedelta(days=45)))
        # A mapping stored before mappings were validated.
        session.execute(update(Cluster).values(options=json.dumps({"project_ids": {"": 3}})))
        session.add(
            Rotation(
                id="r0000000001a",
                cluster_id=cluster.id,
                scope="app:app1",
                state="needs_recovery",
                host_label="ta@host:22",
                actor="pytest",
                created_at=now,
                updated_at=now,
            )
        )
        session.add(
            ScopeSchedule(
                cluster_id=cluster.id,
                scope="root",
                consecutive_failures=5,
                paused_at=now,
                last_error="ssh refused",
                updated_at=now,
            )
        )
        event = Event(
            type="key.rotated", cluster=CLUSTER, scope="root", payload="{}", created_at=now
        )
        session.add(event)
        session.flush()
        session.add(
            WebhookDelivery(
                webhook_id=1, event_id=event.id, status="dead", next_attempt_at=now, created_at=now
            )
        )
    (home.path / "spool").mkdir(mode=0o700, exist_ok=True)
    (home.path / "spool" / "r0000000002b.json").write_text("{}")

    report = status_json(cli, code=3)
    found = attention(report)
    assert report["ok"] is False
    assert set(found) == {
        "spool",
        "project_ids",
        "rotations",
        "paused",
        "scheduler",  # a policy, and no scheduler run ever
        "key_age",
        "tokens",
        "webhooks",
    }
    assert f"cluster set {CLUSTER} --remove-project-id ''" in found["project_ids"][0]["action"]
    assert "keyvault rotations recover r0000000002b" in found["spool"][0]["action"]
    assert "r0000000001a" in found["rotations"][0]["detail"]
    assert "keyvault rotations recover r0000000001a" in found["rotations"][0]["action"]
    assert "ssh refused" in found["paused"][0]["detail"]
    assert f"policy resume --cluster {CLUSTER} --root" in found["paused"][0]["action"]
    assert "app:app1" in found["key_age"][0]["detail"]
    assert [f["detail"].split()[1] for f in found["tokens"]] == ["soon"]  # 60d is not within 14
    assert "webhook 1" in found["webhooks"][0]["detail"]
    assert all(f["action"] for fs in found.values() for f in fs)
    # --token-days widens the horizon.
    assert len(attention(status_json(cli, "--token-days", "90", code=3))["tokens"]) == 2

    table = ok(cli("status"), 3).stdout
    assert table.count("ATTENTION") == 8 and table.count("-> ") == 8
    assert KEY not in table


def test_a_wrong_keyring_skips_the_checks_that_need_it(cli, store, tmp_path, monkeypatch):
    from keyvault import crypto

    other = tmp_path / "other.key"
    crypto.save_keyring(other, crypto.Keyring.generate())
    monkeypatch.setenv("KEYVAULT_MASTER_KEY_FILE", str(other))
    report = status_json(cli, code=3)
    assert list(attention(report)) == ["keyring"]
    assert "master key" in attention(report)["keyring"][0]["detail"]
    assert attention(report)["keyring"][0]["action"]
    assert report["findings"][-1]["status"] == "skipped"


def run_cli(*args: str):
    return Cli()(*args)


def isolated_env(monkeypatch, home_path, database_url: str) -> None:
    for name in ("KEYVAULT_MASTER_KEY_FILE", "KEYVAULT_OUTPUT", "KEYVAULT_LOG_FORMAT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KEYVAULT_HOME", str(home_path))
    monkeypatch.setenv("KEYVAULT_DATABASE_URL", database_url)


def test_a_database_without_schema_says_run_init(blank_db_url, tmp_path, monkeypatch):
    # Not the `cli` fixture: that one's database is migrated to head.
    isolated_env(monkeypatch, tmp_path / "kv", blank_db_url)
    report = json.loads(ok(run_cli("status", "--json"), 3).stdout)
    schema = report["findings"][0]
    assert (schema["check"], schema["status"]) == ("schema", "attention")
    assert "keyvault init" in schema["action"]
    assert [f["status"] for f in report["findings"]] == ["attention", "skipped"]


def test_an_unreachable_database_is_reported_not_raised(tmp_path, monkeypatch):
    unreachable = "postgresql+psycopg://kv:pw@127.0.0.1:1/none?connect_timeout=2"
    isolated_env(monkeypatch, tmp_path / "kv", unreachable)
    result = run_cli("status")
    assert result.exit_code == 3
    assert "cannot reach the database" in result.stdout and ":pw@" not in result.stdout
