"""Write commands: input refused by parameter types, project id maps, one JSON shape each,
`--since`, and `--log-format`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from keyvault.errors import InvalidInput, NotFound
from tests.support.cli import Cli, expect, one_error_line
from tests.support.timeouts import TIMEOUT

CLUSTER = "ta2"
KEY = "K" * 64


@pytest.fixture
def store(cli):
    expect(cli("init"))
    expect(cli("cluster", "add", CLUSTER, "--open-api-url", "http://ta2:8992"))
    return cli


def project_ids(cli) -> dict:
    [row] = json.loads(expect(cli("cluster", "list", "--json")).stdout)
    return row["options"].get("project_ids", {})


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("=3", "invalid APPID ''"),
        ("app1", "is not APPID=PROJECT_ID"),
        ("app1=", "whole number"),
        ("app1=x", "whole number"),
        ("app1=-1", "whole number"),
        ("app1=3.5", "whole number"),
        ("app1=٣", "whole number"),  # a digit, but not an ASCII one
        ("a b=3", "invalid APPID"),
        ("$(id)=3", "invalid APPID"),
    ],
)
def test_bad_project_id_mappings_are_refused_before_anything_is_stored(store, value, fragment):
    one_error_line(
        store("cluster", "set", CLUSTER, "--project-id", "app0=1", "--project-id", value),
        2,
        "--project-id",
        fragment,
        "keyvault cluster set --help",
    )
    assert project_ids(store) == {}


def test_project_ids_are_added_replaced_and_removed(store):
    expect(store("cluster", "set", CLUSTER, "--project-id", "app1=3", "--project-id", "app2=4"))
    expect(store("cluster", "set", CLUSTER, "--project-id", "app2=5"))
    assert project_ids(store) == {"app1": 3, "app2": 5}
    shown = json.loads(
        expect(store("cluster", "set", CLUSTER, "--remove-project-id", "app1", "--json")).stdout
    )
    assert shown["options"]["project_ids"] == {"app2": 5}
    one_error_line(
        store("cluster", "set", CLUSTER, "--remove-project-id", "app1"),
        1,
        "no project id mapped for APPID 'app1' in cluster ta2",
    )
    assert project_ids(store) == {"app2": 5}


def test_a_bad_mapping_stored_before_validation_can_be_removed(store, home):
    from sqlalchemy import text

    from keyvault.db import make_engine

    engine = make_engine(home.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text("UPDATE clusters SET options = :o"),
                {"o": json.dumps({"project_ids": {"": 3, "ok": 1}})},
            )
    finally:
        engine.dispose()
    expect(store("cluster", "set", CLUSTER, "--remove-project-id", ""))
    assert project_ids(store) == {"ok": 1}


def test_the_service_refuses_bad_mappings_from_every_entrypoint(store, home):
    from keyvault.db import make_engine, session_factory, transaction
    from keyvault.services.clusters import add_cluster, set_options, update_project_ids

    engine = make_engine(home.database_url)
    try:
        factory = session_factory(engine)
        for bad in ({"": 3}, {"app1": "3"}, {"app1": -1}, {"app1": True}, ["app1"]):
            with pytest.raises(InvalidInput), transaction(factory) as session:
                # Refused before anything is sealed: no keyring needed.
                set_options(session, keyring=None, name=CLUSTER, project_ids=bad)
            with pytest.raises(InvalidInput), transaction(factory) as session:
                add_cluster(
                    session,
                    keyring=None,
                    name="other",
                    open_api_url="http://x:1",
                    options={"project_ids": bad},
                )
        with pytest.raises(InvalidInput), transaction(factory) as session:
            update_project_ids(session, keyring=None, name=CLUSTER, mapped={"=": 3})
        with pytest.raises(NotFound), transaction(factory) as session:
            update_project_ids(session, keyring=None, name=CLUSTER, removed=["nope"])
    finally:
        engine.dispose()
    assert project_ids(store) == {}


def test_write_commands_print_one_json_object(store):
    def as_json(*args: str, input: str | None = None) -> dict:  # noqa: A002
        data = json.loads(expect(store(*args, "--json", input=input)).stdout)
        assert isinstance(data, dict)
        return data

    added = as_json("cluster", "add", "c2", "--open-api-url", "http://c2:8992")
    assert (added["name"], added["open_api_url"], added["options"]) == ("c2", "http://c2:8992", {})
    assert as_json("cluster", "set", "c2", "--login-name", "admin")["options"] == {
        "login_name": "admin"
    }
    host = as_json("host", "add", CLUSTER, "ta2.internal", "--port", "2222")
    assert (host["address"], host["port"], host["fingerprint"]) == (
        "ta2.internal",
        2222,
        "(untrusted)",
    )
    stored = as_json("import", "--cluster", CLUSTER, "--appid", "app1", input=KEY + "\n")
    assert (stored["scope"], stored["version"], stored["old_version"]) == ("app:app1", 1, None)
    assert KEY not in json.dumps(stored)
    policy = as_json("policy", "set", "--cluster", CLUSTER, "--root", "--max-age", "30d")
    assert (policy["target"], policy["max_age_seconds"]) == ("root", 30 * 86400)
    removed = as_json("policy", "remove", "--cluster", CLUSTER, "--root")
    assert removed["target"] == "root"
    resumed = as_json("policy", "resume", "--cluster", CLUSTER)
    assert resumed == {"cluster": CLUSTER, "scope": None, "resumed": 0}
    token = as_json("token", "create", "svc", "--scope", f"root:{CLUSTER}")
    assert token["name"] == "svc" and token["token"].startswith("kvt_")
    init = as_json("init")
    assert init["created"] == [] and init["new_master_key"] is False


def test_since_takes_an_iso_time_or_a_duration(store):
    for since in ("1h", "2026-01-31T12:00", "2026-01-31T12:00:00+02:00"):
        shown = store("audit", "list", "--since", since, "--token", "none-such", "--json")
        assert json.loads(expect(shown).stdout) == []
    one_error_line(store("audit", "list", "--since", "yesterday"), 2, "invalid --since 'yesterday'")


def test_parse_since():
    from datetime import UTC, datetime, timedelta

    from keyvault.timespec import parse_duration, parse_since

    now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert parse_since("90m", now=now) == now - timedelta(minutes=90)
    assert parse_since("2026-02-01T00:00", now=now) == datetime(2026, 2, 1, tzinfo=UTC)
    assert parse_duration("2w") == timedelta(weeks=2)
    for bad in ("0d", "1y", "", "-1h"):
        with pytest.raises(InvalidInput):
            parse_duration(bad)


def test_log_format_json_makes_every_log_line_a_json_object(home):
    env = {**os.environ, "KEYVAULT_LOG_FORMAT": "json"}
    result = subprocess.run(
        [sys.executable, "-c", "from keyvault.cli import run; run()", "-v", "init"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records, "-v init logs the migrations it runs"
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert {r["level"] for r in records} <= {"info", "warning", "error"}


def test_log_format_is_checked(tmp_path, monkeypatch):

    monkeypatch.setenv("KEYVAULT_HOME", str(tmp_path / "kv"))
    result = Cli().invoke(["--log-format", "xml", "status"])
    one_error_line(result, 2, "--log-format")


def test_rotate_json_is_one_shape_when_the_only_scope_fails(store):
    """`rotate app X --json` prints {"results", "summary"} whether one scope or several, and a
    failure of the one scope is still the command's one-line error and exit code."""
    result = store("rotate", "app", "--cluster", CLUSTER, "a1", "--yes", "--json")
    line = one_error_line(result, 1, "no SSH hosts")
    body = json.loads(result.stdout)
    assert body["summary"] == {"rotated": 0, "failed": 1, "skipped": 0}, line
    (only,) = body["results"]
    assert only["status"] == "failed" and only["scope"] == "app:a1"
    assert only["error"]["code"] == "not_found" and "host add" in only["error"]["hint"]
