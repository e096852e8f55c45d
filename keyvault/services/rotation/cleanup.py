"""Step 6 (CLEAN) policies: when the remote pending files of stored keys are deleted.

Whatever the policy, a pending file is deleted only after its key is committed; a
rotation whose clean-up did not happen stays ``stored`` and `rotations recover` retries.
"""

from __future__ import annotations

import logging
import threading
from enum import Enum

from keyvault.errors import KeyvaultError
from keyvault.models import Host
from keyvault.services.rotation.journal import Journal
from keyvault.services.rotation.pool import ConnectionPool, run_as_ta
from keyvault.tahost import cleaned_ids, cleanup_many_script

log = logging.getLogger("keyvault.rotation")
# Rotations cleaned up by one command at the end of a bulk run (~120 bytes each).
CLEANUP_CHUNK = 300


class CleanupPolicy(Enum):
    """When step 6 runs."""

    # Right after each key is stored, one command per rotation (single rotations).
    IMMEDIATE = "immediate"
    # Once at the end of the run, one command per host for all its rotations.
    DEFERRED = "deferred"
    # By the batch's own session: keyvault sends each id on stdin once its key is committed.
    # Needs stdin, so a batch that types a su password at a PTY falls back to DEFERRED.
    INLINE = "inline"

    def for_batch(self, su_password: str | None) -> CleanupPolicy:
        """The policy one batch can follow (INLINE is impossible when stdin is su's PTY)."""
        if self is CleanupPolicy.INLINE and su_password is not None:
            return CleanupPolicy.DEFERRED
        return self


class DeferredCleanups:
    """The clean-ups left to the end of a run, by host; thread-safe."""

    def __init__(self) -> None:
        self._by_host: dict[int, tuple[Host, list[str]]] = {}
        self._lock = threading.Lock()

    def add(self, host: Host, rids: list[str]) -> None:
        if rids:
            with self._lock:
                self._by_host.setdefault(host.id, (host, []))[1].extend(rids)

    def flush(self, pool: ConnectionPool, journal: Journal) -> set[str]:
        """Run the clean-ups, one command per host and chunk; returns the ids cleaned."""
        with self._lock:
            by_host, self._by_host = self._by_host, {}
        cleaned: set[str] = set()
        for host, rids in by_host.values():
            for start in range(0, len(rids), CLEANUP_CHUNK):
                cleaned |= self._clean_chunk(
                    pool, journal, host, rids[start : start + CLEANUP_CHUNK]
                )
        return cleaned

    @staticmethod
    def _clean_chunk(
        pool: ConnectionPool, journal: Journal, host: Host, chunk: list[str]
    ) -> set[str]:
        try:
            conn, _ = pool.connect_any([host])
        except KeyvaultError as exc:
            log.warning("clean-up on %s skipped: %s", host.label, exc)
            return set()
        ran = run_as_ta(conn, host, cleanup_many_script(chunk), pool.settings)
        gone = cleaned_ids(ran.output, chunk) if ran else set()
        done = [rid for rid in chunk if rid in gone]
        journal.record_cleaned(done)
        return set(done)
