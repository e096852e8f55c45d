"""`keyvault import` refuses a key already in the scope's history (the current one, or an
invalidated one, dead at TA) and input that is not UTF-8 text, with or without `--any-format`;
nothing is written and the audit outcome is the error's code. Both databases."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from keyvault.db import make_engine
from tests.support.cli import expect, one_error_line
from tests.support.leak_guard import new_key

CLUSTER = "ta2"
APPID = "demo"
SCOPE_ARGS = ("--cluster", CLUSTER, "--appid", APPID)
TABLES = ("secrets", "secret_versions", "events")


@pytest.fixture
def store(cli):
    expect(cli("init"))
    expect(cli("cluster", "add", CLUSTER, "--open-api-url", "http://ta2:8992"))
    return cli


@pytest.fixture
def engine(home):
    engine = make_engine(home.database_url)
    yield engine
    engine.dispose()


def counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}


def history(cli) -> list[dict]:
    return json.loads(expect(cli("secrets", "history", *SCOPE_ARGS, "--json")).stdout)


def last_import_outcome(cli) -> str:
    rows = json.loads(expect(cli("audit", "list", "--json", "--limit", "50")).stdout)
    outcomes = [r for r in rows if r["action"] == "import" and r["phase"] == "outcome"]
    return outcomes[0]["outcome"]  # newest first


def import_(cli, data: str | bytes, *extra: str):
    return cli("import", *SCOPE_ARGS, *extra, input=data)


def no_key_in(result, *keys: str) -> None:
    leaked = [i for i, key in enumerate(keys) if key in result.output]
    assert not leaked, f"key(s) {leaked} appear in the output"


def test_reimporting_an_invalidated_key_is_refused_and_nothing_is_written(store, engine):
    first, second = new_key(), new_key()
    expect(import_(store, first + "\n"))
    expect(import_(store, second + "\n"))
    before_rows, before_counts = history(store), counts(engine)

    for extra in ((), ("--any-format",)):
        result = import_(store, first + "\n", *extra)
        one_error_line(result, 2, "version 1", f"app:{APPID}", CLUSTER, "invalidated", "rotate")
        no_key_in(result, first, second)
        assert last_import_outcome(store) == "invalid_input"
        assert history(store) == before_rows
        assert counts(engine) == before_counts


def test_reimporting_the_current_key_is_refused(store, engine):
    first, second = new_key(), new_key()
    expect(import_(store, first + "\n"))
    expect(import_(store, second + "\n"))
    before = counts(engine)
    result = import_(store, second + "\n")
    one_error_line(result, 1, "already version 2", "current", f"app:{APPID}")
    no_key_in(result, first, second)
    assert last_import_outcome(store) == "conflict"
    assert counts(engine) == before


NOT_UTF8 = {
    "latin-1 byte": lambda k: k.encode()[:-1] + b"\xe9\n",
    "lone continuation byte": lambda k: b"\x80" + k.encode() + b"\n",
    "truncated sequence": lambda k: k.encode() + b"\xc3",
    "utf-16": lambda k: k.encode("utf-16"),
}


@pytest.mark.parametrize("any_format", [False, True], ids=["pattern", "any-format"])
@pytest.mark.parametrize("name", list(NOT_UTF8))
def test_input_that_is_not_utf8_is_refused(store, engine, name, any_format):
    key = new_key()
    before = counts(engine)
    extra = ("--any-format",) if any_format else ()
    result = import_(store, NOT_UTF8[name](key), *extra)
    one_error_line(result, 2, "not UTF-8")
    no_key_in(result, key)
    assert last_import_outcome(store) == "invalid_input"
    assert counts(engine) == before


@pytest.mark.parametrize(
    "data", ["{k}\x00\n", "{k}\x1b[0m\n", "{k}\x7f"], ids=["nul", "esc", "del"]
)
def test_control_characters_are_refused_even_with_any_format(store, engine, data):
    key = new_key()
    before = counts(engine)
    result = import_(store, data.format(k=key).encode(), "--any-format")
    one_error_line(result, 2, "control characters")
    no_key_in(result, key)
    assert counts(engine) == before


def test_a_new_key_still_imports_after_refusals(store, engine):
    first, second = new_key(), new_key()
    expect(import_(store, first + "\r\n"))
    expect(import_(store, first + "\n"), 1)
    expect(import_(store, b"\xff\n"), 2)
    result = expect(import_(store, second.encode() + b"\n"))
    assert "as version 2" in result.stdout
    assert sorted(r["version"] for r in history(store)) == [1, 2]
    # Non-ASCII UTF-8 is text: with --any-format it is stored (without, the pattern refuses it).
    expect(import_(store, "ключ-" + new_key(8) + "\n"), 2)
    expect(import_(store, "ключ-" + new_key(8) + "\n", "--any-format"))
    assert len(history(store)) == 3
