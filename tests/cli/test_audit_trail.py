"""The audit trail of CLI actions: every key read and state change records its intent before
it acts and its outcome after, under the OS user; no intent, no action; `audit list` and
error lines never hand control characters to the terminal. Both databases."""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat

import pytest
from sqlalchemy import text

from tests.support.cli import describe, expect, one_error_line
from tests.support.leak_guard import new_key

CLUSTER = "ta2"
OS_USER = pwd.getpwuid(os.geteuid()).pw_name
ACTOR = OS_USER if OS_USER == "pytest" else f"{OS_USER} [declared: pytest]"  # home sets the label


@pytest.fixture
def store(cli, monkeypatch):
    monkeypatch.delenv("SUDO_USER", raising=False)  # a run under sudo: ACTOR stays exact
    expect(cli("init"))
    expect(cli("cluster", "add", CLUSTER, "--open-api-url", "http://127.0.0.1:9"))
    return cli


def audit_rows(cli) -> list[dict]:
    """The whole audit log, oldest first, without the chain's own chain-key records."""
    listed = json.loads(expect(cli("audit", "list", "--json", "--limit", "5000")).stdout)
    return [r for r in reversed(listed) if not r["action"].startswith("audit.chain_key_started")]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_action(rows: list[dict], action: str) -> tuple[dict, dict]:
    """The intent and outcome records of the last run of ``action`` in ``rows``."""
    mine = [r for r in rows if r["action"] == action][-2:]
    assert [r["phase"] for r in mine] == ["intent", "outcome"], (action, mine)
    intent, outcome = mine
    assert intent["outcome"] == "pending" and outcome["intent_id"] == intent["id"], action
    assert intent["id"] < outcome["id"] and intent["at"] <= outcome["at"], action
    assert intent["actor"] == outcome["actor"] == ACTOR and intent["token"] is None, action
    return intent, outcome


def test_every_key_read_and_change_records_intent_then_outcome_as_the_os_user(store):
    port = str(closed_port())
    key = new_key()
    # (action, expected outcome, command line, what the intent names); "ok" exits 0, else 1
    runs = [
        ("cluster.add", "ok", "cluster add c2 --open-api-url http://c2:8992", {"cluster": "c2"}),
        ("cluster.set", "ok", "cluster set c2 --login-name admin", {"cluster": "c2"}),
        ("host.add", "ok", f"host add {CLUSTER} 127.0.0.1 --port {port}", {"cluster": CLUSTER}),
        ("host.trust", "ssh_error", f"host trust {CLUSTER} 127.0.0.1 --port {port} --yes", {}),
        ("host.remove", "ok", f"host remove {CLUSTER} 127.0.0.1 --port {port} --yes", {}),
        ("import", "ok", f"import --cluster {CLUSTER} --appid app1", {"scope": "app:app1"}),
        ("secrets.reveal", "ok", f"secrets show --cluster {CLUSTER} --appid app1 --reveal", {}),
        ("token.create", "ok", f"token create svc --scope root:{CLUSTER}", {"target": "token:svc"}),
        ("token.revoke", "ok", "token revoke svc --yes", {"target": "token:svc"}),
        (
            "webhook.add",
            "ok",
            f"webhook add --allow-private-network https://hooks.example.com/kv --scope root:{CLUSTER}",
            {},
        ),
        ("webhook.remove", "ok", "webhook remove 1 --yes", {"target": "webhook:1"}),
        ("policy.set", "ok", f"policy set --cluster {CLUSTER} --root --max-age 30d", {}),
        ("policy.resume", "ok", f"policy resume --cluster {CLUSTER}", {"cluster": CLUSTER}),
        ("policy.remove", "ok", f"policy remove --cluster {CLUSTER} --root", {}),
        ("rotate.root", "not_found", f"rotate root --cluster {CLUSTER} --yes", {"scope": "root"}),
        ("rotate.app", "failed", f"rotate app --cluster {CLUSTER} a1 a2 --yes", {}),
        ("rotate.due", "ok", f"rotate due --cluster {CLUSTER}", {"cluster": CLUSTER}),
        ("rotations.recover", "ok", "rotations recover --all", {"target": "rotations: --all"}),
        ("verify", "ok", f"verify --cluster {CLUSTER} --appid app1", {"scope": "app:app1"}),
    ]
    names = {  # what the intents name, beyond the column checked in the table
        "host.add": {"target": f"host:127.0.0.1:{port}"},
        "host.trust": {"cluster": CLUSTER, "target": f"host:127.0.0.1:{port}"},
        "secrets.reveal": {"cluster": CLUSTER, "scope": "app:app1"},
        "webhook.add": {"target": "https://hooks.example.com/kv"},
        "policy.set": {"cluster": CLUSTER, "target": "policy:root"},
        "policy.remove": {"target": "policy:root"},
        "rotate.app": {"cluster": CLUSTER, "target": "apps: a1 a2"},
    }
    for action, outcome, argv, _ in runs:
        stdin = key + "\n" if action == "import" else None
        result = store(*argv.split(), input=stdin)
        assert result.exit_code == (0 if outcome == "ok" else 1), (argv, describe(result))
    rows = audit_rows(store)
    for action, outcome, argv, named in runs:
        intent, done = one_action(rows, action)
        assert done["outcome"] == outcome, (argv, done)
        for field, value in {**named, **names.get(action, {})}.items():
            assert intent[field] == value, (argv, field, intent)
    # A failed action says why; a key or a token never reaches the log.
    assert "no SSH hosts" in one_action(rows, "rotate.root")[1]["detail"]
    assert key not in json.dumps(rows)
    # Reading without --reveal prints no key and is not an audited read; the dry run acts on nothing.
    expect(store("secrets", "show", "--cluster", CLUSTER, "--appid", "app1"))
    expect(store("rotate", "due", "--dry-run"))
    assert len(audit_rows(store)) == len(rows)


def test_a_refused_confirmation_is_recorded_and_nothing_is_done(store):
    expect(store("token", "create", "svc", "--scope", f"root:{CLUSTER}"))
    # No terminal and no --yes: the question cannot be asked, so nothing is revoked.
    one_error_line(store("token", "revoke", "svc"), 2, "needs confirmation")
    _, outcome = one_action(audit_rows(store), "token.revoke")
    assert outcome["outcome"] == "usage_error" and "--yes" in outcome["detail"]
    [token] = json.loads(expect(store("token", "list", "--json")).stdout)
    assert token["status"] == "active"


def test_the_actor_is_the_os_user_and_sudo_never_only_the_declared_label(store, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "alice")
    monkeypatch.setenv("KEYVAULT_ACTOR", "someone-else")
    expect(store("import", "--cluster", CLUSTER, "--root", input=new_key()))
    rows = audit_rows(store)
    expected = f"{OS_USER} (sudo by alice) [declared: someone-else]"
    assert {r["actor"] for r in rows if r["action"] == "import"} == {expected}
    # The key version and its event carry the same actor as the audit record.
    [version] = json.loads(
        expect(store("secrets", "history", "--cluster", CLUSTER, "--root", "--json")).stdout
    )
    assert version["created_by"] == expected


def _break_audit_log(engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_log RENAME TO audit_log_away"))


def _mend_audit_log(engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_log_away RENAME TO audit_log"))


def test_a_command_whose_intent_cannot_be_written_does_not_act(store, engine):
    key = new_key()
    _break_audit_log(engine)
    try:
        one_error_line(
            store("token", "create", "svc", "--scope", f"root:{CLUSTER}"),
            1,
            "cannot write the audit record of token.create, so nothing was done",
        )
        one_error_line(
            store("import", "--cluster", CLUSTER, "--appid", "app1", input=key),
            1,
            "cannot write the audit record of import",
        )
        one_error_line(
            store("cluster", "add", "c9", "--open-api-url", "http://c9:1"), 1, "audit record"
        )
    finally:
        _mend_audit_log(engine)
    assert json.loads(expect(store("token", "list", "--json")).stdout) == []
    assert json.loads(expect(store("secrets", "list", "--json")).stdout) == []
    assert [c["name"] for c in json.loads(expect(store("cluster", "list", "--json")).stdout)] == [
        CLUSTER
    ]
    # Only the fixture's `cluster add` is in the log: the refused commands left nothing half-done.
    assert [(r["action"], r["phase"]) for r in audit_rows(store)] == [
        ("cluster.add", "intent"),
        ("cluster.add", "outcome"),
    ]


REFUSE_OUTCOMES = {
    "sqlite": [
        "CREATE TRIGGER kv_refuse_outcome BEFORE INSERT ON audit_log WHEN NEW.phase = 'outcome' "
        "BEGIN SELECT RAISE(ABORT, 'outcome refused'); END"
    ],
    "postgres": [
        "CREATE FUNCTION kv_refuse_outcome() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.phase = 'outcome' THEN RAISE EXCEPTION 'outcome refused'; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER kv_refuse_outcome BEFORE INSERT ON audit_log FOR EACH ROW "
        "EXECUTE FUNCTION kv_refuse_outcome()",
    ],
}


def test_an_outcome_that_cannot_be_written_is_reported_and_the_result_stands(
    store, engine, database
):
    with engine.begin() as conn:
        for statement in REFUSE_OUTCOMES[database.backend]:
            conn.execute(text(statement))
    result = expect(store("token", "create", "svc", "--scope", f"root:{CLUSTER}"))
    assert result.stdout.startswith("kvt_")  # the token was made and is shown: it exists now
    assert "warning: token.create ended (ok) but its outcome could not be written" in result.stderr
    assert "outcome refused" in result.stderr
    [intent] = [r for r in audit_rows(store) if r["action"] == "token.create"]
    assert (intent["phase"], intent["outcome"]) == ("intent", "pending")


HOSTILE = "app:\x1b[2J\x1b]0;owned\x07\nfake  line\r\x9b31m\u202e"


def test_audit_list_shows_control_characters_escaped(store, engine):
    with engine.begin() as conn:  # a record as the HTTP server writes it for a hostile path
        conn.execute(
            text(
                "INSERT INTO audit_log (at, token_name, action, cluster, scope, client, outcome) "
                "VALUES (CURRENT_TIMESTAMP, '(none)', 'read', :cluster, :scope, '127.0.0.1', 'unauthorized')"
            ),
            {"cluster": "c\x1b[31m", "scope": HOSTILE},
        )
    table = expect(store("audit", "list", "--token", "(none)")).stdout
    lines = table.splitlines()
    assert len(lines) == 2, lines  # the header and one record: no forged line
    assert not any(ch in table for ch in "\x1b\x07\r\x9b\u202e")
    assert "app:\\x1b[2J\\x1b]0;owned\\x07\\x0afake  line\\x0d\\x9b31m\\u202e" in lines[1]
    assert "c\\x1b[31m" in lines[1]
    shown = expect(store("audit", "list", "--token", "(none)", "--json")).stdout
    assert not any(ch in shown for ch in "\x1b\x07\r\n\x9b\u202e".replace("\n", ""))
    assert json.loads(shown)[0]["scope"] == HOSTILE  # JSON escapes, and keeps the text exact


@pytest.mark.slow
def test_an_error_carrying_ansi_from_ta_tool_is_shown_stripped(cli, home):
    """A real rotation through the simulator's SSH front, its ta-tool replaced by one that
    paints the terminal and fails: the error line keeps the words, not the sequences."""
    from keyvault.sandbox.run import SandboxPaths, stop

    expect(cli("init"))
    try:
        expect(cli("sandbox", "up", "--ssh-port", "0", "--api-port", "0"))
        rotated = expect(cli("rotate", "root", "--cluster", "sandbox", "--yes"))
        assert "rotated" in rotated.stdout
        tool = SandboxPaths(home.path).ta_tool
        tool.write_text(
            "#!/bin/sh\n"
            "printf '\\033[2J\\033]0;owned\\007ta-tool: \\033[31mlicence expired\\033[0m\\n' >&2\n"
            "exit 3\n"
        )
        tool.chmod(stat.S_IRWXU)
        result = cli("rotate", "root", "--cluster", "sandbox", "--yes")
        line = one_error_line(result, result.exit_code or 1, "ta-tool: licence expired")
        assert not any(ch in result.stderr for ch in "\x1b\x07\r"), line
        assert "owned" not in line  # the window-title sequence went whole, not just its ESC
    finally:
        stop(SandboxPaths(home.path))
    rows = audit_rows(cli)
    assert [r["outcome"] for r in rows if r["action"] == "rotate.root"] == [
        "pending",
        "ok",
        "pending",
        "rotation_error",
    ]


@pytest.mark.slow
def test_an_unauthenticated_hostile_path_cannot_reach_the_terminal(served):
    """The issue's case: a request path with %1b[2J and %0a, no token, a real server. A bad
    APPID is refused (400) before it is audited, so the hostile bytes ride in the cluster."""
    with served.http() as http:
        refused = http.get("/v1/clusters/c/apps/%1b[2J%0aforged%20line")
        answer = http.get("/v1/clusters/%1b[2J%0aforged%20line/root")
    assert refused.status_code == 400
    assert answer.status_code == 401
    table = expect(served.cli("audit", "list", "--token", "(none)")).stdout
    lines = table.splitlines()
    assert len(lines) == 2 and "\x1b" not in table, lines  # header + one record, nothing raw
    assert "\\x1b[2J\\x0aforged line" in lines[1]
