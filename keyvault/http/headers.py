"""Request header grammar (RFC 9110), parsed in one place for the fast path and the routes.

- ``Authorization``: ``credentials = auth-scheme [ 1*SP token68 ]``; the scheme is
  case-insensitive (RFC 9110 §11.1, RFC 6750 §2.1), so ``bearer`` and ``BEARER`` are
  ``Bearer``.
- ``If-None-Match`` / ``If-Match``: ``"*"`` or a comma-separated list of entity-tags
  (``[W/] DQUOTE *etagc DQUOTE``), possibly over several header lines (§5.3: a list header
  sent twice is one list).

If-None-Match uses the weak comparison (§8.8.3.2: ``W/"v3"`` matches ``"v3"``): a malformed
value is ignored, which answers the full representation (200), never a wrong 304.
If-Match uses the strong comparison (a weak tag never matches) and guards an unsafe method:
a malformed value is refused (400), never ignored, since ignoring it would rotate anyway.

Plain functions on strings: imported by the fast path without FastAPI.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from keyvault.errors import InvalidInput

BEARER = "bearer"
# token68 = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_CREDENTIALS = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?: +([A-Za-z0-9._~+/-]+=*))? *")
# One list member: an entity-tag (etagc: %x21 / %x23-7E / obs-text), or "*".
_ETAG = re.compile(r'(W/)?"([\x21\x23-\x7e\x80-\xff]*)"')
_OWS = " \t"
# If-Match as the OpenAPI document declares it (ECMA-262): "*" or a list of entity-tags. The
# parser accepts a little more (empty list elements, obs-text); never less.
_TAG = r'(W/)?"[\x21\x23-\x7e]*"'
IF_MATCH_PATTERN = rf"^[ \t]*(\*|{_TAG}([ \t]*,[ \t]*{_TAG})*)[ \t]*$"
_VERSION_TAG = re.compile(r"v([1-9][0-9]{0,17})")  # our opaque-tags: "v1", "v2", ...


def bearer_token(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (scheme in any case), else None."""
    if not authorization:
        return None
    match = _CREDENTIALS.fullmatch(authorization.strip(_OWS))
    if match is None or match[1].lower() != BEARER or not match[2]:
        return None
    return match[2]


@dataclass(frozen=True)
class EntityTag:
    """One entity-tag of a request: its opaque-tag (quotes included) and weakness."""

    opaque: str
    weak: bool = False


@dataclass(frozen=True)
class TagList:
    """A parsed If-None-Match / If-Match: ``any`` for ``*``, else the tags listed."""

    any: bool
    tags: tuple[EntityTag, ...] = ()


def parse_tag_list(values: Iterable[str]) -> TagList | None:
    """The list in the header's lines ``values`` (joined by commas); None if it is malformed
    (or empty). ``*`` must stand alone (RFC 9110: ``"*" / #entity-tag``)."""
    members = [m.strip(_OWS) for value in values for m in _split_members(value)]
    members = [m for m in members if m]  # the #rule allows empty elements: ", ,"
    if members == ["*"]:
        return TagList(any=True)
    tags = []
    for member in members:
        match = _ETAG.fullmatch(member)
        if match is None:
            return None
        tags.append(EntityTag(f'"{match[2]}"', weak=match[1] is not None))
    return TagList(any=False, tags=tuple(tags)) if tags else None


def _split_members(value: str) -> list[str]:
    """Split on the commas outside quotes (an opaque-tag may hold a comma)."""
    if "," not in value:  # the usual If-None-Match: one tag
        return [value]
    members, start, quoted = [], 0, False
    for i, char in enumerate(value):
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            members.append(value[start:i])
            start = i + 1
    members.append(value[start:])
    return members


def none_match(values: Sequence[str], etag: str) -> bool:
    """True if If-None-Match (its header lines ``values``) matches the current ``etag``
    by the weak comparison, i.e. the answer is 304; False if absent or malformed."""
    if len(values) == 1 and values[0] == etag:  # the hot path's revalidation, parsed or not
        return True
    parsed = parse_tag_list(values)
    if parsed is None:
        return False
    return parsed.any or any(tag.opaque == etag for tag in parsed.tags)


def lists_tag(values: Sequence[str], etag: str) -> bool:
    """True if If-None-Match lists ``etag`` itself: the client shows it holds that version.
    ``*`` matches any current representation but says nothing about which one it holds."""
    if len(values) == 1 and values[0] == etag:
        return True
    parsed = parse_tag_list(values)
    return parsed is not None and any(tag.opaque == etag for tag in parsed.tags)


@dataclass(frozen=True)
class VersionCondition:
    """What If-Match asks of a rotation: a current version (``any``) or one of ``versions``."""

    any: bool
    versions: frozenset[int] = frozenset()

    def holds(self, current: int | None) -> bool:
        """True if the current version (None: the scope has no key) satisfies it."""
        if current is None:
            return False
        return self.any or current in self.versions

    def describe(self) -> str:
        if self.any:
            return "a current version (If-Match: *)"
        return "version " + " or ".join(f"v{v}" for v in sorted(self.versions))


def if_match(values: list[str]) -> VersionCondition | None:
    """The rotation precondition of If-Match's header lines; None if there are none;
    ``InvalidInput`` (400) if malformed. Strong comparison: a weak tag matches no version."""
    if not values:
        return None
    parsed = parse_tag_list(values)
    if parsed is None:
        raise InvalidInput(
            "invalid If-Match header",
            hint='send If-Match: "vN" (the version you expect to replace, quoted) or *',
        )
    if parsed.any:
        return VersionCondition(any=True)
    versions = set()
    for tag in parsed.tags:
        match = None if tag.weak else _VERSION_TAG.fullmatch(tag.opaque[1:-1])
        if match is not None:
            versions.add(int(match[1]))
    # Tags that name no version of ours (or weak ones) stay in the list and match nothing:
    # the precondition then fails (412), as RFC 9110 §13.1.1 says.
    return VersionCondition(any=False, versions=frozenset(versions))
