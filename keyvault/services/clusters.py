"""Clusters: add, list, look up, and their per-cluster options."""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.orm import Session

from keyvault.config import DEFAULT_KEY_PATTERN
from keyvault.errors import Conflict, InvalidInput, NotFound
from keyvault.models import Cluster, utcnow

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


def cluster_options(cluster: Cluster) -> dict:
    """The cluster's options merged over the defaults."""
    return {**OPTION_NAMES, **json.loads(cluster.options or "{}")}


def add_cluster(
    session: Session,
    *,
    name: str,
    open_api_url: str,
    key_pattern: str | None = None,
    options: dict | None = None,
) -> Cluster:
    """Register a TA cluster."""
    if not CLUSTER_NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid cluster name {name!r}", hint="use letters, digits, '.', '_' and '-'"
        )
    unknown = set(options or {}) - set(OPTION_NAMES)
    if unknown:
        raise InvalidInput(f"unknown cluster option(s): {', '.join(sorted(unknown))}")
    cluster = Cluster(
        name=name,
        open_api_url=validate_url(open_api_url),
        key_pattern=validate_key_pattern(key_pattern or DEFAULT_KEY_PATTERN),
        options=json.dumps(options or {}, sort_keys=True),
        created_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(cluster)
    except SAIntegrityError:
        raise Conflict(f"cluster {name!r} already exists", hint="choose another name") from None
    return cluster


def set_options(session: Session, *, name: str, **changes) -> Cluster:
    """Change the Open API URL, the key pattern or options of a cluster."""
    cluster = get_cluster(session, name=name)
    if changes.get("open_api_url"):
        cluster.open_api_url = validate_url(changes.pop("open_api_url"))
    if changes.get("key_pattern"):
        cluster.key_pattern = validate_key_pattern(changes.pop("key_pattern"))
    changes = {k: v for k, v in changes.items() if v is not None}
    unknown = set(changes) - set(OPTION_NAMES)
    if unknown:
        raise InvalidInput(f"unknown cluster option(s): {', '.join(sorted(unknown))}")
    cluster.options = json.dumps({**json.loads(cluster.options or "{}"), **changes}, sort_keys=True)
    session.flush()
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
