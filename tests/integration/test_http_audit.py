"""The HTTP audit trail, against a real ``keyvault serve`` on SQLite and PostgreSQL.

- ``POST .../rotate`` records its intent (outcome ``started``) before it acts: a database
  that refuses the record gets a 503 and nothing is rotated; a database that refuses only
  the outcome record does not turn the rotation's own answer into a 503 (a retrying client
  would rotate again and kill the key it never received).
- Refused rotates (401/403), ``/versions``, ``/events`` and failed key reads (503) are
  audited, with the token's name once it is known and the outcome.

The database refuses records through a trigger installed in it (no patching of keyvault).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select, text

from keyvault.models import AuditRecord
from tests.support.cli import expect
from tests.support.db import audit_appends_held
from tests.support.http import World, add_sshd_cluster
from tests.support.timeouts import TIMEOUT

REFUSE_ROTATE = "NEW.action = 'rotate'"
REFUSE_ROTATE_OUTCOME = "NEW.action = 'rotate' AND NEW.outcome <> 'started'"


def refuse_audit(engine, condition: str) -> None:
    """Make the database refuse every audit_log insert matching ``condition`` (SQL on NEW)."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(
                text(
                    f"CREATE TRIGGER kv_refuse_audit BEFORE INSERT ON audit_log WHEN {condition} "
                    "BEGIN SELECT RAISE(ABORT, 'audit refused by the test'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION kv_refuse_audit() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'audit refused by the test'; END $$"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER kv_refuse_audit BEFORE INSERT ON audit_log FOR EACH ROW "
                    f"WHEN ({condition}) EXECUTE FUNCTION kv_refuse_audit()"
                )
            )


def allow_audit(engine) -> None:
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(text("DROP TRIGGER kv_refuse_audit"))
        else:
            conn.execute(text("DROP TRIGGER kv_refuse_audit ON audit_log"))
            conn.execute(text("DROP FUNCTION kv_refuse_audit()"))


def records_after(engine, last_id: int) -> list[tuple]:
    """(token, action, cluster, scope, outcome) of the audit records after ``last_id``."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                AuditRecord.token_name,
                AuditRecord.action,
                AuditRecord.cluster,
                AuditRecord.scope,
                AuditRecord.outcome,
            )
            .where(AuditRecord.id > last_id)
            .order_by(AuditRecord.id)
        )
        return [tuple(r) for r in rows]


def last_audit_id(engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.coalesce(func.max(AuditRecord.id), 0)))


class TaHost:
    """A TCP listener standing in for the TA host: it counts the rotation service's connections
    (the act: reaching out to ta-tool) and closes each at once, so the rotation fails fast."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed: the test is over
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(timeout=TIMEOUT)


@pytest.fixture
def ta_host(served: World) -> Iterator[TaHost]:
    """Cluster c2's one SSH host (a ``TaHost``) and a token that may rotate its root key."""
    host = TaHost()
    try:
        expect(
            served.cli(
                "host", "add", "c2", "127.0.0.1", "--port", str(host.port), "--become", "none"
            )
        )
        served.create_token("rotator-c2", "root:c2", rotate=True)
        yield host
    finally:
        host.close()


def test_a_rotation_whose_intent_cannot_be_recorded_is_not_done(
    served: World, engine, ta_host: TaHost
):
    world = served
    last = last_audit_id(engine)
    refuse_audit(engine, REFUSE_ROTATE)
    try:
        with world.http("rotator-c2") as http:
            refused = http.post("/v1/clusters/c2/root/rotate")
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "database_error"
        assert "audit" in refused.json()["detail"]
        assert ta_host.connections == 0  # the rotation never reached out to the TA host
    finally:
        allow_audit(engine)
    assert records_after(engine, last) == []

    # Control: with the audit back, the same request does start a rotation (which then fails:
    # the host speaks no SSH): its intent first, then its outcome.
    with world.http("rotator-c2") as http:
        failed = http.post("/v1/clusters/c2/root/rotate")
    assert failed.status_code == 502, failed.text
    assert failed.json()["error"] == "ssh_error"
    assert ta_host.connections >= 1
    assert records_after(engine, last) == [
        ("rotator-c2", "rotate", "c2", "root", "started"),
        ("rotator-c2", "rotate", "c2", "root", "ssh_error"),
    ]


def test_an_outcome_that_cannot_be_recorded_does_not_hide_what_the_rotation_did(
    served: World, engine, ta_host: TaHost
):
    world = served
    last = last_audit_id(engine)
    refuse_audit(engine, REFUSE_ROTATE_OUTCOME)
    try:
        with world.http("rotator-c2") as http:
            answer = http.post("/v1/clusters/c2/root/rotate")
    finally:
        allow_audit(engine)
    # The rotation's own answer, not the audit's 503: the client learns what happened.
    assert answer.status_code == 502, answer.text
    assert answer.json()["error"] == "ssh_error"
    assert ta_host.connections >= 1  # it did act
    # The intent was recorded before the act; only the outcome is missing (and logged).
    assert records_after(engine, last) == [("rotator-c2", "rotate", "c2", "root", "started")]
    assert "was not recorded" in world.server.log_tail(chars=20_000)


def test_refused_rotates_versions_events_and_failed_reads_are_audited(served: World, engine):
    world = served
    last = last_audit_id(engine)
    with world.http() as anonymous:
        assert anonymous.post("/v1/clusters/c/root/rotate").status_code == 401
        assert anonymous.get("/v1/events").status_code == 401
    with world.http("root-c") as http:
        assert http.post("/v1/clusters/c/root/rotate").status_code == 403  # may not rotate
        assert http.post("/v1/clusters/c/apps/a1/rotate").status_code == 403  # not its scope
        assert http.get("/v1/clusters/c/root/versions").status_code == 200
        assert http.get("/v1/clusters/c/apps/a1/versions").status_code == 403
        assert http.get("/v1/events").status_code == 200
    with world.http("app-all") as http:
        assert http.get("/v1/clusters/c/apps/nope/versions").status_code == 404
    assert records_after(engine, last) == [
        ("(none)", "rotate", "c", "root", "unauthorized"),
        ("(none)", "events", None, None, "unauthorized"),
        ("root-c", "rotate", "c", "root", "forbidden"),
        ("root-c", "rotate", "c", "app:a1", "forbidden"),
        ("root-c", "versions", "c", "root", "ok"),
        ("root-c", "versions", "c", "app:a1", "forbidden"),
        ("root-c", "events", None, None, "ok"),
        ("app-all", "versions", "c", "app:nope", "not_found"),
    ]

    # A key read that fails on the server's side (503) is audited too, when the audit can be.
    last = last_audit_id(engine)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE revision RENAME TO revision_away"))
    try:
        with world.http("app-all") as http:
            failed = http.get("/v1/clusters/c/apps/a1")
        assert failed.status_code == 503, failed.text
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE revision_away RENAME TO revision"))
    with world.http("app-all") as http:  # written with (or before) the next batch
        assert http.get("/v1/clusters/c/apps/a1").status_code == 200
    assert records_after(engine, last) == [
        ("(none)", "read", "c", "app:a1", "database_error"),  # before its token was looked up
        ("app-all", "read", "c", "app:a1", "ok"),
    ]


def test_a_rotated_key_reaches_the_client_even_when_its_outcome_cannot_be_audited(
    served: World, engine, sshd_env, ta_sim
):
    """The issue's case, over the real sshd: the audit refuses the outcome record after ta-tool
    made the new key. The client still gets the rotation's answer (200, the new version), not
    a 503 that would make it rotate again and kill the key it never received."""
    from keyvault.sandbox import state as st
    from keyvault.sandbox.openapi import serving

    world = served
    with serving(ta_sim) as api:
        api_url = f"http://127.0.0.1:{api.server_address[1]}"
        add_sshd_cluster(world, sshd_env, api_url)
        last = last_audit_id(engine)
        refuse_audit(engine, REFUSE_ROTATE_OUTCOME)
        try:
            with world.http("rotator-t") as http:
                rotated = http.post("/v1/clusters/t/root/rotate")
        finally:
            allow_audit(engine)
        assert rotated.status_code == 200, rotated.text
        body = rotated.json()
        assert body["new_version"] == 1 and body["verify_state"] == "verified"
        with world.http("rotator-t") as http:
            current = http.get("/v1/clusters/t/root")
        assert current.status_code == 200
        assert current.json()["version"] == body["new_version"]
        same = current.json()["key"] == st.current_key(ta_sim, "root")
        assert same, "the key served is not the one TA holds"
    assert records_after(engine, last) == [
        ("rotator-t", "rotate", "t", "root", "started"),  # the outcome was refused
        ("rotator-t", "read", "t", "root", "ok"),
    ]
    assert "was not recorded" in world.server.log_tail(chars=20_000)


def test_a_read_answered_503_is_never_audited_ok(served: World, engine):
    """The audit writer is held up past the request's budget: the client gets 503, and the
    audit never says that read was served (its record is dropped or fails with its batch;
    a record of the 503 is queued instead)."""
    import os

    from tests.support.http import Server, key_matches

    workdir = served.server.workdir
    served.server.stop()
    served.server = Server(workdir, env={**os.environ, "KEYVAULT_HTTP_DB_BUDGET": "1"}).start()

    def reads(outcome: str) -> int:
        with engine.connect() as conn:
            return conn.scalar(
                select(func.count()).where(
                    AuditRecord.action == "read",
                    AuditRecord.scope == "app:a1",
                    AuditRecord.token_name == "app-all",
                    AuditRecord.outcome == outcome,
                )
            )

    with served.http("app-all") as http:
        assert key_matches(served, http.get("/v1/clusters/c/apps/a1").json(), "c", "app:a1")
        # Only audit appends are held (reads, tokens and keys still answer): SQLite's write
        # lock, or a lock on the chain's head that FOR UPDATE waits for.
        with audit_appends_held(engine):
            held = http.get("/v1/clusters/c/apps/a1")
        assert held.status_code == 503 and "key" not in held.json(), held.text
        # A read after the lock: committed after anything queued before it.
        assert key_matches(served, http.get("/v1/clusters/c/apps/a1").json(), "c", "app:a1")
    assert reads("ok") == 2  # the two reads that got the key, not the one that got 503
    result = expect(served.cli("audit", "verify"))
    assert "audit chain verified" in result.stdout
