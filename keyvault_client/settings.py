"""Where a client connects, as whom, under which name: arguments first, then the environment.

``KEYVAULT_ADDR`` (comma-separated base URLs), ``KEYVAULT_TOKEN`` and ``KEYVAULT_TOKEN_FILE``
are read when a client (or the agent, or ``run``) is made, never at import.
"""

from __future__ import annotations

import re
import socket
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence

from keyvault_client.errors import InvalidInput

_CONSUMER = re.compile(r"[A-Za-z0-9._:@-]{1,64}")


def normalize_url(url: str) -> str:
    """``http(s)://host[:port][/prefix]`` without a trailing slash; InvalidInput otherwise."""
    parts = urllib.parse.urlsplit(str(url).strip())
    port_ok = _port_ok(parts)
    port = f":{parts.port}" if port_ok and parts.port else ""
    shown = f"{parts.scheme}://{parts.hostname or ''}{port}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(
            f"invalid keyvault URL {shown!r}",
            hint="use http(s)://host[:port][/prefix], e.g. http://127.0.0.1:8200",
        )
    if "@" in parts.netloc or parts.query or parts.fragment or not port_ok:
        raise InvalidInput(
            f"invalid keyvault URL {shown!r}: no user@, query, fragment or bad port",
            hint="the token goes in Client(url, token), not in the URL",
        )
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _port_ok(parts: urllib.parse.SplitResult) -> bool:
    try:
        _ = parts.port
    except ValueError:
        return False
    return True


def addresses_from(url: str | Sequence[str] | None, environ: Mapping[str, str]) -> list[str]:
    """The base URLs: ``url`` (one, comma-separated, or a list), else ``KEYVAULT_ADDR``."""
    given: Iterable[str]
    if url is None:
        given = environ.get("KEYVAULT_ADDR", "").split(",")
    elif isinstance(url, str):
        given = url.split(",")
    else:
        given = url
    urls = [normalize_url(u) for u in given if str(u).strip()]
    if not urls:
        raise InvalidInput(
            "no keyvault address",
            hint="pass one or more URLs, or set KEYVAULT_ADDR (comma-separated)",
        )
    return list(dict.fromkeys(urls))


def token_from(token: str | None, token_file: str | None, environ: Mapping[str, str]) -> str:
    """The bearer token: ``token``, ``token_file``'s content, ``KEYVAULT_TOKEN``, or the
    content of ``KEYVAULT_TOKEN_FILE``, in that order."""
    if token is None and token_file is None:
        token = environ.get("KEYVAULT_TOKEN") or None
        token_file = None if token else (environ.get("KEYVAULT_TOKEN_FILE") or None)
    if token is None and token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(
                f"cannot read the token file {token_file!r}: "
                f"{getattr(exc, 'strerror', None) or type(exc).__name__}",
                hint="pass --token-file FILE (or KEYVAULT_TOKEN_FILE) naming a readable file",
            ) from None
    if not isinstance(token, str) or not token.strip() or any(c.isspace() for c in token):
        raise InvalidInput(
            "the keyvault token is missing, empty or contains whitespace",
            hint="pass the kvt_... string printed by `keyvault token create` "
            "(token, KEYVAULT_TOKEN or KEYVAULT_TOKEN_FILE)",
        )
    return token


def consumer_name(consumer: str | None) -> str:
    """The ``X-Keyvault-Consumer`` value: ``consumer`` (checked), else the host name (made fit)."""
    if consumer is not None:
        if not _CONSUMER.fullmatch(consumer):
            raise InvalidInput(
                f"invalid consumer name {consumer[:80]!r}",
                hint="use 1-64 characters of A-Z a-z 0-9 . _ : @ -",
            )
        return consumer
    host = re.sub(r"[^A-Za-z0-9._:@-]", "-", socket.gethostname())[:64]
    return host or "unknown"
