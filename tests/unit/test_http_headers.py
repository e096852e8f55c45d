"""The request header grammar of keyvault.http.headers (RFC 9110, RFC 6750)."""

from __future__ import annotations

import re

import pytest

from keyvault.errors import InvalidInput
from keyvault.http.headers import (
    IF_MATCH_PATTERN,
    EntityTag,
    TagList,
    VersionCondition,
    bearer_token,
    if_match,
    none_match,
    parse_tag_list,
)

TOKEN = "kvt_Abc-123_x~y+z/w=="


@pytest.mark.parametrize(
    "header",
    [
        f"Bearer {TOKEN}",
        f"bearer {TOKEN}",
        f"BEARER {TOKEN}",
        f"BeArEr {TOKEN}",
        f"Bearer   {TOKEN}",  # 1*SP
        f" Bearer {TOKEN} ",  # the field value's surrounding whitespace is not part of it
    ],
)
def test_the_bearer_scheme_is_matched_in_any_case(header: str):
    assert bearer_token(header) == TOKEN


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Bearer{TOKEN}",
        f"Basic {TOKEN}",
        f"Bearerx {TOKEN}",
        f"Bearer {TOKEN} extra",
        f"Bearer\t{TOKEN}",  # RFC 6750: 1*SP, not a tab
        "Bearer a=b",  # token68 has '=' only at its end
        "Bearer ünïcode",
    ],
)
def test_anything_else_is_no_bearer_token(header: str | None):
    assert bearer_token(header) is None


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (['"v1"'], TagList(False, (EntityTag('"v1"'),))),
        (['W/"v1"'], TagList(False, (EntityTag('"v1"', weak=True),))),
        (['"v1", W/"v2"'], TagList(False, (EntityTag('"v1"'), EntityTag('"v2"', weak=True)))),
        (['"v1"', '"v2"'], TagList(False, (EntityTag('"v1"'), EntityTag('"v2"')))),  # two lines
        ([' \t"v1" ,, "v2",'], TagList(False, (EntityTag('"v1"'), EntityTag('"v2"')))),
        (['"a,b"'], TagList(False, (EntityTag('"a,b"'),))),  # a comma inside the quotes
        (['""'], TagList(False, (EntityTag('""'),))),
        (["*"], TagList(True)),
        ([" * "], TagList(True)),
    ],
)
def test_entity_tag_lists(values: list[str], expected: TagList):
    assert parse_tag_list(values) == expected


@pytest.mark.parametrize(
    "values",
    [
        [],
        [""],
        [" , "],
        ["v1"],  # unquoted
        ['"v1'],
        ['v1"'],
        ['w/"v1"'],  # W/ is case-sensitive
        ['W/ "v1"'],
        ['"v1" "v2"'],  # no comma
        ['"v 1"'],  # SP is not an etagc
        ['"v1", *'],  # * stands alone
        ["*", '"v1"'],
        ["**"],
        ['"v1\x00"'],
        ['"v1", garbage'],
    ],
)
def test_malformed_lists_are_none(values: list[str]):
    assert parse_tag_list(values) is None


@pytest.mark.parametrize(
    ("values", "hit"),
    [
        (['"v3"'], True),
        (['W/"v3"'], True),  # weak comparison
        (['"v1", "v3"'], True),
        (['"v1"', 'W/"v3"'], True),
        (["*"], True),
        (['"v2"'], False),
        (['"V3"'], False),  # opaque-tags compare octet by octet
        (["v3"], False),  # malformed: ignored, the key is sent
        (['"v3", garbage'], False),
        (['*, "v3"'], False),
        ([], False),
    ],
)
def test_if_none_match_uses_the_weak_comparison_and_ignores_garbage(values, hit):
    assert none_match(values, '"v3"') is hit


def test_if_match_names_versions_strongly():
    assert if_match([]) is None
    assert if_match(["*"]) == VersionCondition(any=True)
    assert if_match(['"v3"']) == VersionCondition(False, frozenset({3}))
    assert if_match(['"v3", "v4"', '"v9"']) == VersionCondition(False, frozenset({3, 4, 9}))
    # Weak tags and tags that are no version of ours are well-formed but match nothing.
    for header in ('W/"v3"', '"3"', '"v03"', '"v0"', '"latest"', '""'):
        condition = if_match([header])
        assert condition is not None and not condition.holds(3), header


def test_if_match_conditions_hold_only_for_a_current_version():
    assert VersionCondition(any=True).holds(1)
    assert not VersionCondition(any=True).holds(None)
    assert VersionCondition(False, frozenset({2})).holds(2)
    assert not VersionCondition(False, frozenset({2})).holds(3)
    assert VersionCondition(False, frozenset({2, 5})).describe() == "version v2 or v5"


@pytest.mark.parametrize("header", ["v3", '"v3', '"v3", *', "garbage", '"v3" "v4"'])
def test_a_malformed_if_match_is_refused_not_ignored(header: str):
    with pytest.raises(InvalidInput) as info:
        if_match([header])
    assert info.value.http_status == 400 and "If-Match" in str(info.value)


@pytest.mark.parametrize(
    "value",
    ['"v1"', "*", ' W/"v1" , "v2"', '"a,b"', '""', "", "null", "&", '"v1" "v2"', '*,"v1"', "v1"],
)
def test_the_declared_if_match_pattern_accepts_nothing_the_parser_refuses(value: str):
    declared = re.fullmatch(IF_MATCH_PATTERN, value) is not None
    parsed = parse_tag_list([value]) is not None
    assert declared <= parsed, value  # schema-valid => accepted (a client is never surprised)
