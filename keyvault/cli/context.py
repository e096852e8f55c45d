"""Per-invocation state for CLI commands: settings, engine, transactions, keyring."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from keyvault.config import Settings
    from keyvault.crypto import Keyring
    from keyvault.services.rotation import RotationService
    from keyvault.ssh.paramiko_transport import ParamikoConnector


class AppContext:
    """Built once per command; everything heavy is created on first use."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = env

    @cached_property
    def settings(self) -> Settings:
        from keyvault.config import load_settings

        return load_settings(self._env)

    @cached_property
    def engine(self) -> Engine:
        from keyvault.db import make_engine

        return make_engine(self.settings.database_url)

    @cached_property
    def factory(self) -> sessionmaker[Session]:
        from keyvault.db import require_head, session_factory

        require_head(self.engine)
        return session_factory(self.engine)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose transaction commits when the block succeeds."""
        from keyvault.db import transaction

        with transaction(self.factory) as session:
            yield session

    def close(self) -> None:
        """Dispose of the engine, if one was made, so no pooled connection outlives the command."""
        engine = self.__dict__.pop("engine", None)
        if engine is not None:
            engine.dispose()

    def keyring_check(self) -> Keyring:
        """Prove the master key opens the store (before starting long-running work)."""
        with self.transaction() as session:
            return self.keyring(session)

    def keyring(self, session: Session) -> Keyring:
        """The master keyring, proven to open this store."""
        from keyvault.services.store import open_keyring

        return open_keyring(session, settings=self.settings)

    @cached_property
    def connector(self) -> ParamikoConnector:
        """The real SSH transport, configured from the settings."""
        from keyvault.ssh.paramiko_transport import connector_from_settings

        return connector_from_settings(self.settings)

    def rotation_service(self) -> RotationService:
        """The rotation service wired to this invocation's database and transport."""
        from keyvault.services.rotation import RotationService

        return RotationService(self.factory, settings=self.settings, connector=self.connector)
