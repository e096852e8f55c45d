"""One batch: the rotations whose ta-tool calls share one SSH channel and ``su`` session.

Each rotation of a batch keeps its own journal row, pending file and crash safety
(steps 1-7, see the package doc); the batch only shares the channel, and each key is
stored as soon as its report arrives, while the next ta-tool runs.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from keyvault import crypto
from keyvault.db import transaction
from keyvault.errors import KeyvaultError, LeaseLost, NotFound
from keyvault.models import Cluster, Host, Rotation
from keyvault.scope import Scope
from keyvault.services.clusters import checked_cluster, cluster_options
from keyvault.services.hosts import become_for, checked_hosts, su_password_for
from keyvault.services.rotation.cleanup import CleanupPolicy, DeferredCleanups
from keyvault.services.rotation.journal import (
    Fence,
    Precondition,
    unresolved_error,
    unresolved_of,
)
from keyvault.services.rotation.results import Failure, RotationResult
from keyvault.services.rotation.steps import (
    NewKey,
    Runtime,
    cleanup_now,
    key_or_raise,
    store_or_spool,
    verify_and_record,
)
from keyvault.services.rotation.verdict import read_verdict
from keyvault.services.store import open_keyring
from keyvault.services.verify import unverifiable
from keyvault.ssh import Connection, ExecResult, StdinReply
from keyvault.tahost import (
    cleaned_ids,
    cleanup_marker,
    find_marker,
    generate_many_script,
    parse_remote,
    render_command,
    report_end,
)

log = logging.getLogger("keyvault.rotation")
OnDone = Callable[[RotationResult], None]


def new_rotation_id() -> str:
    """A random rotation id, safe in file names and shell words."""
    return secrets.token_hex(6)


@dataclass(frozen=True)
class Job:
    """One rotation of a batch: its place in the batch, scope, id and ta-tool command."""

    index: int
    scope: Scope
    rid: str
    command: str


@dataclass(frozen=True)
class _Plan:
    """What step 1 found: a ta-tool command, or why not, per scope; hosts to try."""

    keyring: crypto.Keyring = field(repr=False)
    cluster: Cluster
    hosts: list[Host]
    commands: list[str | KeyvaultError]


@dataclass(frozen=True)
class _Target:
    """Where the batch's jobs run."""

    plan: _Plan
    host: Host
    conn: Connection


class ReportStream:
    """Splits a batch's output into each rotation's report as soon as it is complete.

    The jobs run one after the other, so the next report to end is the first pending
    job's; it ends with its RC marker, or EXISTS/NOTATOOL/NODIR when ta-tool never ran.
    A job leaves the stream only when taken with :meth:`next_ready` (or :meth:`rest`), so
    one whose handling fails is never skipped silently.
    """

    def __init__(self, jobs: list[Job], cleanup_marker: str | None = None) -> None:
        self._pending = list(jobs)
        self._buffer = bytearray()
        self._start = 0  # where the first pending job's report begins
        self._cleanup_marker = cleanup_marker

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    @property
    def waiting_for_ids(self) -> bool:
        """The batch printed its CLEANUP marker: every ta-tool run is over."""
        return (
            self._cleanup_marker is not None
            and find_marker(self._buffer, self._cleanup_marker, self._start) != -1
        )

    def feed(self, chunk: bytes) -> None:
        """Add output as it arrives."""
        self._buffer += chunk

    def next_ready(self) -> tuple[Job, bytes] | None:
        """The next job whose report is complete, with its report; None if there is none yet."""
        if not self._pending:
            return None
        end = report_end(self._pending[0].rid, self._buffer, self._start)
        if end is None:
            return None
        report, self._start = bytes(self._buffer[self._start : end]), end
        return self._pending.pop(0), report

    def rest(self) -> list[tuple[Job, bytes]]:
        """Jobs whose report never ended, each with everything after the last complete one."""
        tail = bytes(self._buffer[self._start :])
        rest, self._pending = [(job, tail) for job in self._pending], []
        return rest


class BatchRun:
    """Steps 1-7 for the scopes of one batch; :meth:`run` returns a result per scope.

    A problem of the whole batch (no such cluster, no host reachable, a crash hook) is
    raised by :meth:`run`; the caller decides (``settle_rest``) what the scopes not yet
    reported get. ``on_done`` sees each result as it is settled.
    """

    def __init__(
        self,
        rt: Runtime,
        cluster_name: str,
        scopes: list[Scope],
        *,
        actor: str,
        cleanup: CleanupPolicy,
        deferred: DeferredCleanups,
        on_done: OnDone | None = None,
        precondition: Precondition | None = None,
        should_start: Callable[[], bool] | None = None,
        fence: Fence | None = None,
    ) -> None:
        self.should_start = should_start  # a lease: asked just before step 2
        self.fence = fence  # the same lease, asked again in each journal transaction
        self.rt, self.cluster_name, self.scopes, self.actor = rt, cluster_name, scopes, actor
        self.cleanup, self.deferred, self.on_done = cleanup, deferred, on_done
        self.precondition = precondition  # HTTP If-Match, checked as each row is journaled
        self.results: list[RotationResult | None] = [None] * len(scopes)
        self._to_clean: list[str] = []  # ids whose keys are committed, for INLINE clean-up
        self._sent = 0  # how many of them were written to the batch's stdin

    # -- results ---------------------------------------------------------------------------
    def _settle(self, index: int, result: RotationResult) -> None:
        self.results[index] = result
        if self.on_done is None:
            return
        try:
            self.on_done(result)
        except Exception:  # progress or bookkeeping: it must not stop the other rotations
            log.error("on_done callback failed for %s", result.scope, exc_info=True)

    def collected(self) -> list[RotationResult]:
        """Every scope's result, in order (all are settled once ``run`` returned or
        ``settle_rest`` ran: a scope without one is a bug, and an error here)."""
        missing = [str(self.scopes[i]) for i, r in enumerate(self.results) if r is None]
        if missing:
            raise RuntimeError(f"no result for {', '.join(missing)}")
        return [r for r in self.results if r is not None]

    def settle_rest(self, exc: Exception) -> list[RotationResult]:
        """After ``run`` raised: what was reported stands, the rest failed with ``exc``."""
        failure = Failure.of(exc, str(self.scopes[0]))
        for i, scope in enumerate(self.scopes):
            if self.results[i] is None:
                result = RotationResult(self.cluster_name, str(scope), failure.rotation_id)
                self._settle(i, result.with_(failure=failure))
        return self.collected()

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> list[RotationResult]:
        plan = self._preflight()  # step 1
        for i, command in enumerate(plan.commands):
            if isinstance(command, KeyvaultError):
                self._settle(
                    i, RotationResult.failed(self.cluster_name, str(self.scopes[i]), command)
                )
        if not plan.hosts:  # every scope was refused in step 1 (no other is left)
            return self.collected()
        conn, host = self.rt.pool.connect_any(plan.hosts)
        healthy = False
        try:
            if self.should_start is not None and not self.should_start():
                raise LeaseLost("this runner lost its lease: no rotation started")
            jobs = self._journal(plan, host)  # step 2
            if jobs:
                healthy = self._generate(_Target(plan, host, conn), jobs)  # steps 3-7
        finally:
            self.rt.pool.release(host, conn, healthy)
        return self.collected()

    def _preflight(self) -> _Plan:
        """Step 1 in one transaction; a problem of one scope only is kept in place of its
        command, a problem of all of them is raised."""
        with transaction(self.rt.journal.factory) as s:
            keyring = open_keyring(s, settings=self.rt.settings)
            cluster = checked_cluster(s, name=self.cluster_name, keyring=keyring)
            unresolved = unresolved_of(s, cluster.id, [str(scope) for scope in self.scopes])
            commands = [self._command(cluster, scope, unresolved) for scope in self.scopes]
            if not any(isinstance(command, str) for command in commands):
                return _Plan(keyring, cluster, [], commands)  # no host needed
            hosts = checked_hosts(s, cluster_name=self.cluster_name, keyring=keyring)
            if not hosts:
                raise NotFound(
                    f"cluster {self.cluster_name} has no SSH hosts",
                    hint=f"add one with `keyvault host add {self.cluster_name} ADDRESS`",
                )
            for host in hosts:
                su_password_for(become_for(host), self.rt.settings)
            return _Plan(keyring, cluster, hosts, commands)

    @staticmethod
    def _command(
        cluster: Cluster, scope: Scope, unresolved: dict[str, Rotation]
    ) -> str | KeyvaultError:
        other = unresolved.get(str(scope))
        if other is not None:
            return unresolved_error(other, cluster.name, scope)
        template = cluster_options(cluster)[
            "generate_root_command" if scope.is_root else "generate_app_command"
        ]
        try:
            return render_command(template, scope.appid)
        except KeyvaultError as exc:
            return exc

    def _journal(self, plan: _Plan, host: Host) -> list[Job]:
        """Step 2: a ``pending`` row per runnable scope; the jobs that got one."""
        jobs = [
            Job(i, scope, new_rotation_id(), command)
            for i, (scope, command) in enumerate(zip(self.scopes, plan.commands, strict=True))
            if isinstance(command, str)
        ]
        refused = self.rt.journal.create_pending(
            [(job.rid, job.scope) for job in jobs],
            plan.cluster,
            host,
            self.actor,
            self.precondition,
            keyring=plan.keyring,
            fence=self.fence,
        )
        for job in jobs:
            if job.rid in refused:
                self._settle(
                    job.index,
                    RotationResult.failed(
                        self.cluster_name, str(job.scope), refused[job.rid], host=host.label
                    ),
                )
        jobs = [job for job in jobs if job.rid not in refused]
        for job in jobs:
            self.rt.on_step("journaled", job.rid)
        return jobs

    def _generate(self, target: _Target, jobs: list[Job]) -> bool:
        """Step 3 (steps 4-7 as each report arrives); True if the command ran to its end."""
        become = become_for(target.host)
        password = su_password_for(become, self.rt.settings)
        # Without a PTY, clean up in the same session (ids sent on stdin once committed);
        # with one, stdin is su's: clean-up is deferred.
        self.cleanup = self.cleanup.for_batch(password)
        inline = self.cleanup is CleanupPolicy.INLINE
        stream = ReportStream(jobs, cleanup_marker(jobs[0].rid) if inline else None)
        script = generate_many_script(
            [(job.rid, job.command) for job in jobs], clean_from_stdin=inline
        )
        try:  # one su session for the batch, one pending file per rotation
            # ssh.command_timeout bounds each ta-tool run (the silence between reports);
            # the whole batch gets that much per rotation.
            result = target.conn.run(
                become.wrap(script),
                password=password,
                timeout=self.rt.settings.ssh_command_timeout * len(jobs),
                idle_timeout=self.rt.settings.ssh_command_timeout,
                on_output=lambda chunk: self._on_output(target, stream, chunk),
            )
        except KeyvaultError:
            result = ExecResult(b"", None)
        for job, report in stream.rest():  # reports cut short: what the end of the output says
            self._finish(target, job, report, result.exit_status)
        if inline:
            self._settle_inline_cleanup(target.host, result.output)
        return result.exit_status is not None

    def _on_output(self, target: _Target, stream: ReportStream, chunk: bytes) -> StdinReply | None:
        """Steps 4-7 for each rotation whose report is complete, while the next one runs."""
        stream.feed(chunk)
        while (ready := stream.next_ready()) is not None:
            self._finish(target, *ready, 0)
        if self.cleanup is not CleanupPolicy.INLINE:
            return None
        if stream.waiting_for_ids:  # the script went on: these reports are cut short
            for job, report in stream.rest():
                self._finish(target, job, report, 0)
        new, self._sent = self._to_clean[self._sent :], len(self._to_clean)
        # The transport ignores anything after the close, so answering again is harmless.
        return StdinReply("".join(f"{rid}\n" for rid in new).encode(), close=not stream.pending)

    def _finish(self, target: _Target, job: Job, report: bytes, exit_status: int | None) -> None:
        """Steps 4-7 for one rotation of the batch; settles its result."""
        rt, host, cluster = self.rt, target.host, target.plan.cluster
        rt.on_step("generated", job.rid)
        try:
            verdict = read_verdict(parse_remote(job.rid, report), exit_status, cluster.key_pattern)
            key = key_or_raise(rt, job.rid, verdict, host, cluster.key_pattern)  # step 4
            new = NewKey(job.rid, cluster, job.scope, key, self.actor, host.label)
            # A check that cannot happen (no project id) is recorded with the key: one commit less.
            result = store_or_spool(rt, target.plan.keyring, new, unverifiable(cluster, job.scope))
        except Exception as exc:  # noqa: BLE001 - this rotation's failure, as its result
            self._settle(
                job.index,
                RotationResult.failed(cluster.name, str(job.scope), exc, job.rid, host.label),
            )
            return
        rt.on_step("stored", job.rid)
        self._settle(job.index, self._after_store(target, job, key, result))

    def _after_store(
        self, target: _Target, job: Job, key: str, result: RotationResult
    ) -> RotationResult:
        """Steps 6 and 7; the key is stored: a failure here is a warning on the result."""
        try:
            if self.cleanup is CleanupPolicy.INLINE:  # by the batch's own session once told
                self._to_clean.append(job.rid)
            elif self.cleanup is CleanupPolicy.DEFERRED:
                self.deferred.add(target.host, [job.rid])
            else:
                result = cleanup_now(self.rt, target.conn, target.host, job.rid, result)
            if result.verify_state is None:
                result = verify_and_record(self.rt, target.plan.cluster, job.scope, key, result)
        except Exception as exc:  # noqa: BLE001 - the rotation succeeded even if this was not recorded
            result = result.warn(f"after the key was stored: {Failure.of(exc, str(job.scope))}")
        return result

    def _settle_inline_cleanup(self, host: Host, output: bytes) -> None:
        """Record what the batch cleaned up; leave the rest to the end-of-run clean-up."""
        try:
            cleaned = cleaned_ids(output, self._to_clean)
            self.rt.journal.record_cleaned(sorted(cleaned))
        except Exception as exc:  # noqa: BLE001 - the keys are stored; only the record of clean-up failed
            log.warning("recording the clean-up on %s failed: %s", host.label, exc)
            self.deferred.add(host, self._to_clean)
            return
        self.results = [
            r.cleaned() if r is not None and r.rotation_id in cleaned else r for r in self.results
        ]
        self.deferred.add(host, [rid for rid in self._to_clean if rid not in cleaned])
