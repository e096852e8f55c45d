"""An emulated TA cluster: the ta-tool emulator (``keyvault.sandbox``) as a cluster's
generate commands, reached through an injected transport.

    ta = install_ta_tool(tmp_path / "ta-c", ["app1", "app2"])   # state dir + ta-tool wrapper
    with transaction(factory) as s:
        add_emulated_cluster(s, "c", ta, host="ta-a")            # cluster c, one host
    connector = local_connector(tmp_path / "ta-home")           # runs "ssh" commands here
    RotationService(factory, settings=settings, connector=connector).rotate(...)
    state.current_key(ta.state_dir, "app:app1")                 # the key TA now accepts

The local transport runs the commands on this machine as this user, with ``HOME`` at
``ta_home`` (where the pending files of a rotation go); through the real sshd, the same
emulator runs as ``ta`` (``install_ta_tool(..., owner="ta", pythonpath=None)``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from keyvault.sandbox import state
from keyvault.services import clusters, hosts
from keyvault.ssh.local import LocalConnector

ROOT = Path(__file__).resolve().parents[2]  # the checkout whose keyvault ta-tool imports
NO_OPEN_API = "http://127.0.0.1:9"  # nothing listens there: these tests never call TA
PINNED = "SHA256:" + "A" * 43  # a pinned host key; the local transport never checks one


@dataclass(frozen=True)
class TaTool:
    """An emulator state dir and the ``ta-tool`` wrapper that generates keys in it."""

    state_dir: Path
    tool: Path

    def generate_options(self) -> dict[str, str]:
        """A cluster's generate commands that run this ta-tool."""
        return {
            "generate_root_command": f"{self.tool} generate_root_secret",
            "generate_app_command": f"{self.tool} generate_api_secret -appid {{appid}}",
        }


def install_ta_tool(
    base: Path,
    apps: Iterable[str] = (),
    *,
    python: str = sys.executable,
    pythonpath: str | None = str(ROOT),
    owner: str | None = None,
) -> TaTool:
    """A fresh emulator state (``base/state``, knowing ``apps``) and its wrapper
    (``base/bin/ta-tool``)."""
    ta = TaTool(state_dir=base / "state", tool=base / "bin" / "ta-tool")
    state.init_state(ta.state_dir, list(apps), owner=owner)
    state.install_wrapper(ta.tool, ta.state_dir, python=python, pythonpath=pythonpath)
    return ta


def add_emulated_cluster(
    session: Session, name: str, ta: TaTool, *, host: str, exists: bool = False
) -> None:
    """Cluster ``name`` (added, or an existing one) generating keys with ``ta``, and one host
    ``host`` (user ta, no become) for the local transport; rows MACed with the keyring of the
    environment's settings (the test's home)."""
    from keyvault.config import load_settings
    from keyvault.services.store import open_keyring

    keyring = open_keyring(session, settings=load_settings())
    if exists:
        clusters.set_options(session, keyring=keyring, name=name, **ta.generate_options())
    else:
        clusters.add_cluster(
            session,
            keyring=keyring,
            name=name,
            open_api_url=NO_OPEN_API,
            options=ta.generate_options(),
        )
    hosts.add_host(
        session,
        keyring=keyring,
        cluster_name=name,
        address=host,
        username="ta",
        become="none",
        fingerprint=PINNED,
    )


def local_connector(ta_home: Path) -> LocalConnector:
    """The local transport, with ``ta_home`` (made here) as the remote user's HOME."""
    ta_home.mkdir(parents=True, exist_ok=True)
    return LocalConnector({"HOME": str(ta_home), "PATH": "/usr/bin:/bin"})
