"""Reads a keyvault store in-process for the fault loops (tests/support/faultloop.py).

Every read uses a connection that lives for that read only (``NullPool``), so a terminated
backend or a renamed SQLite file never breaks the checker itself. Keys are compared here
and never returned or shown.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from keyvault import crypto


class _Store(Protocol):
    url: str
    home: Path


class StoreReader:
    """Reads the store in-process, through a connection that lives for one read only
    (so a terminated backend or a renamed file never breaks the checker itself)."""

    def __init__(self, store: _Store) -> None:
        self.store = store

    @contextlib.contextmanager
    def session(self) -> Iterator:
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session
        from sqlalchemy.pool import NullPool

        from keyvault.db import normalize_url

        engine = create_engine(normalize_url(self.store.url), poolclass=NullPool)
        try:
            with Session(engine) as s:
                yield s
        finally:
            engine.dispose()

    def versions(self, cluster: str, scope: str) -> list[tuple[int, str, str]]:
        """(number, fingerprint, state) of every version of ``scope``, oldest first."""
        from sqlalchemy import select

        from keyvault.models import Cluster, Secret, SecretVersion

        with self.session() as s:
            rows = s.execute(
                select(SecretVersion.number, SecretVersion.fingerprint, SecretVersion.state)
                .join(Secret, SecretVersion.secret_id == Secret.id)
                .join(Cluster, Secret.cluster_id == Cluster.id)
                .where(Cluster.name == cluster, Secret.scope == scope)
                .order_by(SecretVersion.number)
            )
            return [tuple(r) for r in rows]

    def current_is(self, cluster: str, scope: str, key: str | None) -> bool:
        """The current version decrypts to ``key`` (compared here, never shown)."""
        from sqlalchemy import select

        from keyvault.models import Cluster, Secret, SecretVersion
        from keyvault.services.secrets import reveal

        keyring = crypto.load_keyring(self.store.home / "master.key")
        with self.session() as s:
            version = s.scalar(
                select(SecretVersion)
                .join(Secret, SecretVersion.secret_id == Secret.id)
                .join(Cluster, Secret.cluster_id == Cluster.id)
                .where(Cluster.name == cluster, Secret.scope == scope)
                .where(SecretVersion.state == "current")
            )
            return version is not None and key is not None and reveal(keyring, version) == key

    def rotations(self) -> dict[str, tuple[str, str, bool]]:
        """Every rotation: id -> (scope, state, cleaned_up)."""
        from sqlalchemy import select

        from keyvault.models import Rotation

        with self.session() as s:
            rows = s.execute(
                select(Rotation.id, Rotation.scope, Rotation.state, Rotation.cleaned_up)
            )
            return {rid: (scope, state, bool(cleaned)) for rid, scope, state, cleaned in rows}
