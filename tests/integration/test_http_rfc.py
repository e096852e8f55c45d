"""HTTP as the RFCs and code generators expect (issue 11), against a real ``keyvault serve`` on
SQLite and PostgreSQL, with raw requests (``http.client``: repeated header lines, HEAD):

- If-None-Match per RFC 9110: weak comparison, lists (also over several lines), ``*``,
  whitespace; a malformed value is ignored (the key is sent, never a wrong 304);
- HEAD on the key paths: the GET's headers, no body, audited as ``head``;
- the Bearer scheme in any case on every route; other schemes are 401;
- a malformed APPID: one 400 body on the key read (fast path), HEAD, /versions and rotate,
  before the token is looked at (not audited); a malformed If-Match: 400 once the caller
  may rotate (RFC 9110: a 401 or 403 comes first);
- If-Match on rotate over the real sshd: a retry after success is 412 and rotates nothing;
  two requests at once expecting the same version rotate once;
- /openapi.json: a valid OpenAPI 3.1 document with stable operationIds, the statuses each
  route really sends, bearer security per operation and the webhooks.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
from pathlib import Path

import pytest
from openapi_spec_validator import validate
from sqlalchemy import func, select

from keyvault.http.fastpath import FAST_ROUTES
from keyvault.http.openapi import WEBHOOK_EVENTS
from keyvault.http.schemas import WebhookPayload
from keyvault.models import AuditRecord, Event
from keyvault.services.webhooks import event_payload
from tests.support.http import REQUEST_TIMEOUT, World, add_sshd_cluster, key_matches, scrub
from tests.support.timeouts import TIMEOUT

ROOT = "/v1/clusters/c/root"
A1 = "/v1/clusters/c/apps/a1"
SQLITE_ONLY = pytest.mark.parametrize("blank_database", ["sqlite"], indirect=True)


class Answer:
    """A raw HTTP answer: status, headers (lower-case names, every line) and body."""

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = [(k.lower(), v) for k, v in response.getheaders()]
        self.body = response.read()

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> dict:
        return json.loads(self.body)


def raw(
    world: World, method: str, path: str, headers: list[tuple[str, str]] = (), token: str = ""
) -> Answer:
    """One request with exactly these header lines (repeats kept); ``token``: a name."""
    conn = http.client.HTTPConnection("127.0.0.1", world.server.port, timeout=REQUEST_TIMEOUT)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        if token:
            conn.putheader("Authorization", f"Bearer {world.tokens[token]}")
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        return Answer(conn.getresponse())
    finally:
        conn.close()


def audit_rows(engine, after: int = 0) -> list[tuple]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(
                AuditRecord.token_name, AuditRecord.action, AuditRecord.scope,
                AuditRecord.version, AuditRecord.outcome,
            ).where(AuditRecord.id > after).order_by(AuditRecord.id)
        )  # fmt: skip
        return [tuple(r) for r in rows]


def last_audit_id(engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.coalesce(func.max(AuditRecord.id), 0)))


def is_key(world: World, answer: Answer, cluster: str, scope: str) -> bool:
    return answer.status == 200 and key_matches(world, answer.json(), cluster, scope)


# --- If-None-Match ---------------------------------------------------------------------------

NOT_MODIFIED = [  # header lines that name the current version (v1) or any: 304
    [("If-None-Match", '"v1"')],
    [("If-None-Match", 'W/"v1"')],  # weak comparison
    [("If-None-Match", '"v0", "v1"')],
    [("If-None-Match", '"v0",W/"v1"')],
    [("If-None-Match", ' \t"v1"\t ')],
    [("If-None-Match", '"v0"'), ("If-None-Match", '"v1"')],  # two lines: one list
    [("If-None-Match", "*")],
]
FULL_ANSWER = [  # another version, or garbage (ignored): the key
    [("If-None-Match", '"v2"')],
    [("If-None-Match", '"V1"')],
    [("If-None-Match", "v1")],
    [("If-None-Match", '"v1')],
    [("If-None-Match", '"v1" "v2"')],
    [("If-None-Match", '*, "v1"')],
    [("If-None-Match", '"v1", garbage')],
    [("If-None-Match", "")],
    [("If-None-Match", "\u00e9")],
    [("If-None-Match", '"v1"' * 500)],
]


def test_if_none_match_per_rfc_9110(served: World, engine):
    world = served
    for lines in NOT_MODIFIED:
        for method in ("GET", "HEAD"):
            answer = raw(world, method, ROOT, lines, token="root-c")
            got = (answer.status, answer.header("etag"), answer.body)
            assert got == (304, '"v1"', b""), (method, lines, got)
            assert answer.header("cache-control") == "no-store"
    for lines in FULL_ANSWER:
        answer = raw(world, "GET", ROOT, lines, token="root-c")
        assert is_key(world, answer, "c", "root"), (lines, answer.status)
    # A 304 is granted per token and scope, like the key: never to a token that may not read it.
    refused = raw(world, "GET", A1, [("If-None-Match", "*")], token="root-c")
    assert (refused.status, refused.json()["error"]) == (403, "forbidden")
    last = last_audit_id(engine)
    assert raw(world, "GET", ROOT, NOT_MODIFIED[0], token="root-c").status == 304
    assert audit_rows(engine, last) == [("root-c", "read", "root", 1, "not_modified")]


# --- HEAD -----------------------------------------------------------------------------------


def test_head_answers_the_get_headers_without_the_key_and_is_audited_as_head(served: World, engine):
    world = served
    get = raw(world, "GET", A1, token="app-a1")
    last = last_audit_id(engine)
    head = raw(world, "HEAD", A1, token="app-a1")
    assert (head.status, head.body) == (200, b"")
    for name in ("etag", "content-type", "content-length", "cache-control"):
        assert head.header(name) == get.header(name), name
    assert audit_rows(engine, last) == [("app-a1", "head", "app:a1", 1, "ok")]
    # Refusals as the GET's, without a body.
    cases = [
        ("", A1, 401, "unauthorized"),
        ("root-c", A1, 403, "forbidden"),
        ("app-all", "/v1/clusters/c/apps/unknown", 404, "not_found"),
        ("app-all", "/v1/clusters/c/apps/bad%20id", 400, None),  # not audited
    ]
    last = last_audit_id(engine)
    for token, path, status, _ in cases:
        answer = raw(world, "HEAD", path, token=token)
        assert (answer.status, answer.body) == (status, b""), (path, answer.status)
        if status == 401:
            assert answer.header("www-authenticate") == "Bearer"
    assert [r[1:] for r in audit_rows(engine, last)] == [
        ("head", "app:a1", None, "unauthorized"),
        ("head", "app:a1", None, "forbidden"),
        ("head", "app:unknown", None, "not_found"),
    ]


def test_other_methods_on_a_key_path_get_405_naming_get_and_head(served: World):
    for method in ("DELETE", "PUT", "POST", "PATCH", "OPTIONS"):
        answer = raw(served, method, A1, token="app-a1")
        got = (answer.status, answer.header("allow"), answer.json()["error"])
        assert got == (405, "GET, HEAD", "method_not_allowed"), method


# --- the Bearer scheme ------------------------------------------------------------------------


def test_the_bearer_scheme_is_matched_in_any_case_on_every_route(served: World):
    world = served
    token = world.tokens["rotator"]
    routes = [  # (method, path, the status once authenticated and allowed)
        ("GET", ROOT, 200),
        ("HEAD", ROOT, 200),
        ("GET", f"{ROOT}/versions", 200),
        ("GET", "/v1/events", 200),
        ("POST", f"{ROOT}/rotate", 404),  # the service ran: cluster c has no SSH host
    ]
    for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
        for method, path, status in routes:
            answer = raw(world, method, path, [("Authorization", f"{scheme} {token}")])
            assert answer.status == status, (scheme, method, path, answer.status)
    for header in ("Basic " + token, "Bearer", "Bearer ", f"Bearer{token}", f"Token {token}"):
        for method, path, _ in routes:
            answer = raw(world, method, path, [("Authorization", header)])
            assert answer.status == 401, (header[:8], method, path)
            assert answer.header("www-authenticate") == "Bearer"


# --- a malformed APPID, a malformed If-Match ------------------------------------------------------

BAD_APPIDS = ["bad%20id", "-a1", "a" * 65, "%C3%A9t%C3%A9", "a.b", "%00"]


def test_a_malformed_appid_gets_the_same_400_on_every_path(served: World, engine):
    world = served
    before = last_audit_id(engine)
    for appid in BAD_APPIDS:
        base = f"/v1/clusters/c/apps/{appid}"
        bodies = []
        for method, path, token in [
            ("GET", base, "app-all"),  # the fast path
            ("GET", f"{base}/versions", "app-all"),
            ("POST", f"{base}/rotate", "rotator"),
            ("GET", base, ""),  # before the token is looked at
            ("POST", f"{base}/rotate", ""),
        ]:
            answer = raw(world, method, path, token=token)
            assert answer.status == 400, (method, path, answer.status)
            body = answer.json()
            assert body.pop("request_id") == answer.header("x-request-id")
            bodies.append(body)
        assert all(body == bodies[0] for body in bodies), (appid, bodies)
        assert bodies[0]["error"] == "invalid_input" and "invalid APPID" in bodies[0]["detail"]
        head = raw(world, "HEAD", base, token="app-all")
        assert (head.status, head.body) == (400, b"")
    assert audit_rows(engine, before) == []  # invalid input: refused before any access


def test_a_malformed_if_match_is_400_once_the_caller_may_rotate(served: World, engine):
    """RFC 9110 §13.2.1: preconditions count only for a request that would otherwise succeed,
    so a 401 or 403 wins; then a malformed If-Match is a 400 (audited), never ignored."""
    world = served
    rotate = f"{ROOT}/rotate"
    before = last_audit_id(engine)
    for value in ("v1", '"v1', '"v1", *', "garbage", ""):
        answer = raw(world, "POST", rotate, [("If-Match", value)])
        assert answer.status == 401, value
        answer = raw(world, "POST", rotate, [("If-Match", value)], token="root-c")
        assert answer.status == 403, value  # root-c may read but not rotate
        answer = raw(world, "POST", rotate, [("If-Match", value)], token="rotator")
        assert (answer.status, answer.json()["error"]) == (400, "invalid_input"), value
        assert "If-Match" in answer.json()["detail"]
    outcomes = [(r[0], r[4]) for r in audit_rows(engine, before)]
    assert (
        outcomes
        == [("(none)", "unauthorized"), ("root-c", "forbidden"), ("rotator", "invalid_input")] * 5
    )
    # Well-formed: on to the rotation service (cluster c has no SSH host: 404 before any check).
    answer = raw(world, "POST", rotate, [("If-Match", 'W/"v1"')], token="rotator")
    assert answer.status == 404


# --- If-Match over the real sshd --------------------------------------------------------------


def test_if_match_makes_a_retried_rotate_safe_over_http(served: World, engine, sshd_env, ta_sim):
    from keyvault.sandbox import state as st
    from keyvault.sandbox.openapi import serving

    world = served
    with serving(ta_sim) as api:
        api_url = f"http://127.0.0.1:{api.server_address[1]}"
        add_sshd_cluster(world, sshd_env, api_url)
        path = "/v1/clusters/t/root/rotate"

        def post(if_match: str | None) -> Answer:
            lines = [] if if_match is None else [("If-Match", if_match)]
            return raw(world, "POST", path, lines, token="rotator-t")

        none_yet = post("*")  # `*`: there must be a current key
        assert (none_yet.status, none_yet.json()["error"]) == (412, "precondition_failed")
        assert post(None).json()["new_version"] == 1
        assert post('"v1"').json()["new_version"] == 2
        last = last_audit_id(engine)
        retried = post('"v1"')  # the client timed out and retries: nothing is rotated
        assert (retried.status, retried.json()["error"]) == (412, "precondition_failed")
        assert "the current is v2" in retried.json()["detail"]
        assert audit_rows(engine, last) == [
            ("rotator-t", "rotate", "root", None, "started"),
            ("rotator-t", "rotate", "root", None, "precondition_failed"),
        ]

        # Two requests expecting v2 at once: one rotates, the other is refused (409 while the
        # first holds the scope, 412 after), and the key served is the one TA accepts.
        start = threading.Barrier(2, timeout=TIMEOUT)
        answers: list[Answer] = []

        def concurrent() -> None:
            start.wait()
            answers.append(post('"v2"'))

        threads = [threading.Thread(target=concurrent) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        statuses = sorted(a.status for a in answers)
        assert statuses in ([200, 409], [200, 412]), [scrub(a.body.decode()) for a in answers]
        current = raw(world, "GET", "/v1/clusters/t/root", token="rotator-t")
        assert current.json()["version"] == 3
        same = current.json()["key"] == st.current_key(ta_sim, "root")
        assert same, "the key served is not the one TA accepts"


# --- /openapi.json --------------------------------------------------------------------------------

KEY = "200 304 400 401 403 404 500 503"
VERSIONS = "200 400 401 403 404 500 503"
ROTATE = "200 400 401 403 404 409 412 500 502 503"
C, APP = "/v1/clusters/{cluster}", "/v1/clusters/{cluster}/apps/{appid}"
BEARER = "bearerToken"
OPERATIONS = {  # (method, path): (operationId, the statuses it sends, its security scheme)
    ("get", f"{C}/root"): ("get_root_key", KEY, BEARER),
    ("head", f"{C}/root"): ("head_root_key", KEY, BEARER),
    ("get", APP): ("get_app_key", KEY, BEARER),
    ("head", APP): ("head_app_key", KEY, BEARER),
    ("get", f"{C}/root/versions"): ("list_root_versions", VERSIONS, BEARER),
    ("get", f"{APP}/versions"): ("list_app_versions", VERSIONS, BEARER),
    ("post", f"{C}/root/rotate"): ("rotate_root_key", ROTATE, BEARER),
    ("post", f"{APP}/rotate"): ("rotate_app_key", ROTATE, BEARER),
    ("get", "/v1/events"): ("list_events", "200 400 401 500 503", BEARER),
    ("get", "/healthz"): ("healthz", "200", None),
    ("get", "/readyz"): ("readyz", "200 503", None),
    ("get", "/metrics"): ("metrics", "200 401 500 503", "metricsToken"),
}


@SQLITE_ONLY  # the document does not depend on the database
def test_openapi_is_valid_with_stable_ids_real_statuses_security_and_webhooks(
    served: World, engine
):
    world = served
    answer = raw(world, "GET", "/openapi.json")
    spec = answer.json()
    validate(spec)  # OpenAPI 3.1, by openapi-spec-validator
    assert spec["openapi"].startswith("3.1")
    found = {
        (method, path): (
            op["operationId"],
            " ".join(sorted(op["responses"])),
            next(iter(op["security"][0]), None) if "security" in op else None,
        )
        for path, item in spec["paths"].items()
        for method, op in item.items()
    }
    assert found == OPERATIONS
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", op_id) for op_id, _, _ in found.values())
    assert spec["paths"]["/metrics"]["get"]["security"] == [{"metricsToken": []}, {}]
    schemes = spec["components"]["securitySchemes"]
    assert {name: (s["type"], s["scheme"]) for name, s in schemes.items()} == {
        "bearerToken": ("http", "bearer"),
        "metricsToken": ("http", "bearer"),
    }
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, item in spec["paths"].items():
        if "head" in item:  # HEAD declares no body
            assert all("content" not in r for r in item["head"]["responses"].values()), path
    rotate = spec["paths"]["/v1/clusters/{cluster}/root/rotate"]["post"]
    assert any(p["name"] == "If-Match" and p["in"] == "header" for p in rotate["parameters"])

    # The fast path serves exactly the key routes keys.py declares.
    keys = {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if op.get("tags") == ["keys"] and not path.endswith("/versions")
    }
    assert keys == FAST_ROUTES

    # Webhooks: one per event type the code records, with the Standard Webhooks headers.
    hooks = spec["webhooks"]
    assert set(hooks) == set(WEBHOOK_EVENTS) >= recorded_event_types()
    for name, item in hooks.items():
        post = item["post"]
        assert {p["name"] for p in post["parameters"]} == {
            "webhook-id", "webhook-timestamp", "webhook-signature",
        }, name  # fmt: skip
        assert post["operationId"] == "webhook_" + name.replace(".", "_")
    # Real payloads (the store's secret.created events) fit the declared shape.
    with engine.connect() as conn:
        events = conn.execute(select(Event)).all()
    assert events
    for row in events:
        payload = event_payload(Event(**row._mapping))
        WebhookPayload.model_validate(payload)
        assert payload["type"] in WEBHOOK_EVENTS


def recorded_event_types() -> set[str]:
    """Every secret.* / rotation.* event type named in keyvault's source."""
    source = Path(__file__).resolve().parents[2] / "keyvault"
    pattern = re.compile(r'"((?:secret|rotation)\.[a-z_]+)"')
    found: set[str] = set()
    for path in source.rglob("*.py"):
        if path.name != "openapi.py":
            found |= set(pattern.findall(path.read_text()))
    return found
