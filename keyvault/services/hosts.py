"""SSH hosts of a cluster: add, list, remove, trust (pin the host key), check.

Address, port, users, become method, identity file and pinned host key are under the
row's MAC (``services.integrity``): ``checked_hosts`` is how a rotation gets hosts it may
connect to.
"""

from __future__ import annotations

import re

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.orm import Session

from keyvault import crypto
from keyvault.config import Settings
from keyvault.errors import Conflict, InvalidInput, NotFound
from keyvault.models import UNRESOLVED_ROTATION_STATES, Host, Rotation, utcnow
from keyvault.services import integrity
from keyvault.services.clusters import cluster_options, get_cluster
from keyvault.ssh import Connection, Connector, SshTarget
from keyvault.tahost import Become, check_script, raise_for_become

FINGERPRINT = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
USER = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.I)
ADDRESS = re.compile(r"^[A-Za-z0-9.:_-]{1,253}$")


def validate_host_fields(
    *, address: str, port: int, username: str, become: str, ta_user: str, fingerprint: str | None
) -> None:
    """Refuse malformed host settings before anything is written."""
    if not ADDRESS.match(address) or address.startswith("-"):
        raise InvalidInput(
            f"invalid host address {address!r}", hint="give a host name or IP address"
        )
    if not 1 <= port <= 65535:
        raise InvalidInput(f"invalid port {port}", hint="use 1-65535")
    for what, name in (("SSH user", username), ("ta user", ta_user)):
        if not USER.match(name):
            raise InvalidInput(f"invalid {what} {name!r}")
    if become not in ("su", "sudo", "none"):
        raise InvalidInput(f"invalid become method {become!r}", hint="use su, sudo or none")
    if fingerprint is not None and not FINGERPRINT.match(fingerprint):
        raise InvalidInput(
            f"invalid fingerprint {fingerprint!r}",
            hint="use OpenSSH's SHA256:... form, as printed by `ssh-keygen -lf KEY.pub`",
        )


def add_host(
    session: Session,
    *,
    keyring: crypto.Keyring,
    cluster_name: str,
    address: str,
    port: int = 22,
    username: str = "root",
    identity_file: str | None = None,
    become: str = "su",
    ta_user: str = "ta",
    fingerprint: str | None = None,
) -> Host:
    """Add a host to a cluster (tried in the order added)."""
    cluster = get_cluster(session, name=cluster_name)
    validate_host_fields(
        address=address,
        port=port,
        username=username,
        become=become,
        ta_user=ta_user,
        fingerprint=fingerprint,
    )
    position = (
        session.scalar(select(func.max(Host.position)).where(Host.cluster_id == cluster.id)) or 0
    ) + 1
    host = Host(
        cluster_id=cluster.id,
        address=address,
        port=port,
        username=username,
        identity_file=identity_file,
        become=become,
        ta_user=ta_user,
        host_key_fingerprint=fingerprint,
        position=position,
        created_at=utcnow(),
    )
    try:
        with session.begin_nested():
            session.add(host)
    except SAIntegrityError:
        raise Conflict(f"host {address}:{port} is already in cluster {cluster_name}") from None
    integrity.seal_row(session, host, keyring=keyring)
    return host


def list_hosts(session: Session, *, cluster_name: str | None = None) -> list[Host]:
    """Hosts, in the order they are tried."""
    stmt = select(Host).order_by(Host.cluster_id, Host.position)
    if cluster_name is not None:
        stmt = stmt.where(Host.cluster_id == get_cluster(session, name=cluster_name).id)
    return list(session.scalars(stmt))


def host_info(host: Host) -> dict[str, object]:
    """A JSON-ready description of a host (the shape of `host list` and `host add --json`)."""
    return {
        "cluster": host.cluster.name,
        "address": host.address,
        "port": host.port,
        "user": host.username,
        "become": host.become,
        "ta_user": host.ta_user,
        "identity": host.identity_file,
        "fingerprint": host.host_key_fingerprint or "(untrusted)",
    }


def checked_hosts(session: Session, *, cluster_name: str, keyring: crypto.Keyring) -> list[Host]:
    """``list_hosts`` of a cluster, refused (``IntegrityError`` naming the first failing
    host) unless every host's row MAC verifies: nothing connects to a moved host."""
    hosts = list_hosts(session, cluster_name=cluster_name)
    for host in hosts:
        integrity.check_row(host, keyring=keyring)
    return hosts


def hosts_to_check(session: Session, *, cluster_name: str, address: str | None) -> list[Host]:
    """The hosts of a cluster (with ``address``: that host only), or ``NotFound``."""
    hosts = [
        h for h in list_hosts(session, cluster_name=cluster_name) if address in (None, h.address)
    ]
    if not hosts:
        raise NotFound(
            f"no host {address + ' ' if address else ''}in cluster {cluster_name}",
            hint=f"add one with `keyvault host add {cluster_name} ADDRESS`",
        )
    return hosts


def get_host(session: Session, *, cluster_name: str, address: str, port: int | None = None) -> Host:
    """One host of a cluster by address (and port when ambiguous)."""
    hosts = [
        h
        for h in list_hosts(session, cluster_name=cluster_name)
        if h.address == address and (port is None or h.port == port)
    ]
    if not hosts:
        raise NotFound(
            f"no host {address} in cluster {cluster_name}", hint="see `keyvault host list`"
        )
    if len(hosts) > 1:
        raise InvalidInput(f"several hosts {address} in cluster {cluster_name}", hint="give --port")
    return hosts[0]


def remove_host(
    session: Session, *, cluster_name: str, address: str, port: int | None = None
) -> None:
    """Remove a host unless an unresolved rotation still needs it."""
    host = get_host(session, cluster_name=cluster_name, address=address, port=port)
    pending = session.scalar(
        select(Rotation).where(
            Rotation.host_id == host.id, Rotation.state.in_(UNRESOLVED_ROTATION_STATES)
        )
    )
    if pending is not None:
        raise Conflict(
            f"rotation {pending.id} on {host.label} is unresolved",
            hint=f"run `keyvault rotations recover {pending.id}` first",
        )
    for rotation in session.scalars(select(Rotation).where(Rotation.host_id == host.id)):
        rotation.host_id = None
    session.delete(host)
    session.flush()


def pin_host_key(
    session: Session, *, keyring: crypto.Keyring, host: Host, fingerprint: str
) -> None:
    """Pin the host key fingerprint that the operator confirmed (re-MACs the row as it
    then stands)."""
    if not FINGERPRINT.match(fingerprint):
        raise InvalidInput(f"invalid fingerprint {fingerprint!r}")
    host.host_key_fingerprint = fingerprint
    integrity.seal_row(session, host, keyring=keyring)


def ssh_target(host: Host, settings: Settings) -> SshTarget:
    """How to connect to ``host``."""
    return SshTarget(
        address=host.address,
        port=host.port,
        username=host.username,
        identity_file=host.identity_file,
        pinned_fingerprint=host.host_key_fingerprint,
        cluster=host.cluster.name,
    )


def become_for(host: Host) -> Become:
    """How to become ta on ``host``."""
    return Become(method=host.become, ta_user=host.ta_user, ssh_user=host.username)


def su_password_for(become: Become, settings: Settings) -> str | None:
    """The su password when one is needed; refuse early if it is missing."""
    if not become.needs_password:
        return None
    if settings.su_password is None:
        raise InvalidInput(
            f"su to {become.ta_user} as {become.ssh_user} needs a password",
            hint="set KEYVAULT_SU_PASSWORD or KEYVAULT_SU_PASSWORD_FILE (never on the command line)",
        )
    return settings.su_password


def check_host(
    session: Session,
    *,
    host: Host,
    settings: Settings,
    connector: Connector,
    keyring: crypto.Keyring,
) -> str:
    """Connect, become ta and confirm ta-tool is on its PATH; generate nothing. The host
    and its cluster must pass their MAC check first (a su password goes there)."""
    integrity.check_row(host.cluster, keyring=keyring)
    integrity.check_row(host, keyring=keyring)
    become = become_for(host)
    password = su_password_for(become, settings)
    command = cluster_options(host.cluster)["generate_root_command"]
    conn: Connection = connector.connect(ssh_target(host, settings))
    try:
        result = conn.run(
            become.wrap(check_script(command)),
            password=password,
            timeout=settings.ssh_connect_timeout + 30,
        )
    finally:
        conn.close()
    text = result.output.decode("utf-8", "replace")
    found = re.search(r"@@KV:check:OK:([^:@]*):([^@]*)@@", text)
    if result.exit_status == 0 and found:
        return f"{host.label}: became {found.group(1)}, ta-tool at {found.group(2)}"
    raise_for_become(text, host.label, become)
    raise AssertionError("unreachable")
