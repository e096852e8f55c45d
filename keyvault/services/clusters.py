"""Clusters: add, list, look up, and their per-cluster options.

Every column that steers where keys go or how they are parsed (Open API URL, key pattern,
options) is under the row's MAC (``services.integrity``): writers here seal it, and
``checked_cluster`` is how a rotation, a verify or a recovery gets a cluster it may use.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.config import DEFAULT_APPID_PATTERN, DEFAULT_KEY_PATTERN
from keyvault.errors import Conflict, InvalidInput, NotFound
from keyvault.models import Cluster, utcnow
from keyvault.scope import validate_appid
from keyvault.services import integrity

CLUSTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Options an operator may set per cluster; unknown TA facts live here.
OPTION_NAMES = {
    "verify_root_method": "POST",
    "verify_root_path": "open/project-list",
    "verify_app_method": "GET",
    "verify_app_path": "open/list-event-meta",
    "login_name": "",
    "project_ids": {},
    "generate_root_command": "ta-tool generate_root_secret",
    "generate_app_command": "ta-tool generate_api_secret -appid {appid}",
}


def validate_url(url: str) -> str:
    """An http(s) URL with a host, without query or credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.username:
        raise InvalidInput(
            f"invalid Open API URL {url!r}", hint="give it as http://HOST:8992 (no token, no query)"
        )
    return url.rstrip("/")


def validate_key_pattern(pattern: str) -> str:
    """A regex that compiles and cannot match the empty string."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise InvalidInput(f"invalid key pattern {pattern!r}: {exc}") from None
    if compiled.fullmatch(""):
        raise InvalidInput(
            f"key pattern {pattern!r} matches the empty string", hint="make it stricter"
        )
    return pattern


def validate_project_id(appid: str, project_id: object, appid_pattern: str) -> int:
    """A valid APPID mapped to a whole, non-negative project id, else ``InvalidInput``."""
    validate_appid(appid, appid_pattern)
    if type(project_id) is not int or project_id < 0:
        raise InvalidInput(
            f"invalid project id {project_id!r} for APPID {appid}",
            hint="give it as APPID=NUMBER, the project id TA shows for the project",
        )
    return project_id


def validate_project_ids(
    mapping: object, appid_pattern: str = DEFAULT_APPID_PATTERN
) -> dict[str, int]:
    """An APPID -> project id map whose every entry is valid (nothing bad is ever stored)."""
    if not isinstance(mapping, Mapping):
        raise InvalidInput("project ids must be a map of APPID to project id")
    return {appid: validate_project_id(appid, pid, appid_pattern) for appid, pid in mapping.items()}


def _validated_options(options: Mapping[str, Any], appid_pattern: str) -> dict[str, Any]:
    unknown = set(options) - set(OPTION_NAMES)
    if unknown:
        raise InvalidInput(
            f"unknown cluster option(s): {', '.join(sorted(unknown))}",
            hint=f"use {', '.join(sorted(OPTION_NAMES))}",
        )
    out = dict(options)
    if "project_ids" in out:
        out["project_ids"] = validate_project_ids(out["project_ids"], appid_pattern)
    return out


def cluster_options(cluster: Cluster) -> dict:
    """The cluster's options merged over the defaults."""
    return {**OPTION_NAMES, **json.loads(cluster.options or "{}")}


def add_cluster(
    session: Session,
    *,
    keyring: crypto.Keyring,
    name: str,
    open_api_url: str,
    key_pattern: str | None = None,
    options: Mapping[str, Any] | None = None,
    appid_pattern: str = DEFAULT_APPID_PATTERN,
) -> Cluster:
    """Register a TA cluster."""
    if not CLUSTER_NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid cluster name {name!r}", hint="use letters, digits, '.', '_' and '-'"
        )
    checked = _validated_options(options or {}, appid_pattern)
    cluster = Cluster(
        name=name,
        open_api_url=validate_url(open_api_url),
        key_pattern=validate_key_pattern(key_pattern or DEFAULT_KEY_PATTERN),
        options=json.dumps(checked, sort_keys=True),
        created_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(cluster)
    except SAIntegrityError:
        raise Conflict(f"cluster {name!r} already exists", hint="choose another name") from None
    integrity.seal_row(session, cluster, keyring=keyring)
    return cluster


def set_options(
    session: Session,
    *,
    keyring: crypto.Keyring,
    name: str,
    appid_pattern: str = DEFAULT_APPID_PATTERN,
    **changes: Any,
) -> Cluster:
    """Change the Open API URL, the key pattern or options of a cluster.

    ``project_ids`` replaces the whole map; `update_project_ids` changes single entries.
    The row is re-MACed as it then stands (an operator's `cluster set` is also how a row
    that failed its check is taken back into use, after review).
    """
    cluster = get_cluster(session, name=name)
    if changes.get("open_api_url"):
        cluster.open_api_url = validate_url(changes.pop("open_api_url"))
    if changes.get("key_pattern"):
        cluster.key_pattern = validate_key_pattern(changes.pop("key_pattern"))
    checked = _validated_options(
        {
            k: v
            for k, v in changes.items()
            if v is not None and k not in ("open_api_url", "key_pattern")
        },
        appid_pattern,
    )
    cluster.options = json.dumps({**json.loads(cluster.options or "{}"), **checked}, sort_keys=True)
    integrity.seal_row(session, cluster, keyring=keyring)
    return cluster


def update_project_ids(
    session: Session,
    *,
    keyring: crypto.Keyring,
    name: str,
    mapped: Mapping[str, int] | None = None,
    removed: Iterable[str] = (),
    appid_pattern: str = DEFAULT_APPID_PATTERN,
) -> Cluster:
    """Map APPIDs to project ids (over the existing map) and drop the ``removed`` APPIDs.

    A removed APPID need not match the APPID rule (that is how an entry stored before the
    rule was enforced is dropped), but it must be mapped.
    """
    cluster = get_cluster(session, name=name)
    stored = json.loads(cluster.options or "{}")
    current = dict(stored.get("project_ids") or {})
    for appid in removed:
        if appid not in current:
            raise NotFound(
                f"no project id mapped for APPID {appid!r} in cluster {name}",
                hint="see `keyvault cluster list --json` (options.project_ids)",
            )
        del current[appid]
    current.update(validate_project_ids(mapped or {}, appid_pattern))
    # Entries kept as they were are not re-validated: the rule may have changed since.
    stored["project_ids"] = current
    cluster.options = json.dumps(stored, sort_keys=True)
    integrity.seal_row(session, cluster, keyring=keyring)
    return cluster


def get_cluster(session: Session, *, name: str) -> Cluster:
    """The cluster called ``name``, or ``NotFound``."""
    cluster = session.scalar(select(Cluster).where(Cluster.name == name))
    if cluster is None:
        raise NotFound(
            f"no cluster named {name!r}",
            hint="see `keyvault cluster list` or add it with `keyvault cluster add`",
        )
    return cluster


def checked_cluster(session: Session, *, name: str, keyring: crypto.Keyring) -> Cluster:
    """``get_cluster``, refused (``IntegrityError``) unless its row MAC verifies: for every
    use that sends a key somewhere or parses one (rotation, verify, recovery)."""
    cluster = get_cluster(session, name=name)
    integrity.check_row(cluster, keyring=keyring)
    return cluster


def list_clusters(session: Session) -> list[Cluster]:
    """All clusters by name."""
    return list(session.scalars(select(Cluster).order_by(Cluster.name)))


def cluster_info(cluster: Cluster) -> dict:
    """A JSON-ready description of a cluster."""
    return {
        "name": cluster.name,
        "open_api_url": cluster.open_api_url,
        "key_pattern": cluster.key_pattern,
        "options": json.loads(cluster.options or "{}"),
        "created_at": cluster.created_at.isoformat(),
    }
