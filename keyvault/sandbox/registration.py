"""The running TA simulator in keyvault's store: cluster ``sandbox`` and its host.

``register`` adds or updates the cluster (Open API URL, login name, APPID -> project id)
and its one host (127.0.0.1, the SSH front's port and pinned host key); the session is
flushed, not committed (the command owns the transaction).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session

from keyvault.crypto import Keyring
from keyvault.errors import Conflict, NotFound
from keyvault.models import Cluster, Host
from keyvault.sandbox import state as st
from keyvault.sandbox.run import LOGIN_NAME, LOOPBACK, SSH_USER, TA_USER, SandboxPaths
from keyvault.services import clusters, hosts, integrity


def _project_ids(paths: SandboxPaths) -> dict[str, int]:
    state = st.read_state(paths.state_dir)
    return {appid: a["project_id"] for appid, a in state["apps"].items()}


def _upsert_cluster(
    session: Session, keyring: Keyring, name: str, url: str, project_ids: dict[str, int]
) -> Cluster:
    try:
        cluster = clusters.get_cluster(session, name=name)
    except NotFound:
        return clusters.add_cluster(
            session,
            keyring=keyring,
            name=name,
            open_api_url=url,
            options={"login_name": LOGIN_NAME, "project_ids": project_ids},
        )
    if urlsplit(cluster.open_api_url).hostname != LOOPBACK:
        raise Conflict(
            f"cluster {name!r} exists and is not a sandbox (its Open API is {cluster.open_api_url})",
            hint="rename that cluster; the sandbox registers itself as 'sandbox'",
        )
    clusters.set_options(
        session,
        keyring=keyring,
        name=name,
        open_api_url=url,
        login_name=LOGIN_NAME,
        project_ids=project_ids,
    )
    return cluster


def _upsert_host(
    session: Session, keyring: Keyring, cluster_name: str, port: int, fields: dict[str, Any]
) -> Host:
    existing = [
        h for h in hosts.list_hosts(session, cluster_name=cluster_name) if h.address == LOOPBACK
    ]
    if not existing:
        return hosts.add_host(
            session,
            keyring=keyring,
            cluster_name=cluster_name,
            address=LOOPBACK,
            port=port,
            **fields,
        )
    host = next((h for h in existing if h.port == port), existing[0])
    hosts.validate_host_fields(
        address=LOOPBACK,
        port=port,
        username=fields["username"],
        become=fields["become"],
        ta_user=fields["ta_user"],
        fingerprint=fields["fingerprint"],
    )
    host.port = port
    host.username = fields["username"]
    host.identity_file = fields["identity_file"]
    host.become = fields["become"]
    host.ta_user = fields["ta_user"]
    host.host_key_fingerprint = fields["fingerprint"]
    integrity.seal_row(session, host, keyring=keyring)
    return host


def register(
    session: Session,
    *,
    keyring: Keyring,
    info: dict[str, Any],
    paths: SandboxPaths,
    cluster_name: str = "sandbox",
) -> tuple[Cluster, Host]:
    """Add or update cluster ``cluster_name`` and its host 127.0.0.1 for the running sandbox."""
    url = f"http://{LOOPBACK}:{int(info['api_port'])}"
    cluster = _upsert_cluster(session, keyring, cluster_name, url, _project_ids(paths))
    fields = {
        "username": SSH_USER,
        "identity_file": str(paths.client_key),
        "become": "su",
        "ta_user": TA_USER,
        "fingerprint": info["host_key_fingerprint"],
    }
    host = _upsert_host(session, keyring, cluster_name, int(info["ssh_port"]), fields)
    session.flush()
    return cluster, host


def sync_project_ids(
    session: Session, *, keyring: Keyring, paths: SandboxPaths, cluster_name: str = "sandbox"
) -> bool:
    """Copy the emulator's APPID -> projectId map into the cluster; False if no such cluster."""
    try:
        clusters.get_cluster(session, name=cluster_name)
    except NotFound:
        return False
    clusters.set_options(
        session, keyring=keyring, name=cluster_name, project_ids=_project_ids(paths)
    )
    return True
