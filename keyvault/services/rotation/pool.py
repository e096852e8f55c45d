"""One SSH connection per host, shared by the threads of a run (paramiko multiplexes
channels over it), and the one way a script is run as the ta user."""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from keyvault.config import Settings
from keyvault.errors import AuthenticationFailed, HostKeyError, HostUnreachable, KeyvaultError
from keyvault.models import Host
from keyvault.services.hosts import become_for, ssh_target, su_password_for
from keyvault.ssh import Connection, Connector, ExecResult

log = logging.getLogger("keyvault.rotation")


def _alive(conn: Connection) -> bool:
    is_active = getattr(conn, "is_active", None)
    return True if is_active is None else bool(is_active())


class ConnectionPool:
    """Connections kept for reuse, one per host; closed when the pool is."""

    def __init__(self, connector: Connector, settings: Settings) -> None:
        self.connector = connector
        self.settings = settings
        self._connections: dict[int, Connection] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> ConnectionPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every kept connection."""
        with self._lock:
            while self._connections:
                self._connections.popitem()[1].close()

    def connect_any(self, hosts: list[Host]) -> tuple[Connection, Host]:
        """A live connection to the first host that can be used, in the given order.

        Fails over to the next host only on errors raised before anything ran on a host
        (unreachable, host key, authentication).
        """
        with self._lock:  # one connection per host, even with many threads
            for host in hosts:
                cached = self._connections.get(host.id)
                if cached is not None and _alive(cached):
                    return cached, host
            errors: list[KeyvaultError] = []
            for host in hosts:
                try:
                    conn = self.connector.connect(ssh_target(host, self.settings))
                except (HostUnreachable, AuthenticationFailed, HostKeyError) as exc:
                    log.warning("host %s: %s", host.label, exc)
                    errors.append(exc)
                    continue
                self._connections[host.id] = conn
                return conn, host
        if len(errors) == 1:
            raise errors[0]
        raise HostUnreachable(
            "no host of the cluster could be used: " + "; ".join(str(e) for e in errors)
        )

    def release(self, host: Host, conn: Connection, healthy: bool) -> None:
        """Drop ``conn`` from the pool if its last command left it dead."""
        if healthy or _alive(conn):
            return
        with self._lock:
            if self._connections.get(host.id) is conn:
                del self._connections[host.id]
        conn.close()


def run_as_ta(conn: Connection, host: Host, script: str, settings: Settings) -> ExecResult | None:
    """Run a short script (fetch, clean-up) as ta on ``host``; None if it could not run."""
    become = become_for(host)
    try:
        return conn.run(
            become.wrap(script),
            password=su_password_for(become, settings),
            timeout=settings.ssh_connect_timeout + 30,
        )
    except KeyvaultError as exc:
        log.warning("on %s: %s", host.label, exc)
        return None
