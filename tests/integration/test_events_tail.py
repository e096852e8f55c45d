"""``GET /v1/events?tail=true``: where a new follower starts (the agent, ``run``, ``watch()``),
in one request instead of paging through the whole history (review of issue 11)."""

from __future__ import annotations

from sqlalchemy import text

from keyvault.db import make_engine
from keyvault_client import Client
from tests.support.http import World


def _newest_in_store(db_url: str) -> int:
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT max(id) FROM events")).scalar_one())
    finally:
        engine.dispose()


def test_tail_answers_the_newest_event_id_and_no_events(served: World, db_url: str):
    served.import_key("c", "app:a2")  # the newest event is one app-a1 may not see
    newest = _newest_in_store(db_url)
    with served.http("app-a1") as http:
        answer = http.get("/v1/events", params={"tail": "true"})
        bad = http.get("/v1/events", params={"tail": "maybe"})
    assert answer.status_code == 200 and answer.json() == {"events": [], "last_id": newest}
    assert bad.status_code == 400


def test_the_client_asks_for_the_tail(served: World, db_url: str):
    served.import_key("c", "app:a1")
    newest = _newest_in_store(db_url)
    with Client(served.url, served.tokens["app-a1"]) as client:
        assert client.events(0, tail=True) == ([], newest)
