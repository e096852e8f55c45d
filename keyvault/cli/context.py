"""Per-invocation state for CLI commands: settings, engine, transactions, keyring."""

from __future__ import annotations

from contextlib import contextmanager
from functools import cached_property


class AppContext:
    """Built once per command; everything heavy is created on first use."""

    def __init__(self, env=None) -> None:
        self._env = env

    @cached_property
    def settings(self):
        from keyvault.config import load_settings

        return load_settings(self._env)

    @cached_property
    def engine(self):
        from keyvault.db import make_engine

        return make_engine(self.settings.database_url)

    @cached_property
    def factory(self):
        from keyvault.db import require_head, session_factory

        require_head(self.engine)
        return session_factory(self.engine)

    @contextmanager
    def transaction(self):
        """A session whose transaction commits when the block succeeds."""
        from keyvault.db import transaction

        with transaction(self.factory) as session:
            yield session

    def keyring(self, session):
        """The master keyring, proven to open this store."""
        from keyvault.services.store import open_keyring

        return open_keyring(session, settings=self.settings)
