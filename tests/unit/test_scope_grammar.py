"""The one scope grammar (keyvault.scope): APPIDs, key scopes and grant scopes, and that
every place that checks an APPID agrees with it."""

from __future__ import annotations

import re

import pytest

from keyvault import scope
from keyvault.errors import InvalidInput
from keyvault.sandbox import commands
from keyvault.sandbox import state as sim_state

GOOD = ["A", "app1", "APP_1", "a-b", "0abc", "x" * 64]
BAD = ["", "-a", "_a", "a.b", "a b", "a/b", "a\n", "é", "x" * 65, "a:b", "*"]


@pytest.mark.parametrize("appid", GOOD)
def test_good_appids(appid):
    assert scope.is_appid(appid) and scope.validate_appid(appid) == appid
    assert str(scope.app_scope(appid)) == f"app:{appid}"


@pytest.mark.parametrize("appid", [*BAD, None, 7])
def test_bad_appids_are_refused_with_the_rule(appid):
    assert not scope.is_appid(appid)
    with pytest.raises(InvalidInput, match="invalid APPID") as info:
        scope.validate_appid(appid)  # type: ignore[arg-type]
    assert scope.APPID_RULE in str(info.value)


def test_an_operator_pattern_replaces_the_default():
    assert scope.validate_appid("a.b", r"[a-z.]+") == "a.b"
    with pytest.raises(InvalidInput, match=re.escape("[a-z.]+")):
        scope.validate_appid("A", r"[a-z.]+")


def test_schema_pattern_is_anchored_and_agrees():
    assert scope.schema_pattern() == scope.DEFAULT_APPID_PATTERN
    assert scope.schema_pattern("[a-z]+") == "^(?:[a-z]+)$"
    # JSON Schema searches; the anchored form decides like fullmatch. (Python's `$` also
    # matches before a final newline, ECMA-262's does not, so that case is left out here.)
    for appid in [a for a in GOOD + BAD if not a.endswith("\n")]:
        assert (re.search(scope.schema_pattern(), appid) is not None) == scope.is_appid(appid)


@pytest.mark.parametrize("appid", GOOD + BAD)
def test_the_simulator_registers_exactly_the_valid_appids(tmp_path, appid):
    state_dir = tmp_path / "state"
    sim_state.init_state(state_dir, [])
    if scope.is_appid(appid):
        assert appid in sim_state.add_apps(state_dir, [appid])
    else:
        with pytest.raises(ValueError, match="bad APPID"):
            sim_state.add_apps(state_dir, [appid])


@pytest.mark.parametrize("appid", GOOD + BAD)
def test_the_ssh_front_finds_exactly_the_valid_appids(appid):
    command = f"ta-tool generate_api_secret -appid {appid}"
    found = commands._APPID_RE.fullmatch(f"-appid {appid}")
    assert (found is not None) == scope.is_appid(appid), command


def test_key_scopes():
    assert scope.parse_scope("root").is_root
    assert scope.parse_scope("app:A1") == scope.Scope("A1")
    for text in ("app:", "app:a.b", "ROOT", "app"):
        with pytest.raises(InvalidInput):
            scope.parse_scope(text)


def test_grant_scopes_parse_and_normalise():
    texts = ["root:prod", "app:prod/A1", "app:stage/*", "root:prod"]
    assert scope.parse_grant_scopes(texts) == ["root:prod", "app:prod/A1", "app:stage/*"]
    assert scope.parse_grant_scope("app:prod/A1") == scope.GrantScope("prod", "A1")
    assert str(scope.parse_grant_scope("root:prod")) == "root:prod"


@pytest.mark.parametrize(
    "text",
    [
        "everything",
        "root:",
        "root:a/b",
        "app:prod",
        "app:/A1",
        "app:prod/",
        "root:prod\n",
        "app:prod/A 1",
        "app:prod/a.b",
    ],
)
def test_bad_grant_scopes(text):
    with pytest.raises(InvalidInput, match="invalid"):
        scope.parse_grant_scope(text)


def test_grant_of_stored_scopes():
    grant = scope.grant_of_scopes("t", ["root:prod", "app:prod/A1", "app:stage/*"], can_rotate=True)
    assert grant.allows("prod", "root") and grant.allows("prod", "app:A1")
    assert not grant.allows("prod", "app:A2") and grant.allows("stage", "app:anything")
    assert not grant.allows("stage", "root") and grant.clusters == {"prod", "stage"}
    assert grant.can_rotate and grant.covers_cluster("stage") and not grant.covers_cluster("x")
