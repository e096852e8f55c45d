"""Rotation: generate a new TA key over SSH and never lose it.

ta-tool invalidates the previous key the moment it generates a new one, so the
key it prints is the only valid key of its scope. Unlike the other services, which
only flush, rotation commits its own transactions, in deliberate steps
(docs/rotation.md):

1. CHECK    master key opens the store, scope has no unresolved rotation, a host
            of the cluster is reachable, trusted and authenticated (fail over
            between hosts only here, before anything ran).
2. JOURNAL  commit a ``pending`` rotation row; a partial unique index allows one
            unresolved rotation per scope across processes and machines.
3. GENERATE run ta-tool as ta with its output in a file private to ta named by
            the rotation id; read it back. A drop here leaves ``pending`` /
            ``needs_recovery`` and the key in that file.
4. PARSE    exactly one candidate key, or ``needs_recovery`` with masked output.
5. STORE    one transaction: new current version, old one invalidated, event,
            rotation ``stored``. If it fails, the key goes to the local spool.
6. CLEAN    delete the remote file (leaving a key-less tombstone), only now.
7. VERIFY   call the TA Open API with the new key; record the outcome. A failed
            check raises an event; it never discards the key.

The modules: ``batch`` (steps 1-3 for a batch, a run object), ``verdict`` (step 4,
pure), ``steps`` (steps 4-7 shared with ``recovery``), ``journal`` (the one writer
of the rotation row, checking ``keyvault.rotation_states``), ``cleanup`` (the step 6
policies), ``pool`` (one SSH connection per host), ``results`` (typed results).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from types import TracebackType
from typing import Any

from keyvault.config import Settings
from keyvault.scope import Scope
from keyvault.services.rotation.batch import BatchRun, OnDone, new_rotation_id
from keyvault.services.rotation.cleanup import CleanupPolicy, DeferredCleanups
from keyvault.services.rotation.journal import Fence, Journal, Precondition, SessionFactory
from keyvault.services.rotation.pool import ConnectionPool
from keyvault.services.rotation.recovery import SETTLE_AFTER, Recovery
from keyvault.services.rotation.results import Failure, ResultStatus, RotationResult
from keyvault.services.rotation.steps import Runtime, StepHook
from keyvault.ssh import Connector

__all__ = [
    "SETTLE_AFTER",
    "CleanupPolicy",
    "Failure",
    "Precondition",
    "ResultStatus",
    "RotationResult",
    "RotationService",
    "new_rotation_id",
]


class RotationService:
    """Runs rotations and recoveries; owns its transactions (see the module doc).

    Keeps one SSH connection per host for its lifetime: use it as a context manager
    (or call :meth:`close`).
    """

    def __init__(
        self,
        factory: SessionFactory,
        *,
        settings: Settings,
        connector: Connector,
        ta_client_factory: Callable[..., Any] | None = None,
        on_step: StepHook | None = None,
    ) -> None:
        self.settings = settings
        self.journal = Journal(factory)
        self.pool = ConnectionPool(connector, settings)
        self.ta_client_factory = ta_client_factory
        # Injected by crash tests: called as on_step(step, rotation_id).
        self.on_step: StepHook = on_step or (lambda step, rid: None)

    def close(self) -> None:
        """Close the SSH connections kept for reuse."""
        self.pool.close()

    def __enter__(self) -> RotationService:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _runtime(self) -> Runtime:
        return Runtime(self.settings, self.journal, self.pool, self.ta_client_factory, self.on_step)

    def rotate(
        self,
        cluster_name: str,
        scope: Scope,
        *,
        actor: str,
        precondition: Precondition | None = None,
    ) -> RotationResult:
        """Generate, capture and store a new key for one scope; raises its error if it failed.

        ``precondition(current_version)`` (HTTP If-Match) runs once the rotation holds the
        scope (its journal row), so two callers expecting the same version rotate once.
        """
        run = BatchRun(
            self._runtime(),
            cluster_name,
            [scope],
            actor=actor,
            cleanup=CleanupPolicy.IMMEDIATE,
            deferred=DeferredCleanups(),
            precondition=precondition,
        )
        (result,) = run.run()
        if result.failure is not None and result.failure.exception is not None:
            raise result.failure.exception
        return result

    def rotate_many(
        self,
        cluster_name: str,
        scopes: list[Scope],
        *,
        actor: str,
        concurrency: int = 4,
        on_done: OnDone | None = None,
        cleanup: CleanupPolicy = CleanupPolicy.INLINE,
        should_start: Callable[[], bool] | None = None,
        fence: Fence | None = None,
    ) -> list[RotationResult]:
        """Rotate several scopes, ``concurrency`` batches at a time over one connection per host.

        Each scope is a full rotation with its own journal row, pending file and crash
        safety; a batch only shares the SSH channel and ``su`` session that run their
        ta-tool calls one after the other (``rotation.batch_size`` of them), and each key
        is stored as soon as its output arrives. One scope's failure never stops or
        corrupts the others. ``on_done(result)`` is called as each one ends. Returns a
        result per scope, in the order given. ``should_start`` (the scheduler's lease) is
        asked before each batch journals its rotations: False fails the batch with
        ``LeaseLost`` before anything is started; ``fence(session)`` (the same lease) is
        asked again in each journal row's own transaction (``Journal.create_pending``).
        """
        if not scopes:
            return []
        concurrency = max(1, concurrency)
        # Small runs still use every channel: 8 scopes at concurrency 4 make 4 batches of 2.
        size = max(1, min(self.settings.rotation_batch_size, -(-len(scopes) // concurrency)))
        batches = [scopes[i : i + size] for i in range(0, len(scopes), size)]
        rt, deferred = self._runtime(), DeferredCleanups()

        def one_batch(batch: list[Scope]) -> list[RotationResult]:
            run = BatchRun(
                rt,
                cluster_name,
                batch,
                actor=actor,
                cleanup=cleanup,
                deferred=deferred,
                on_done=on_done,
                should_start=should_start,
                fence=fence,
            )
            try:
                return run.run()
            except Exception as exc:  # noqa: BLE001 - what was reported stands; the rest go to recover
                return run.settle_rest(exc)

        try:
            with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="kv-rotate") as ex:
                results = [r for batch_results in ex.map(one_batch, batches) for r in batch_results]
        finally:
            cleaned = deferred.flush(self.pool, self.journal)
        return [r.cleaned() if r.rotation_id in cleaned else r for r in results]

    def recover(self, rid: str, *, actor: str) -> RotationResult:
        """Complete an interrupted rotation from the local spool or the remote pending file."""
        return Recovery(self._runtime()).recover(rid, actor=actor)

    def settle_stored(
        self, *, actor: str, stored_before: datetime, cluster_name: str | None = None
    ) -> list[RotationResult]:
        """Finish stored rotations a dead process left (see ``Recovery.settle_stored``)."""
        return Recovery(self._runtime()).settle_stored(
            actor=actor, stored_before=stored_before, cluster_name=cluster_name
        )

    def recover_all(self, *, actor: str, cluster_name: str | None = None) -> list[RotationResult]:
        """Recover every unresolved rotation and every stored one not cleaned up, oldest first."""
        return Recovery(self._runtime()).recover_all(actor=actor, cluster_name=cluster_name)

    def abandon(self, rid: str, *, reason: str) -> None:
        """Give up an unresolved rotation (refused while a key for it is known to exist)."""
        Recovery(self._runtime()).abandon(rid, reason=reason)
