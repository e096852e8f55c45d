"""Row MACs in tests: re-MAC rows as they stand, as an operator's keyvault command would.

Some tests change a configuration row by SQL as a stand-in for a legitimate change made
through keyvault (an expiry that passed, a host that died); such a row now fails its MAC
check (``keyvault.services.integrity``) unless it is re-MACed with the keyring, which is
what ``reseal_all`` does. Tests of tampering do not call it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from keyvault.config import load_settings
from keyvault.db import session_factory, transaction
from keyvault.services import integrity
from keyvault.services.store import open_keyring


def reseal_all(engine: Any, settings: Any = None) -> int:
    """MAC every row of every MAC-carrying table as it stands; return how many.

    ``settings`` default: the environment's (``KEYVAULT_MASTER_KEY_FILE`` of the test's home).
    """
    settings = settings or load_settings()
    count = 0
    with transaction(session_factory(engine)) as session:
        keyring = open_keyring(session, settings=settings)
        for model in integrity.MAC_MODELS:
            for row in session.scalars(select(model)):
                integrity.seal_row(session, row, keyring=keyring)
                count += 1
    return count
