"""Scopes of a TA key: ``root`` (every project) or ``app:<APPID>`` (one project)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from keyvault.config import DEFAULT_APPID_PATTERN
from keyvault.errors import InvalidInput

ROOT = "root"


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


def validate_appid(appid: str, pattern: str = DEFAULT_APPID_PATTERN) -> str:
    """Return ``appid`` if it matches ``pattern`` in full, else raise ``InvalidInput``."""
    if not isinstance(appid, str) or re.fullmatch(pattern, appid) is None:
        shown = repr(appid)[:80]
        raise InvalidInput(
            f"invalid APPID {shown}: it must match {pattern}",
            hint="give the project's APPID exactly as TA shows it",
        )
    return appid


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
