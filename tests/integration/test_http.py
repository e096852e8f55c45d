"""The HTTP service end to end: a real ``keyvault serve`` subprocess on 127.0.0.1, real HTTP
(httpx), on SQLite and on PostgreSQL (``db_url``).

The store behind the server is described in tests/support/http.py (fixture ``served``).
Keys are never printed: they are compared as ``ok = a == b; assert ok``, failure messages
show error bodies only after checking that they hold no key, and the leak guard scans the
whole run's output for every key made here (``new_key``) and by the TA emulator.

Every wait is bounded: subprocesses and HTTP requests have timeouts, load loops a fixed
count, thread joins a deadline. Nothing asserts how long something took.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from datetime import timedelta

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select, text, update

from keyvault.models import AccessToken, AuditRecord, Revision, Rotation, utcnow
from tests.support.cli import expect, proc_describe, run_keyvault
from tests.support.http import SCOPES, Server, World, free_port, key_matches, scrub
from tests.support.rowmac import reseal_all
from tests.support.timeouts import TIMEOUT

# 502: a host behind keyvault failed; 503: keyvault cannot serve. A 500 is a bug: never allowed.
ALLOWED_ERRORS = {400, 401, 403, 404, 409, 502, 503}
ROOT_ROUTE = "/v1/clusters/{cluster}/root"


# --- helpers -------------------------------------------------------------------------------------


def error_problems(world: World, response: httpx.Response) -> list[str]:
    """What is wrong with an error response (empty if it is a proper error)."""
    body = response.text
    if world.holds_key(body):
        return ["the error body holds a key"]  # never show it
    problems = []
    if response.status_code not in ALLOWED_ERRORS:
        problems.append(f"status {response.status_code} is not one of {sorted(ALLOWED_ERRORS)}")
    if not response.headers.get("content-type", "").startswith("application/json"):
        problems.append(f"content-type {response.headers.get('content-type')!r}")
    try:
        parsed = json.loads(body)
    except ValueError:
        return [*problems, f"not JSON: {scrub(body)[:200]!r}"]
    # An error about a rotation also names its rotation_id.
    if not isinstance(parsed, dict) or set(parsed) - {"rotation_id"} != {
        "error",
        "detail",
        "request_id",
    }:
        problems.append(f"not {{error, detail, request_id}}: {scrub(body)[:200]!r}")
    elif parsed["request_id"] != response.headers.get("x-request-id"):
        problems.append(f"request_id {parsed['request_id']!r} is not the X-Request-ID header")
    elif not (
        isinstance(parsed["error"], str) and parsed["error"] and isinstance(parsed["detail"], str)
    ):
        problems.append(f"error/detail are not strings: {scrub(body)[:200]!r}")
    if "Traceback" in body or 'File "' in body:
        problems.append("the body holds a traceback")
    if response.status_code == 401 and response.headers.get("www-authenticate") != "Bearer":
        problems.append(
            f"401 without WWW-Authenticate: Bearer ({response.headers.get('www-authenticate')!r})"
        )
    return problems


def assert_error(
    world: World, response: httpx.Response, status: int, code: str | None = None
) -> dict:
    problems = error_problems(world, response)
    assert not problems, f"{response.request.method} {response.request.url.path}: {problems}"
    body = response.json()
    assert response.status_code == status, (
        f"{response.request.url.path}: {response.status_code} {body}"
    )
    if code is not None:
        assert body["error"] == code, body
    return body


def assert_key(world: World, response: httpx.Response, cluster: str, scope: str) -> None:
    assert response.status_code == 200, (
        f"{response.request.url.path}: {response.status_code} {scrub(response.text)}"
    )
    version = world.versions[(cluster, scope)]
    assert response.headers.get("etag") == f'"v{version}"'
    ok = key_matches(world, response.json(), cluster, scope)
    assert ok, (
        f"{response.request.url.path}: not the current key v{version} of {scope} in {cluster}"
    )


def audit_count(engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(AuditRecord))


def path_of(cluster: str, scope: str) -> str:
    return (
        f"/v1/clusters/{cluster}/root"
        if scope == "root"
        else f"/v1/clusters/{cluster}/apps/{scope[4:]}"
    )


def sandbox_rotate_and_import(state_dir, appid: str, cluster: str = "c") -> None:
    """Another process makes a new key in the TA emulator's state and ``keyvault import``s it.

    The key goes from one child process to the other through a pipe: this process never sees it.
    """
    generate = (
        "import sys; from keyvault.sandbox.state import generate; "
        "sys.stdout.write(generate(sys.argv[1], sys.argv[2]) + '\\n')"
    )
    producer = subprocess.Popen(
        [sys.executable, "-c", generate, str(state_dir), f"app:{appid}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        result = subprocess.run(
            [sys.executable, "-m", "keyvault", "import", "--cluster", cluster, "--appid", appid],
            stdin=producer.stdout,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
    finally:
        producer.stdout.close()
        producer.wait(timeout=TIMEOUT)
    assert producer.returncode == 0, producer.stderr.read().decode(errors="replace")[-500:]
    producer.stderr.close()
    assert result.returncode == 0, proc_describe(result)


# --- 1. the scope matrix -------------------------------------------------------------------------

C, C2 = "/v1/clusters/c", "/v1/clusters/c2"
ENDPOINTS = {  # column -> (method, path, (cluster, scope) read or rotated, kind)
    "root": ("GET", f"{C}/root", ("c", "root"), "key"),
    "a1": ("GET", f"{C}/apps/a1", ("c", "app:a1"), "key"),
    "a2": ("GET", f"{C}/apps/a2", ("c", "app:a2"), "key"),
    "unknown": ("GET", f"{C}/apps/unknown", ("c", "app:unknown"), "key"),
    "root/v": ("GET", f"{C}/root/versions", ("c", "root"), "versions"),
    "a1/v": ("GET", f"{C}/apps/a1/versions", ("c", "app:a1"), "versions"),
    "a2/v": ("GET", f"{C}/apps/a2/versions", ("c", "app:a2"), "versions"),
    "unknown/v": ("GET", f"{C}/apps/unknown/versions", ("c", "app:unknown"), "versions"),
    "c2:root": ("GET", f"{C2}/root", ("c2", "root"), "key"),
    "c2:a1": ("GET", f"{C2}/apps/a1", ("c2", "app:a1"), "key"),
    "c2:root/v": ("GET", f"{C2}/root/versions", ("c2", "root"), "versions"),
    "c2:a1/v": ("GET", f"{C2}/apps/a1/versions", ("c2", "app:a1"), "versions"),
    "events": ("GET", "/v1/events", None, "events"),
    "rot:root": ("POST", f"{C}/root/rotate", ("c", "root"), "rotate"),
    "rot:a1": ("POST", f"{C}/apps/a1/rotate", ("c", "app:a1"), "rotate"),
    "rot:a2": ("POST", f"{C}/apps/a2/rotate", ("c", "app:a2"), "rotate"),
    "rot:c2": ("POST", f"{C2}/root/rotate", ("c2", "root"), "rotate"),
}
# ok: 200 with the right key / history / events   404: not_found   403: forbidden   401: unauthorized
# ran: the rotation service ran, and refused because cluster c has no SSH hosts (an error JSON)
MATRIX = {  # token -> one expectation per column of ENDPOINTS, in order
    #            root   a1     a2     unknown root/v a1/v   a2/v   unk/v  c2:root c2:a1 c2:r/v c2:a1/v events rot:root rot:a1 rot:a2 rot:c2
    "root-c": [
        "ok",
        403,
        403,
        403,
        "ok",
        403,
        403,
        403,
        403,
        403,
        403,
        403,
        "ok",
        403,
        403,
        403,
        403,
    ],
    "app-a1": [
        403,
        "ok",
        403,
        403,
        403,
        "ok",
        403,
        403,
        403,
        403,
        403,
        403,
        "ok",
        403,
        403,
        403,
        403,
    ],
    "app-all": [
        403,
        "ok",
        "ok",
        404,
        403,
        "ok",
        "ok",
        404,
        403,
        403,
        403,
        403,
        "ok",
        403,
        403,
        403,
        403,
    ],
    "root-c2": [
        403,
        403,
        403,
        403,
        403,
        403,
        403,
        403,
        "ok",
        403,
        "ok",
        403,
        "ok",
        403,
        403,
        403,
        403,
    ],
    "app-a1a2": [
        403,
        "ok",
        "ok",
        403,
        403,
        "ok",
        "ok",
        403,
        403,
        403,
        403,
        403,
        "ok",
        403,
        403,
        403,
        403,
    ],
    "rotator": [
        "ok",
        "ok",
        403,
        403,
        "ok",
        "ok",
        403,
        403,
        403,
        403,
        403,
        403,
        "ok",
        "ran",
        "ran",
        403,
        403,
    ],
    None: [401, 401, 401, 401, 401, 401, 401, 401, 401, 401, 401, 401, 401, 401, 401, 401, 401],
}
GRANTS = {  # what each token may read; also what its event feed holds (a secret.created per import)
    "root-c": {("c", "root")},
    "app-a1": {("c", "app:a1")},
    "app-all": {("c", "app:a1"), ("c", "app:a2")},
    "root-c2": {("c2", "root")},
    "app-a1a2": {("c", "app:a1"), ("c", "app:a2")},
    "rotator": {("c", "root"), ("c", "app:a1")},
}


def _check_pair(world: World, http: httpx.Client, token, column: str, expected) -> str | None:
    """None if (token, endpoint) behaved as the matrix says, else what happened instead."""
    method, path, target, kind = ENDPOINTS[column]
    response = http.request(method, path)
    status = response.status_code
    if expected == "ok":
        if status != 200:
            return f"{status} {scrub(response.text)[:160]}"
        body = response.json()
        if world.holds_key(json.dumps(body)) and kind != "key":
            return "a key in a metadata answer"
        if kind == "key":
            return (
                None
                if key_matches(world, body, *target)
                else "200 with the wrong key, version or scope"
            )
        if kind == "versions":
            versions = body.get("versions") or []
            good = (
                (body.get("cluster"), body.get("scope")) == target
                and len(versions) == 1
                and versions[0]["version"] == 1
                and versions[0]["state"] == "current"
                and "key" not in versions[0]
            )
            return None if good else f"unexpected history {body}"
        if kind == "events":
            seen = {(e["cluster"], e["scope"]) for e in body["events"]}
            return (
                None
                if seen == GRANTS[token]
                else f"events of {sorted(seen)}, expected {sorted(GRANTS[token])}"
            )
    problems = error_problems(world, response)
    if problems:
        return f"{status}: {problems}"
    error = response.json()["error"]
    if expected == "ran":
        # The right to rotate was granted: the service ran and refused (no hosts), never a 500.
        return (
            None
            if status in (404, 409, 503) and "no SSH hosts" in response.json()["detail"]
            else f"{status} {error}"
        )
    codes = {401: "unauthorized", 403: "forbidden", 404: "not_found"}
    if status != expected or error != codes[expected]:
        return f"{status} {error}: {response.json()['detail']}"
    return None


def test_scope_matrix_every_token_against_every_endpoint(served: World):
    world = served
    columns = list(ENDPOINTS)
    failures, checked = [], 0
    for token, row in MATRIX.items():
        assert len(row) == len(columns), token
        with world.http(token) as http:
            for column, expected in zip(columns, row, strict=False):
                outcome = _check_pair(world, http, token, column, expected)
                checked += 1
                if outcome is not None:
                    failures.append(
                        f"{token or '(no token)'} x {column}: expected {expected}, got {outcome}"
                    )
    assert checked == len(MATRIX) * len(ENDPOINTS) == 7 * 17
    assert not failures, "\n".join(failures)

    # Seen the other way round: each token reads exactly the stored keys its scopes name.
    readable = {}
    for token in GRANTS:
        with world.http(token) as http:
            readable[token] = {
                target for target in SCOPES if http.get(path_of(*target)).status_code == 200
            }
    assert readable == GRANTS


BAD_AUTHORIZATION = [
    None,
    "",
    "Bearer",
    "Bearer kvt_not-a-token",
    "Basic dXNlcjpwYXNz",
    "kvt_without_scheme",
    "Bearer " + "x" * 5000,
]


def test_expired_revoked_and_garbage_tokens_get_401(served: World, engine):
    world = served
    # Missing or garbage Authorization: 401 with WWW-Authenticate: Bearer, everywhere.
    with world.http() as http:
        for authorization in BAD_AUTHORIZATION:
            headers = {} if authorization is None else {"Authorization": authorization}
            for method, path in [
                ("GET", "/v1/clusters/c/root"),
                ("GET", "/v1/clusters/c/apps/a1"),
                ("GET", "/v1/clusters/c/apps/a1/versions"),
                ("GET", "/v1/events?after=0"),
                ("POST", "/v1/clusters/c/root/rotate"),
            ]:
                response = http.request(method, path, headers=headers)
                assert response.status_code == 401, (authorization and authorization[:30], path)
                assert_error(world, response, 401, "unauthorized")

    # Expired.
    world.create_token("expires-fresh", "root:c", expires="1h")
    world.create_token("expires-cached", "root:c", expires="1h")
    past = utcnow() - timedelta(minutes=1)
    with world.http("expires-cached") as http:
        assert_key(world, http.get("/v1/clusters/c/root"), "c", "root")  # now cached by the server
    # A plain data change: the token's lifetime ends a minute ago (before its first use).
    with engine.begin() as conn:
        conn.execute(
            update(AccessToken).where(AccessToken.name == "expires-fresh").values(expires_at=past)
        )
    reseal_all(engine)  # as if created so: an expired token, not a tampered one
    with world.http("expires-fresh") as http:
        for path in ("/v1/clusters/c/root", "/v1/clusters/c/root/versions", "/v1/events"):
            body = assert_error(world, http.get(path), 401, "unauthorized")
            assert "expired" in body["detail"]
    # The token the server has cached: changed the way every keyvault writer changes tokens, in a
    # transaction that also bumps the revision counter (the servers' cache contract, http/state.py).
    with engine.begin() as conn:
        conn.execute(
            update(AccessToken).where(AccessToken.name == "expires-cached").values(expires_at=past)
        )
    reseal_all(engine)
    with engine.begin() as conn:
        conn.execute(update(Revision).where(Revision.id == 1).values(value=Revision.value + 1))
    with world.http("expires-cached") as http:
        body = assert_error(world, http.get("/v1/clusters/c/root"), 401, "unauthorized")
        assert "expired" in body["detail"]
    listed = {
        t["name"]: t["status"]
        for t in json.loads(expect(world.cli("token", "list", "--json")).stdout)
    }
    assert listed["expires-fresh"] == listed["expires-cached"] == "expired"

    # Revoked: refused from the very next request.
    with world.http("app-all") as http:
        assert_key(world, http.get("/v1/clusters/c/apps/a2"), "c", "app:a2")
        expect(world.cli("token", "revoke", "app-all", "--yes"))
        body = assert_error(world, http.get("/v1/clusters/c/apps/a2"), 401, "unauthorized")
        assert "revoked" in body["detail"]
        for path in ("/v1/clusters/c/apps/a1/versions", "/v1/events"):
            assert_error(world, http.get(path), 401, "unauthorized")
        assert_error(world, http.post("/v1/clusters/c/apps/a1/rotate"), 401, "unauthorized")
    with world.http("app-a1a2") as http:  # other tokens are unaffected
        assert_key(world, http.get("/v1/clusters/c/apps/a2"), "c", "app:a2")


# --- 2. ETag / If-None-Match ---------------------------------------------------------------------


def test_etag_304_and_new_tag_after_rotation(served: World):
    world = served
    with world.http("root-c") as http:
        first = http.get("/v1/clusters/c/root")
        assert_key(world, first, "c", "root")
        assert first.headers["etag"] == '"v1"'
        again = http.get("/v1/clusters/c/root", headers={"If-None-Match": '"v1"'})
        assert again.status_code == 304
        assert again.headers["etag"] == '"v1"'
        assert again.content == b""
        for stale in ('"v0"', '"v2"', "v1", "*garbage*"):
            assert_key(
                world,
                http.get("/v1/clusters/c/root", headers={"If-None-Match": stale}),
                "c",
                "root",
            )

        world.import_key("c", "root")  # v2
        rotated = http.get("/v1/clusters/c/root", headers={"If-None-Match": '"v1"'})
        assert_key(world, rotated, "c", "root")
        assert rotated.headers["etag"] == '"v2"'
        ok = rotated.json()["key"] != first.json()["key"]
        assert ok, "the rotated key equals the old one"
        settled = http.get("/v1/clusters/c/root", headers={"If-None-Match": '"v2"'})
        assert (settled.status_code, settled.headers["etag"], settled.content) == (304, '"v2"', b"")
        # A 304 is granted per scope and token, like a 200.
        assert_error(
            world, http.get("/v1/clusters/c/apps/a1", headers={"If-None-Match": '"v1"'}), 403
        )


# --- 3. read after commit across processes -------------------------------------------------------


def test_read_after_commit_by_another_process_on_two_replicas(served: World, tmp_path):
    world = served
    replica_dir = tmp_path / "replica"
    replica_dir.mkdir()
    replica = Server(replica_dir).launch()
    try:
        replica.wait_healthy()
        with (
            world.http("app-a1a2") as first,
            httpx.Client(
                base_url=replica.url,
                headers={"Authorization": f"Bearer {world.tokens['app-a1a2']}"},
                timeout=15,
                trust_env=False,
            ) as second,
        ):
            for http in (first, second):  # warm both caches
                assert_key(world, http.get("/v1/clusters/c/apps/a1"), "c", "app:a1")
            for _round in range(2):
                version = world.import_key("c", "app:a1", other_process=True)
                for http in (first, second):  # the very next request on each replica
                    response = http.get(
                        "/v1/clusters/c/apps/a1", headers={"If-None-Match": f'"v{version - 1}"'}
                    )
                    assert_key(world, response, "c", "app:a1")
                    assert response.json()["version"] == version
            assert_key(world, first.get("/v1/clusters/c/apps/a2"), "c", "app:a2")  # untouched

            result = run_keyvault("token", "revoke", "app-a1a2", "--yes")
            assert result.returncode == 0, proc_describe(result)
            for http in (first, second):
                body = assert_error(world, http.get("/v1/clusters/c/apps/a1"), 401, "unauthorized")
                assert "revoked" in body["detail"]
    finally:
        replica.stop()


# --- 4. errors -----------------------------------------------------------------------------------


def test_every_error_is_json_with_an_allowed_status_and_no_key(served: World, engine):
    world = served
    port = free_port()  # nothing listens there
    expect(world.cli("host", "add", "c2", "127.0.0.1", "--port", str(port), "--become", "none"))
    world.create_token("rotator-c2", "root:c2", rotate=True)
    with engine.begin() as conn:  # a rotation of app:a1 left unresolved (as after a crash)
        cluster_id = conn.scalar(text("SELECT id FROM clusters WHERE name = 'c'"))
        now = utcnow()
        conn.execute(
            Rotation.__table__.insert().values(
                id="rot-test-unresolved",
                cluster_id=cluster_id,
                scope="app:a1",
                state="needs_recovery",
                host_label="ta1.example:22",
                actor="pytest",
                created_at=now,
                updated_at=now,
            )
        )

    A = 1  # audited: a request past validation (key read, versions, events, refused rotate)
    R = 2  # a rotation that reached the rotation service: its intent, then its outcome
    cases = [  # (token, method, path, status, error code, audit records)
        ("app-all", "GET", "/v1/clusters/c/apps/bad%20id/versions", 400, "invalid_input", False),
        ("rotator", "POST", "/v1/clusters/c/apps/bad%20id/rotate", 400, "invalid_input", False),
        ("app-all", "GET", "/v1/events?after=-1", 400, "invalid_input", False),
        ("app-all", "GET", "/v1/events?after=abc", 400, "invalid_input", False),
        ("app-all", "GET", "/v1/events?wait=3600", 400, "invalid_input", False),
        (
            "app-all",
            "GET",
            "/v1/events?after=2147483648",
            400,
            "invalid_input",
            False,
        ),  # beyond any event id
        (None, "GET", "/v1/clusters/c/apps/a1", 401, "unauthorized", A),
        (None, "GET", "/v1/clusters/c/apps/a1/versions", 401, "unauthorized", A),
        ("root-c", "GET", "/v1/clusters/c/apps/a1", 403, "forbidden", A),
        ("root-c", "POST", "/v1/clusters/c/root/rotate", 403, "forbidden", A),
        ("app-all", "GET", "/v1/clusters/c/apps/unknown", 404, "not_found", A),
        ("app-all", "GET", "/v1/clusters/c/apps/unknown/versions", 404, "not_found", A),
        ("app-all", "GET", "/v1/nothing-here", 404, "not_found", False),
        ("app-all", "GET", "/v1/clusters/c/apps/a1/nothing", 404, "not_found", False),
        ("rotator", "POST", "/v1/clusters/c/root/rotate", 404, "not_found", R),  # no SSH hosts
        ("rotator", "POST", "/v1/clusters/c/apps/a1/rotate", 409, "rotation_unresolved", R),
        ("rotator-c2", "POST", "/v1/clusters/c2/root/rotate", 502, "ssh_error", R),  # host down
        # Names no cluster or APPID can have: refused like any other, never a database error
        # (a malformed APPID is a 400 on the key read too, before the token is looked at).
        ("app-all", "GET", "/v1/clusters/c/apps/%00", 400, "invalid_input", False),
        ("app-all", "GET", "/v1/clusters/c/apps/%C3%A9%00x", 400, "invalid_input", False),
        ("app-all", "GET", "/v1/clusters/c/apps/a%00/versions", 400, "invalid_input", False),
        ("app-all", "GET", "/v1/clusters/%00/root", 403, "forbidden", A),
        (None, "GET", "/v1/clusters/%00/apps/%00", 400, "invalid_input", False),
    ]
    seen, before = set(), audit_count(engine)
    for token, method, path, status, code, _ in cases:
        with world.http(token) as http:
            body = assert_error(world, http.request(method, path), status, code)
            if path.endswith("/c/root/rotate") and status == 404:
                assert "no SSH hosts" in body["detail"]
            seen.add(status)
    assert seen == ALLOWED_ERRORS - {503}  # the 503 follows: the audit log away
    # Every refused request was audited, the odd names included (one bad row must fail no batch).
    assert audit_count(engine) - before == sum(case[-1] for case in cases)

    # A key read whose audit record cannot be written fails (503) and gives no key away.
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_log RENAME TO audit_log_away"))
    try:
        with world.http("app-all") as http:
            body = assert_error(world, http.get("/v1/clusters/c/apps/a1"), 503)
            assert "audit" in body["detail"]
            assert (
                http.get("/v1/clusters/c/apps/a1", headers={"If-None-Match": '"v1"'}).status_code
                == 503
            )
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE audit_log_away RENAME TO audit_log"))
    with world.http("app-all") as http:  # and recovers as soon as audit works again
        assert_key(world, http.get("/v1/clusters/c/apps/a1"), "c", "app:a1")


RECOVERY_ATTEMPTS = 10


@pytest.fixture
def postgres_only(database):
    """The PostgreSQL database (the test is parametrized for it alone: SQLite has no server
    connections to drop, and CI counts no skips)."""
    assert database.is_postgres
    return database


@pytest.mark.parametrize("blank_database", ["postgres"], indirect=True)
def test_the_server_recovers_when_postgresql_drops_its_connections(postgres_only, served: World):
    """A PostgreSQL restart or failover cuts every connection of the server: requests meanwhile
    get a 503 JSON (never a 500), and the server reconnects by itself."""
    from tests.support.db import admin_engine

    database = postgres_only

    world = served
    with world.http("app-all") as http:
        assert_key(world, http.get("/v1/clusters/c/apps/a1"), "c", "app:a1")
    admin = admin_engine(database.server_url)
    try:
        with admin.connect() as conn:
            dropped = conn.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": database.name},
            )
    finally:
        admin.dispose()
    assert dropped >= 2  # at least the revision probe and the audit writer

    statuses = []
    with world.http("app-all") as http:
        for _attempt in range(RECOVERY_ATTEMPTS):
            response = http.get("/v1/clusters/c/apps/a1")
            statuses.append(response.status_code)
            if response.status_code == 200:
                assert_key(world, response, "c", "app:a1")
                break
            assert_error(world, response, 503)
        assert statuses[-1] == 200, f"no recovery in {RECOVERY_ATTEMPTS} requests: {statuses}"
        for path in ("/v1/clusters/c/apps/a2/versions", "/v1/events", "/readyz", "/metrics"):
            response = http.get(path)
            assert response.status_code in (200, 503), (path, response.status_code)
            if response.status_code == 503:
                assert_error(world, response, 503)
                assert http.get(path).status_code == 200, (
                    path
                )  # its pool reconnected on the failure
        assert_key(world, http.get("/v1/clusters/c/apps/a2"), "c", "app:a2")


# --- 5. audit ------------------------------------------------------------------------------------

LOAD_THREADS = 8
LOAD_PER_THREAD = 50  # 400 key reads that succeed (200 or 304)
REFUSED_PER_THREAD = 5  # plus 40 forbidden and 40 unauthorized ones
JOIN_DEADLINE = TIMEOUT


def test_audit_holds_one_record_per_key_read_in_a_load_run(served: World, engine):
    world = served
    world.create_token("load", "root:c", "app:c/*")
    world.create_token("gone", "root:c")
    expect(world.cli("token", "revoke", "gone", "--yes"))
    before = audit_count(engine)
    with engine.connect() as conn:
        last_id = conn.scalar(select(func.coalesce(func.max(AuditRecord.id), 0)))

    plan = []  # (token, path, headers, expected status, expected outcome)
    for j in range(LOAD_PER_THREAD):
        cluster, scope = [("c", "root"), ("c", "app:a1"), ("c", "app:a2")][j % 3]
        etag = {"If-None-Match": f'"v{world.versions[(cluster, scope)]}"'} if j % 2 else {}
        plan.append(
            (
                "load",
                path_of(cluster, scope),
                etag,
                304 if etag else 200,
                "not_modified" if etag else "ok",
            )
        )
    for _ in range(REFUSED_PER_THREAD):
        plan.append(("load", "/v1/clusters/c2/root", {}, 403, "forbidden"))
        plan.append(("gone", "/v1/clusters/c/root", {}, 401, "unauthorized"))

    results: list[Counter] = []
    errors: list[str] = []

    def worker():
        seen = Counter()
        try:
            clients = {name: world.http(name) for name in ("load", "gone")}
            try:
                for token, path, headers, status, outcome in plan:
                    response = clients[token].get(path, headers=headers)
                    if response.status_code != status:
                        errors.append(f"{token} {path}: {response.status_code}, expected {status}")
                    seen[(token, outcome)] += 1
            finally:
                for client in clients.values():
                    client.close()
        except Exception as exc:  # noqa: BLE001 - reported below, never lost in a thread
            errors.append(f"{type(exc).__name__}: {exc}")
        results.append(seen)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(LOAD_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_DEADLINE)
    assert not any(t.is_alive() for t in threads), (
        f"load threads still running after {JOIN_DEADLINE:g}s"
    )
    assert not errors, errors[:10]
    made = sum(results, Counter())
    requests = sum(made.values())
    assert requests == LOAD_THREADS * len(plan) == 480

    # Each response was sent after its record was committed: the count is exact now.
    assert audit_count(engine) - before == requests
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                AuditRecord.token_name,
                AuditRecord.outcome,
                AuditRecord.action,
                AuditRecord.client,
                AuditRecord.version,
            ).where(AuditRecord.id > last_id)
        ).all()
    assert Counter((r.token_name, r.outcome) for r in rows) == made
    assert {r.action for r in rows} == {"read"}
    assert {r.client for r in rows} == {"127.0.0.1"}
    assert all(r.version == 1 for r in rows if r.outcome in ("ok", "not_modified"))

    listed = json.loads(
        expect(world.cli("audit", "list", "--json", "--token", "load", "--limit", "1000")).stdout
    )
    assert (
        len(listed)
        == made[("load", "ok")] + made[("load", "not_modified")] + made[("load", "forbidden")]
    )
    assert {r["outcome"] for r in listed} == {"ok", "not_modified", "forbidden"}
    assert {r["token"] for r in listed} == {"load"}
    assert {(r["cluster"], r["scope"]) for r in listed} == {
        ("c", "root"),
        ("c", "app:a1"),
        ("c", "app:a2"),
        ("c2", "root"),
    }
    gone = json.loads(expect(world.cli("audit", "list", "--json", "--token", "gone")).stdout)
    assert {r["outcome"] for r in gone} == {"unauthorized"} and len(gone) == made[
        ("gone", "unauthorized")
    ]
    assert not world.holds_key(json.dumps(listed) + json.dumps(gone))

    with world.http() as http:  # no token at all: audited under "(none)"
        assert_error(world, http.get("/v1/clusters/c/root"), 401)
    anonymous = json.loads(expect(world.cli("audit", "list", "--json", "--token", "(none)")).stdout)
    assert [r["outcome"] for r in anonymous] == ["unauthorized"]


# --- 6. health, readiness, metrics ---------------------------------------------------------------


def test_healthz_readyz_and_prometheus_metrics(served: World, engine):
    world = served
    expect(
        world.cli(
            "webhook",
            "add",
            "--allow-private-network",
            "http://127.0.0.1:9/hook",
            "--scope",
            "root:c",
        )
    )
    world.import_key("c", "root")  # v2: an event for the webhook
    # One cron round fans the event out; nothing listens on port 9, so the delivery stays pending.
    expect(
        world.cli(
            "webhook",
            "deliver",
            "--allow-private-network",
            "--once",
            "--timeout",
            "5",
            "--max-seconds",
            "20",
        )
    )
    with engine.begin() as conn:
        cluster_id = conn.scalar(text("SELECT id FROM clusters WHERE name = 'c'"))
        now = utcnow()
        conn.execute(
            Rotation.__table__.insert().values(
                id="rot-test-failed",
                cluster_id=cluster_id,
                scope="root",
                state="failed",
                host_label="ta1.example:22",
                actor="pytest",
                created_at=now,
                updated_at=now,
            )
        )
    with world.http("root-c") as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz")
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        for _ in range(3):
            assert_key(world, http.get("/v1/clusters/c/root"), "c", "root")
        assert http.get("/v1/clusters/c/root", headers={"If-None-Match": '"v2"'}).status_code == 304
        assert_error(world, http.get("/v1/clusters/c/apps/a1"), 403)
        assert http.get("/v1/clusters/c/root/versions").status_code == 200
        response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert not world.holds_key(response.text)
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in (
        "keyvault_http_requests",
        "keyvault_http_request_duration_seconds",
        "keyvault_build_info",
        "keyvault_key_age_seconds",
        "keyvault_rotations",
        "keyvault_webhook_deliveries",
    ):
        assert name in families, sorted(families)
    assert "keyvault_http_requests_total{" in response.text

    def samples(family, suffix=""):
        return {
            tuple(sorted(s.labels.items())): s.value
            for s in families[family].samples
            if s.name == family + suffix
        }

    requests = samples("keyvault_http_requests", "_total")
    get = (("method", "GET"),)
    assert requests[(("code", "200"), *get, ("route", ROOT_ROUTE))] == 3
    assert requests[(("code", "304"), *get, ("route", ROOT_ROUTE))] == 1
    assert requests[(("code", "403"), *get, ("route", "/v1/clusters/{cluster}/apps/{appid}"))] == 1
    assert requests[(("code", "200"), *get, ("route", ROOT_ROUTE + "/versions"))] == 1
    ages = samples("keyvault_key_age_seconds")
    assert set(ages) == {(("cluster", c), ("scope", s)) for c, s in SCOPES}
    assert all(age >= 0 for age in ages.values())
    assert samples("keyvault_rotations")[(("cluster", "c"), ("state", "failed"))] == 1
    assert samples("keyvault_webhook_deliveries")[(("status", "pending"),)] >= 1


# --- 7. schemathesis -----------------------------------------------------------------------------

SCHEMATHESIS = os.path.join(os.path.dirname(sys.executable), "schemathesis")
SCHEMATHESIS_TIMEOUT = TIMEOUT  # the run is bounded by --max-examples; this only stops a hang
SCHEMATHESIS_CONFIG = """
[dictionaries.clusters]
values = ["c", "c2"]
[dictionaries.appids]
values = ["a1", "a2", "unknown"]

[parameters]
"path.cluster" = { dictionary = "clusters", probability = 0.7 }
"path.appid" = { dictionary = "appids", probability = 0.7 }
# A long poll of up to 60 s is valid but would only make the run slow.
"query.wait" = 0
"""


@pytest.mark.slow  # a fuzzing run against a real server: ~8 s
def test_schemathesis_finds_no_server_error_and_no_schema_violation(served: World, tmp_path):
    world = served
    world.create_token("fuzzer", "root:c", "app:c/*", rotate=True)
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    argv = [
        SCHEMATHESIS,
        "--config-file",
        str(config),
        "run",
        f"{world.url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "20",
        "--seed",
        "20261126",
        "--workers",
        "4",
        "--phases",
        "examples,coverage,fuzzing",
        "--generation-database",
        "none",
        "--request-timeout",
        "10",
        "--no-color",
        "-H",
        f"Authorization: Bearer {world.tokens['fuzzer']}",
    ]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=SCHEMATHESIS_TIMEOUT,
        cwd=tmp_path,
        env={**os.environ, "NO_COLOR": "1"},
    )
    output = scrub(result.stdout + result.stderr)  # failures quote responses: show no key
    assert result.returncode == 0, output[-6000:]
    assert "Tested: 12" in output, output[-2000:]
    # With the dictionaries the fuzzer got past authorisation and read keys (the audit says so).
    audited = json.loads(
        expect(world.cli("audit", "list", "--json", "--token", "fuzzer", "--limit", "5000")).stdout
    )
    assert {"ok", "forbidden"} <= {r["outcome"] for r in audited}

    # What schemathesis relies on, checked directly: the spec declares the 304, the ETag, the
    # 401s and the APPID pattern the server enforces; an undeclared method gets 405 with Allow.
    with world.http() as http:
        spec = http.get("/openapi.json").json()
        for method in ("DELETE", "PUT", "TRACE"):
            response = http.request(method, "/v1/clusters/c/root")
            seen = (response.status_code, response.headers.get("allow"), response.json()["error"])
            assert seen == (405, "GET, HEAD", "method_not_allowed")
    for path in ("/v1/clusters/{cluster}/root", "/v1/clusters/{cluster}/apps/{appid}"):
        operation = spec["paths"][path]["get"]
        assert {"200", "304", "400", "401", "403", "404", "503"} <= set(operation["responses"])
        assert "ETag" in operation["responses"]["200"].get("headers", {})
        assert any(
            p["name"] == "If-None-Match" and p["in"] == "header" for p in operation["parameters"]
        )
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if path.startswith("/v1/"):
                assert "401" in operation["responses"], (method, path)
            if "{appid}" in path:
                appid = next(p for p in operation["parameters"] if p["name"] == "appid")
                assert appid["schema"]["pattern"] == "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", (
                    method,
                    path,
                )


# --- 8. a service using keyvault.client across rotations by another process ----------------------


class _RotatesBeforeFirstCall:
    """A TaClient factory whose client lets another process rotate just before its first call:
    the key the consumer just read dies between its read and TA's check."""

    def __init__(self, rotate):
        self.rotate = rotate
        self.calls = 0

    def __call__(self, base_url):
        from keyvault.ta import TaClient

        factory = self

        class Client(TaClient):
            def call(self, api_path, **kwargs):
                factory.calls += 1
                if factory.calls == 1:
                    factory.rotate()
                return super().call(api_path, **kwargs)

        return Client(base_url, timeout=10)


def test_client_keeps_working_across_rotations_by_another_process(served: World, tmp_path):
    from keyvault.client import Client
    from keyvault.sandbox import state as ta_state
    from keyvault.sandbox.openapi import make_server

    world = served
    state_dir = tmp_path / "ta-state"
    ta_state.init_state(state_dir, ["a1"])
    project = ta_state.project_id(state_dir, "a1")
    rotate = lambda: sandbox_rotate_and_import(state_dir, "a1")  # noqa: E731
    rotate()  # v2 of app:a1 in keyvault is the key TA accepts
    world.create_token("svc", "app:c/a1")
    ta = make_server(state_dir, port=0)
    ta_thread = threading.Thread(target=ta.serve_forever, daemon=True)
    ta_thread.start()
    ta_url = f"http://127.0.0.1:{ta.server_address[1]}"
    meta = {
        "api_path": "open/list-event-meta",
        "params": {"projectId": project},
        "ta_base_url": ta_url,
    }

    def ta_accepts(info) -> bool:
        return info.key == ta_state.current_key(state_dir, "app:a1")

    try:
        with Client(world.url, world.tokens["svc"]) as kv:
            first = kv.get_app("c", "a1")
            assert first.version == 2
            ok = ta_accepts(first)
            assert ok, "keyvault served a key TA does not accept"
            assert kv.call_ta("c", appid="a1", **meta)["projectId"] == project
            assert kv.get_app("c", "a1").version == 2  # revalidated: 304

            rotate()  # another process: TA now accepts only v3, and keyvault holds it
            second = kv.get_app("c", "a1")
            assert second.version == 3
            ok = ta_accepts(second) and second.key != first.key
            assert ok, "after the rotation the client still has a key TA refuses"
            assert kv.call_ta("c", appid="a1", **meta)["projectId"] == project

            # The rotation lands between the client's read (v3, from its cache) and TA's check.
            factory = _RotatesBeforeFirstCall(rotate)
            assert (
                kv.call_ta("c", appid="a1", ta_client_factory=factory, **meta)["projectId"]
                == project
            )
            assert factory.calls == 2  # refused once, refreshed, retried once
            assert kv.cached("c", "app:a1").version == 4
            ok = ta_accepts(kv.cached("c", "app:a1"))
            assert ok
        assert ta.stats.get(("open/list-event-meta", "invalid_access")) == 1
        assert ta.stats.get(("open/list-event-meta", "ok")) == 3
    finally:
        ta.shutdown()
        ta.server_close()
        ta_thread.join(TIMEOUT)

    audited = json.loads(expect(world.cli("audit", "list", "--json", "--token", "svc")).stdout)
    outcomes = [r["outcome"] for r in reversed(audited)]  # oldest first
    # get v2 (ok), call_ta (304), get (304), get v3 (ok), call_ta (304), call_ta: 304 then refresh -> ok (v4)
    assert outcomes == [
        "ok",
        "not_modified",
        "not_modified",
        "ok",
        "not_modified",
        "not_modified",
        "ok",
    ]


# --- master-key rotation under a running server ------------------------------------------------


def test_a_running_server_follows_a_master_key_rotation(served: World):
    """Keys sealed after `master-key rotate` (another process) are served without a restart."""
    world = served
    result = run_keyvault("master-key", "rotate", "--yes")
    assert result.returncode == 0, proc_describe(result)
    world.import_key("c", "root", other_process=True)  # sealed under the new master key
    with world.http("root-c") as http:
        assert_key(world, http.get("/v1/clusters/c/root"), "c", "root")
