"""The injected clock: a callable returning an aware UTC ``datetime`` that moves only when
the test moves it, so that no test sleeps and no assertion depends on elapsed time.

    clock = Clock()              # starts at the real time now
    clock = Clock(some_datetime) # starts there
    clock.now = later            # jump
    clock.advance(30)            # seconds, or a timedelta
    Scheduler(..., clock=clock); webhooks.deliver_due(..., now=clock)
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class Clock:
    """Returns ``now``, which only the test changes."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now if now is not None else datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: float | timedelta) -> None:
        """Move forward by ``by`` seconds (or a timedelta)."""
        self.now += by if isinstance(by, timedelta) else timedelta(seconds=by)
