"""Client for the TA (ThinkingData) Open API: build URLs, call them, explain return codes.

What TA's Open API documentation confirms: the URL is ``http://<host>:8992/<api_path>?token=<key>``,
GET or POST (JSON body; form body for ``querySql``), and errors come back as HTTP 200 with a
non-zero ``return_code`` in the envelope. The key travels in the query string, so every URL this
module shows (exception, repr, log) goes through ``redact_url`` and server text is scrubbed of it.
"""

from __future__ import annotations

import json
import logging
import re
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from keyvault import httpclient
from keyvault.errors import InvalidInput, TaApiError, TaTransportError

log = logging.getLogger("keyvault.ta")

DEFAULT_PORT = 8992
# Only numbers confirmed by TA's docs, plus one claimed by a public client; everything else
# must come from the operator's [ta] error_codes because guessing would mislabel failures.
DEFAULT_RETURN_CODES: dict[int, str] = {
    0: "success",
    -1999: "invalid item",
    -1005: "request frequency too fast (unverified)",
}
UNKNOWN_MEANING = "unknown return code (add it to [ta] error_codes in keyvault.toml)"
# The seed document's return-code table lost its numbers; the texts stay here as a reference
# for operators who learn a number and want to map it in [ta] error_codes.
KNOWN_DESCRIPTIONS: tuple[str, ...] = (
    "Successful execution",
    "Execution failed",
    "Not logged in",
    "Login failed",
    "Logout failed",
    "Your account has been locked, please contact the administrator to solve",
    "Incorrect username or password, please confirm and log in again",
    "There seems to be some problems with the system, please try again later or contact us",
    "The request frequency is too fast, please try again later",
    "You do not have permission to operate",
    "SSO login failed",
    "Parameter error",
    "User name does not exist",
    "Illegal operation",
    "The data is not yet ready",
    "No data for current query",
    "Data is being prepared",
    "Invalid access",
    "Already exists",
    "Wrong phone number",
    "Some members are already in this project",
    "Request cancelled",
    "Target object no longer exists",
    "Incomplete or invalid custom event expression",
    "Exceeding the number of objects that can be created",
    "Invalid user",
    "For unregistered users, the settings will take effect after registration is activated",
    "Registered user, the next login setting takes effect after activation",
    "The user is already in the project",
    "The operator's authority cannot be lower than the operator's authority",
    "Parameter missing, please contact administrator",
    "You do not have the operation permission",
    "The data has been updated",
    "License authentication failed",
    "License verification failed, please contact TA customer service personnel to solve",
    "Invalid item",
    "MFA verification failed, error or expired MFA verification code",
    "The current enterprise has started mandatory MFA virtual device login verification, "
    "please bind",
    "The current user has bound the MFA virtual device and cannot repeat the binding",
    "The current user has opened the MFA virtual device login verification, "
    "missing the MFA verification code",
    "Operation not supported",
)
# The codes for a rejected key are unknown, so a return_message containing one of these
# (case-insensitive) also counts; a false positive only costs the consumer one key refresh.
KEY_REJECTED_HINTS: tuple[str, ...] = ("invalid access", "not logged in", "token", "secret")

_TOKEN_RE = re.compile(r"(?i)((?:^|[?&;])token=)[^&#]*")
_API_PATH_RE = re.compile(r"[A-Za-z0-9._~/-]+")
_BASE_HINT = f"use http(s)://<host>[:port][/prefix], e.g. http://ta2:{DEFAULT_PORT}"


@dataclass(frozen=True)
class KeyCheck:
    """A cheap Open API call that proves a key works (inferred from public clients)."""

    method: str
    api_path: str
    param: str  # the query parameter the caller must fill in (project id / login name)


# Metadata reads: cheap and side-effect free, unlike querySql which starts a real query.
APP_KEY_CHECK = KeyCheck("GET", "open/list-event-meta", "projectId")
ROOT_KEY_CHECK = KeyCheck("POST", "open/project-list", "loginName")


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of ``verify_key``; return_code is None when TA could not be reached."""

    ok: bool
    return_code: int | None
    return_message: str
    detail: str
    key_rejected: bool = False  # TA refused the key itself (``is_key_rejected``), not busy


def redact_url(url: str) -> str:
    """Return ``url`` with the value of its ``token`` query parameter replaced by ``***``."""
    return _TOKEN_RE.sub(r"\1***", url)


def _scrub(text: str, token: str) -> str:
    # Servers may echo the key (e.g. "invalid token <key>"), raw or URL-encoded.
    for form in {token, urllib.parse.quote(token, safe=""), urllib.parse.quote_plus(token)}:
        if form:
            text = text.replace(form, "***")
    return text


def _normalize_base_url(base_url: str) -> str:
    # Messages show the URL without credentials or token.
    shown = redact_url(re.sub(r"//[^/@]*@", "//***@", str(base_url)))
    parts = urllib.parse.urlsplit(str(base_url).strip())
    try:
        _ = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        problem = "has an invalid port"
        raise InvalidInput(f"the TA base URL {shown!r} {problem}", hint=_BASE_HINT) from None
    for failed, problem in (
        (parts.scheme.lower() not in ("http", "https"), "is not http:// or https://"),
        (not parts.hostname, "has no host"),
        ("@" in parts.netloc, "must not contain user:password@ (TA uses the token only)"),
        (parts.query or parts.fragment, "must not contain a query or fragment"),
    ):
        if failed:
            raise InvalidInput(f"the TA base URL {shown!r} {problem}", hint=_BASE_HINT)
    path = parts.path.rstrip("/")
    return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc, path, "", ""))


def _normalize_api_path(api_path: str) -> str:
    path = str(api_path).strip().strip("/")
    if not _API_PATH_RE.fullmatch(path) or ".." in path.split("/"):
        raise InvalidInput(
            f"invalid TA API path {api_path!r}",
            hint="give a plain path like open/list-event-meta; params hold the rest",
        )
    return path


def _param_value(value: Any) -> str:
    # TA is a Java server: booleans must read "true"/"false", not Python's "True".
    return str(value).lower() if isinstance(value, bool) else str(value)


def build_url(
    base_url: str, api_path: str, token: str, params: Mapping[str, Any] | None = None
) -> str:
    """Return ``<base_url>/<api_path>?token=<token>&<params>`` (contains the key: never log it)."""
    base, path = _normalize_base_url(base_url), _normalize_api_path(api_path)
    if not isinstance(token, str) or not token.strip():
        raise InvalidInput("the TA key (token) is empty")
    query: list[tuple[str, str]] = [("token", token)]
    for name, value in (params or {}).items():
        if str(name).lower() == "token":
            raise InvalidInput("params must not contain 'token'; pass the key as token=")
        if value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        query.extend((str(name), _param_value(v)) for v in values)
    return f"{base}/{path}?{urllib.parse.urlencode(query)}"


def _snippet(body: bytes, token: str) -> str:
    text = " ".join(body[:120].decode("utf-8", "replace").split())
    return f", body starts {_scrub(text, token)!r}" if text else ""


class TaClient:
    """Calls the Open API of one TA cluster; the key is passed per call and never stored."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 10.0,
        error_codes: Mapping[int, str] | None = None,
        invalid_key_codes: Iterable[int] | None = None,
    ) -> None:
        self.base_url = _normalize_base_url(base_url)
        if not timeout or timeout <= 0:
            raise InvalidInput(f"the TA timeout must be positive, not {timeout!r}")
        self.timeout = float(timeout)
        self.return_codes = {
            **DEFAULT_RETURN_CODES,
            **{int(k): str(v) for k, v in (error_codes or {}).items()},
        }
        self.invalid_key_codes = frozenset(int(c) for c in (invalid_key_codes or ()))

    def __repr__(self) -> str:
        return f"TaClient(base_url={self.base_url!r})"

    def meaning(self, return_code: int) -> str:
        """Return the table's meaning of ``return_code`` or the unknown-code text."""
        return self.return_codes.get(return_code, UNKNOWN_MEANING)

    def is_key_rejected(self, error: BaseException) -> bool:
        """True if ``error`` says TA refused the key (see ``is_key_rejected``)."""
        return is_key_rejected(error, self.invalid_key_codes)

    def call(
        self,
        api_path: str,
        *,
        token: str,
        method: str = "GET",
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        form_body: Mapping[str, Any] | None = None,
    ) -> Any:
        """Call ``api_path`` and return the envelope's ``data``; raise TaApiError on failure."""
        envelope = self.call_envelope(
            api_path,
            token=token,
            method=method,
            params=params,
            json_body=json_body,
            form_body=form_body,
        )
        if envelope["return_code"] != 0:
            raise self._api_error(api_path, envelope, token)
        return envelope.get("data")

    def call_envelope(
        self,
        api_path: str,
        *,
        token: str,
        method: str = "GET",
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        form_body: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Return the parsed envelope whatever its return_code; raise only TaTransportError."""
        url = build_url(self.base_url, api_path, token, params)
        shown, method = redact_url(url), str(method).upper()
        if method not in ("GET", "POST"):
            raise InvalidInput(f"TA Open API method must be GET or POST, not {method!r}")
        if json_body is not None and form_body is not None:
            raise InvalidInput("give either json_body or form_body, not both")
        if method == "GET" and (json_body is not None or form_body is not None):
            raise InvalidInput("a GET request carries no body; use method='POST'")
        headers = {"Accept": "application/json"}
        data = b"" if method == "POST" else None
        if json_body is not None:
            data = json.dumps(json_body, ensure_ascii=False).encode("utf-8")
            headers["Content-Type"] = "application/json; charset=utf-8"
        elif form_body is not None:
            data = urllib.parse.urlencode(
                {k: _param_value(v) for k, v in form_body.items()}
            ).encode("utf-8")
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        log.debug("TA %s %s", method, shown)
        body, content_type = self._send(method, url, data, headers, shown, token)
        envelope = _parse_envelope(body, content_type, shown, token)
        log.debug("TA %s %s -> return_code %s", method, shown, envelope["return_code"])
        return envelope

    def _send(
        self,
        method: str,
        url: str,
        data: bytes | None,
        headers: dict[str, str],
        shown: str,
        token: str,
    ) -> tuple[bytes, str]:
        # httpclient uses no environment proxy (a proxy would see the key in the query
        # string) and follows no redirect: the Open API does not redirect, so a 3xx is a
        # proxy or login page and following it could carry the key somewhere else.
        try:
            answer = httpclient.request(
                method,
                url,
                body=data,
                headers=headers,
                timeout=self.timeout,
                what="the TA Open API",
                shown=shown,
                scrub=lambda text: _scrub(text, token),
            )
        except httpclient.HttpError as exc:
            raise TaTransportError(str(exc)) from None
        if answer.status == 200:
            return answer.body, answer.header("Content-Type")
        # TA reports errors in the envelope with HTTP 200: any other status is a failure.
        detail = "instead of 200" if 200 <= answer.status < 300 else _scrub(answer.reason, token)
        raise TaTransportError(
            f"TA Open API {shown} answered HTTP {answer.status} {detail}"
            f"{_snippet(answer.body, token)}"
        )

    def _api_error(self, api_path: str, envelope: Mapping[str, Any], token: str) -> TaApiError:
        code = envelope["return_code"]
        meaning = self.meaning(code)
        message = _scrub(str(envelope.get("return_message") or ""), token)
        path = _normalize_api_path(api_path)
        error = TaApiError(
            f"TA Open API {path} failed with return_code {code} ({meaning}): "
            f"{message or '(no return_message)'}",
            return_code=code,
            return_message=message,
            meaning=meaning,
        )
        # Kept for diagnosis but out of str(): a Java stack is long and not for the user.
        # (errors.TaApiError does not declare these two; see the pkg requests note.)
        error.stack_message = _scrub(str(envelope.get("stackMessage") or ""), token)
        error.api_path = path
        return error


def _parse_envelope(body: bytes, content_type: str, shown: str, token: str) -> dict[str, Any]:
    hint = f"check that the base URL points at the TA Open API (port {DEFAULT_PORT})"
    try:
        envelope = json.loads(body)
    except ValueError:
        raise TaTransportError(
            f"TA Open API {shown} answered a body that is not JSON "
            f"(Content-Type {content_type or 'none'}, {len(body)} bytes"
            f"{_snippet(body, token)})",
            hint=hint,
        ) from None
    code = envelope.get("return_code") if isinstance(envelope, dict) else None
    if isinstance(code, str) and re.fullmatch(r"\s*-?\d+\s*", code):
        code = int(code)  # parse defensively: a proxy or older TA may quote the number
    if not isinstance(code, int) or isinstance(code, bool):
        raise TaTransportError(
            f"TA Open API {shown} answered JSON without a TA envelope (no integer return_code)",
            hint=hint,
        )
    envelope["return_code"] = code
    return envelope


def is_key_rejected(error: BaseException, invalid_key_codes: Iterable[int] = ()) -> bool:
    """True if ``error`` is a TA answer that means the key is invalid (code or message)."""
    if not isinstance(error, TaApiError) or isinstance(error, TaTransportError):
        return False
    if error.return_code is not None and error.return_code in set(invalid_key_codes):
        return True
    text = (error.return_message or "").lower()
    return any(hint in text for hint in KEY_REJECTED_HINTS)


def verify_key(
    client: TaClient, *, token: str, method: str, api_path: str, params: Mapping[str, Any] | None
) -> VerifyResult:
    """Call a check endpoint with ``token``; report TA failures as ok=False, never raise them."""
    try:
        envelope = client.call_envelope(api_path, token=token, method=method, params=params)
    except TaTransportError as exc:
        return VerifyResult(False, None, "", str(exc))
    code = envelope["return_code"]
    if code != 0:
        error = client._api_error(api_path, envelope, token)
        return VerifyResult(
            False, code, error.return_message, str(error), client.is_key_rejected(error)
        )
    message = _scrub(str(envelope.get("return_message") or ""), token)
    detail = f"{str(method).upper()} {_normalize_api_path(api_path)} answered return_code 0"
    return VerifyResult(True, 0, message, detail)
