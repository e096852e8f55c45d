"""Logging set-up for every entrypoint: text for people, JSON lines for collectors.

``configure`` is called once per entrypoint (the CLI group, each server worker).
``request_id`` is set by the HTTP server for the duration of a request, and every
record logged meanwhile carries it. Nothing here formats a secret: callers log
fingerprints and ids, never keys.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"

request_id: ContextVar[str | None] = ContextVar("keyvault_request_id", default=None)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, exception type."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            entry["request_id"] = rid
        if record.exc_info and record.exc_info[0] is not None:
            # The type and the formatted traceback; a traceback shows code, not locals.
            entry["exc_type"] = record.exc_info[0].__name__
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(fmt: str = "text", level: int = logging.WARNING) -> None:
    """Send keyvault's records to stderr in ``fmt`` (``text`` or ``json``) from ``level`` up."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"unknown log format {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_keyvault", False)]:
        root.removeHandler(old)
    handler._keyvault = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
