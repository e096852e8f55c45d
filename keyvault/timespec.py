"""Durations (``90d``, ``12h``) and points in time (``--since``) as operators type them.

One grammar for every command and service: token lifetimes, policy max ages, ``--since``.
Imports only the standard library and ``keyvault.errors``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from keyvault.errors import InvalidInput

_DURATION = re.compile(r"^(\d{1,6})([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
DURATION_HINT = "use a number and a unit: 30m, 12h, 90d, 2w"


def parse_duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``2w``, ``45s`` (not zero)."""
    m = _DURATION.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise InvalidInput(f"invalid duration {text!r}", hint=DURATION_HINT)
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def parse_since(text: str, *, now: datetime, what: str = "--since") -> datetime:
    """An ISO time (UTC when it names no zone) or a duration before ``now`` (``1h``)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        try:
            return now - parse_duration(text)
        except InvalidInput:
            raise InvalidInput(
                f"invalid {what} {text!r}",
                hint="give an ISO time (2026-01-31T12:00) or a duration like 1h, 7d",
            ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
