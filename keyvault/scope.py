"""Scope grammar: the one definition of an APPID, of a key's scope and of a grant's scopes.

- An APPID (``APPID``): a letter or digit, then up to 63 letters, digits, ``_`` or ``-``.
  ``DEFAULT_APPID_PATTERN`` is that rule anchored; an operator may replace it
  (``[validation] appid_pattern``), so functions take the pattern as an argument.
  The TA simulator, the HTTP schema and the SSH front use this same rule.
- A key's scope (``Scope``): ``root`` (every project of a cluster) or ``app:<APPID>``.
- A grant's scopes (tokens, webhooks): ``root:CLUSTER``, ``app:CLUSTER/APPID`` or
  ``app:CLUSTER/*``, parsed by ``parse_grant_scope(s)`` into a ``Grant``.

Imports only ``re``, ``dataclasses`` and ``keyvault.errors``: the CLI, the services and the
sandbox all load it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from keyvault.errors import InvalidInput

ROOT = "root"
# Unanchored, to embed in larger expressions (e.g. ``-appid (APPID)`` in a command line).
APPID = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
DEFAULT_APPID_PATTERN = rf"^{APPID}$"
APPID_RULE = "a letter or digit, then up to 63 letters, digits, '_' or '-'"
WILDCARD = "*"


@dataclass(frozen=True)
class Scope:
    """A validated scope; ``str()`` is its stored form."""

    appid: str | None = None

    @property
    def is_root(self) -> bool:
        return self.appid is None

    def __str__(self) -> str:
        return ROOT if self.appid is None else f"app:{self.appid}"

    def describe(self) -> str:
        return "the root key" if self.appid is None else f"the key of app {self.appid}"


def is_appid(text: object, pattern: str = DEFAULT_APPID_PATTERN) -> bool:
    """True if ``text`` is a string that matches ``pattern`` in full."""
    return isinstance(text, str) and re.fullmatch(pattern, text) is not None


def validate_appid(appid: str, pattern: str = DEFAULT_APPID_PATTERN) -> str:
    """Return ``appid`` if it matches ``pattern`` in full, else raise ``InvalidInput``."""
    if not is_appid(appid, pattern):
        shown = repr(appid)[:80]
        rule = APPID_RULE if pattern == DEFAULT_APPID_PATTERN else pattern
        raise InvalidInput(
            f"invalid APPID {shown}: it must match {pattern}",
            hint=f"give the project's APPID exactly as TA shows it ({rule})",
        )
    return appid


def schema_pattern(pattern: str = DEFAULT_APPID_PATTERN) -> str:
    """``pattern`` as JSON Schema states it: anchored (JSON Schema searches, keyvault fullmatches)."""
    return pattern if pattern.startswith("^") and pattern.endswith("$") else f"^(?:{pattern})$"


def app_scope(appid: str, pattern: str = DEFAULT_APPID_PATTERN) -> Scope:
    """The scope of one project's key."""
    return Scope(validate_appid(appid, pattern))


def root_scope() -> Scope:
    """The scope of the root key."""
    return Scope(None)


def parse_scope(text: str, pattern: str = DEFAULT_APPID_PATTERN) -> Scope:
    """Parse ``root`` or ``app:<APPID>``."""
    if text == ROOT:
        return root_scope()
    if text.startswith("app:"):
        return app_scope(text[4:], pattern)
    raise InvalidInput(f"invalid scope {text!r}", hint="use 'root' or 'app:<APPID>'")


# --- grants: what a token may read, what events a webhook receives ----------------------------

_GRANT_SCOPE = re.compile(r"root:(?P<root>[^/\s]+)|app:(?P<cluster>[^/\s]+)/(?P<appid>\S+)")
GRANT_SCOPE_HINT = "use root:CLUSTER, app:CLUSTER/APPID or app:CLUSTER/*"


@dataclass(frozen=True)
class GrantScope:
    """One granted scope: a cluster's root key, one app's key, or (``appid="*"``) every app's."""

    cluster: str
    appid: str | None  # None: the root key

    def __str__(self) -> str:
        return f"root:{self.cluster}" if self.appid is None else f"app:{self.cluster}/{self.appid}"


def parse_grant_scope(text: str, *, appid_pattern: str = DEFAULT_APPID_PATTERN) -> GrantScope:
    """Parse and validate ``root:CLUSTER``, ``app:CLUSTER/APPID`` or ``app:CLUSTER/*``."""
    m = _GRANT_SCOPE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise InvalidInput(f"invalid scope {str(text)[:120]!r}", hint=GRANT_SCOPE_HINT)
    if m["root"] is not None:
        return GrantScope(m["root"], None)
    appid = m["appid"]
    if appid != WILDCARD and not is_appid(appid, appid_pattern):
        raise InvalidInput(f"invalid APPID in scope {text!r}", hint=GRANT_SCOPE_HINT)
    return GrantScope(m["cluster"], appid)


def parse_grant_scopes(
    texts: Iterable[str], *, appid_pattern: str = DEFAULT_APPID_PATTERN
) -> list[str]:
    """Validate scope strings; return them in their given order without duplicates."""
    out: list[str] = []
    for text in texts:
        parse_grant_scope(text, appid_pattern=appid_pattern)
        if text not in out:
            out.append(text)
    return out


@dataclass(frozen=True)
class Grant:
    """What a holder may read: root of some clusters, some or all apps of others."""

    name: str
    roots: frozenset[str]
    apps: frozenset[tuple[str, str]]  # (cluster, appid or "*")
    can_rotate: bool

    def allows(self, cluster: str, scope: str) -> bool:
        """True if ``scope`` (``root`` or ``app:X``) of ``cluster`` is covered."""
        if scope == ROOT:
            return cluster in self.roots
        appid = scope[4:]
        return (cluster, appid) in self.apps or (cluster, WILDCARD) in self.apps

    def covers_cluster(self, cluster: str) -> bool:
        return cluster in self.roots or any(c == cluster for c, _ in self.apps)

    @property
    def clusters(self) -> frozenset[str]:
        """Every cluster named by the grant."""
        return self.roots | {c for c, _ in self.apps}


def grant_of_scopes(name: str, scopes: Iterable[str], *, can_rotate: bool = False) -> Grant:
    """The Grant of stored (already validated) scope strings.

    Stored scopes were validated against the APPID rule in force when they were written;
    they are read back by syntax only, so a later, stricter rule does not lock a holder out.
    """
    roots: set[str] = set()
    apps: set[tuple[str, str]] = set()
    for text in scopes:
        scope = parse_grant_scope(text, appid_pattern=r".+")
        if scope.appid is None:
            roots.add(scope.cluster)
        else:
            apps.add((scope.cluster, scope.appid))
    return Grant(name=name, roots=frozenset(roots), apps=frozenset(apps), can_rotate=can_rotate)
