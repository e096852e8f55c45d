"""Atomic file writes: the one helper for every file keyvault replaces.

Defined once in the client distribution (``keyvault_client.fsutil``: ``keyvault agent``
writes key files with it, without the server stack) and re-exported here. Imports only
``os`` and ``contextlib`` (the ta-tool emulator imports it on every call).
"""

from __future__ import annotations

from keyvault_client.fsutil import atomic_write as atomic_write
from keyvault_client.fsutil import atomic_writer as atomic_writer
