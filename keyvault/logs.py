"""Logging for every entrypoint: one line per record, as text for people or JSON for collectors.

``configure`` is called once per process by the entrypoint (the CLI group, ``serve``);
nothing configures logging at import time. The HTTP server sets :data:`request_id` for
the duration of a request, so every record logged while serving it carries the id the
client sent (``X-Request-ID``) or one the server made up.

No secrets: records carry what keyvault's own messages say (fingerprints, never keys);
exception text is included but keyvault's errors never hold a key.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Final

FORMATS: Final = ("text", "json")
# The id of the HTTP request being served (None outside a request).
request_id: ContextVar[str | None] = ContextVar("keyvault_request_id", default=None)

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else was passed with ``extra=`` and is kept.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = request_id.get()
        if rid is not None:
            entry["request_id"] = rid
        for name, value in record.__dict__.items():
            if name not in _STANDARD and not name.startswith("_"):
                entry[name] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            entry["error"] = record.exc_info[0].__name__
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":"))


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = request_id.get()
        return text if rid is None else f"{text} [request {rid}]"


def configure(
    fmt: str = "text", *, level: int = logging.WARNING, stream: IO[str] | None = None
) -> None:
    """Send keyvault's records (and its libraries') to ``stream`` (stderr) in ``fmt``.

    Replaces handlers a previous call installed, so calling it again (tests, ``serve``
    after the CLI group) changes the format rather than doubling every line.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; use one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else _TextFormatter(_TEXT_FORMAT))
    handler.set_name("keyvault")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "keyvault"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # paramiko reports transport errors itself; keyvault's own error says what matters.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL if level > logging.DEBUG else level)
