"""Rotation: generate a new TA key over SSH and never lose it.

ta-tool invalidates the previous key the moment it generates a new one, so the
key it prints is the only valid key of its scope. This service is the one that
commits its own transactions, in deliberate steps (docs/rotation.md):

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
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from sqlalchemy import select

from keyvault import crypto
from keyvault.config import Settings
from keyvault.db import transaction
from keyvault.errors import (
    AuthenticationFailed,
    HostKeyError,
    HostUnreachable,
    InvalidInput,
    KeyvaultError,
    NeedsRecovery,
    NotFound,
    RotationError,
    RotationUnresolved,
    StoreFailed,
    TaToolMissing,
)
from keyvault.models import UNRESOLVED_ROTATION_STATES, Event, Host, Rotation, utcnow
from keyvault.scope import Scope, parse_scope
from keyvault.services import spool
from keyvault.services.clusters import cluster_options, get_cluster
from keyvault.services.hosts import become_for, list_hosts, ssh_target, su_password_for
from keyvault.services.secrets import get_version, reveal, store_version
from keyvault.services.store import open_keyring
from keyvault.services.verify import KeyCheckOutcome, unverifiable, verify_scope_key
from keyvault.ssh import Connection, Connector, ExecResult, StdinReply
from keyvault.tahost import (
    RemoteOutput,
    cleaned_ids,
    cleanup_many_script,
    cleanup_marker,
    cleanup_script,
    fetch_script,
    find_keys,
    find_marker,
    generate_many_script,
    mask_keys,
    parse_remote,
    raise_for_become,
    render_command,
    report_end,
)

log = logging.getLogger("keyvault.rotation")
# Rotations cleaned up by one command at the end of a bulk run (~120 bytes each).
CLEANUP_CHUNK = 300


@dataclass
class RotationOutcome:
    """What a rotation did (fingerprints only, never keys)."""

    rotation_id: str
    cluster: str
    scope: str
    state: str
    host: str
    old_version: int | None = None
    old_fingerprint: str | None = None
    new_version: int | None = None
    new_fingerprint: str | None = None
    cleaned_up: bool = False
    verify_state: str | None = None
    verify_message: str | None = None
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Job:
    """One rotation of a batch: its place in the batch, scope, id and ta-tool command."""

    index: int
    scope: Scope
    rid: str
    command: str


@dataclass(frozen=True)
class _Batch:
    """What the rotations of one batch share."""

    keyring: crypto.Keyring = field(repr=False)
    cluster: object
    host: Host
    conn: Connection
    actor: str
    inline_cleanup: bool = False
    to_clean: list = field(default_factory=list)  # ids whose keys are committed, in order


class _ReportStream:
    """Splits a batch's output into each rotation's report as soon as it is complete.

    The jobs run one after the other, so the next report to end is the first pending
    job's; it ends with its RC marker, or EXISTS/NOTATOOL/NODIR when ta-tool never ran.
    A job leaves the stream only when taken with :meth:`next_ready` (or :meth:`rest`), so
    one whose handling fails is never skipped silently.
    """

    def __init__(self, jobs: list[_Job], cleanup_marker: str | None = None) -> None:
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

    def next_ready(self) -> tuple[_Job, bytes] | None:
        """The next job whose report is complete, with its report; None if there is none yet."""
        if not self._pending:
            return None
        end = report_end(self._pending[0].rid, self._buffer, self._start)
        if end is None:
            return None
        report, self._start = bytes(self._buffer[self._start : end]), end
        return self._pending.pop(0), report

    def rest(self) -> list[tuple[_Job, bytes]]:
        """Jobs whose report never ended, each with everything after the last complete one."""
        tail = bytes(self._buffer[self._start :])
        rest, self._pending = [(job, tail) for job in self._pending], []
        return rest


def _note_cleaned(results: list, cleaned: set[str]) -> None:
    """Mark the outcomes whose remote clean-up is done (completed once also checked)."""
    for result in results:
        if isinstance(result, RotationOutcome) and result.rotation_id in cleaned:
            result.cleaned_up = True
            result.state = "completed" if result.verify_state is not None else result.state


def _alive(conn: Connection) -> bool:
    is_active = getattr(conn, "is_active", None)
    return True if is_active is None else bool(is_active())


def new_rotation_id() -> str:
    """A random rotation id, safe in file names and shell words."""
    return secrets.token_hex(6)


class RotationService:
    """Runs rotations and recoveries; owns its transactions (see the module doc)."""

    def __init__(
        self,
        factory,
        *,
        settings: Settings,
        connector: Connector,
        ta_client_factory: Callable | None = None,
        on_step: Callable[[str, str], None] | None = None,
    ) -> None:
        self.factory = factory
        self.settings = settings
        self.connector = connector
        self.ta_client_factory = ta_client_factory
        # Injected by crash tests: called as on_step(step, rotation_id).
        self.on_step = on_step or (lambda step, rid: None)
        # One SSH connection per host, shared by the scopes (and threads) of one run:
        # paramiko multiplexes concurrent channels over it.
        self._connections: dict[int, Connection] = {}
        self._conn_lock = threading.Lock()
        # In bulk runs the remote clean-up (step 6) is batched: one command per host
        # for many rotations, still only after each one's key was committed.
        self._defer_cleanup = False
        self._deferred: dict[int, tuple[Host, list[str]]] = {}

    def close(self) -> None:
        """Close the SSH connections kept for reuse."""
        with self._conn_lock:
            while self._connections:
                self._connections.popitem()[1].close()

    def __enter__(self) -> RotationService:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _release(self, host: Host, conn: Connection, healthy: bool) -> None:
        if healthy or _alive(conn):
            return
        with self._conn_lock:
            if self._connections.get(host.id) is conn:
                del self._connections[host.id]
        conn.close()

    def rotate_many(
        self,
        cluster_name: str,
        scopes: list[Scope],
        *,
        actor: str,
        concurrency: int = 4,
        on_done: Callable[[Scope, RotationOutcome | Exception], None] | None = None,
    ) -> list:
        """Rotate several scopes, ``concurrency`` batches at a time over one connection per host.

        Each scope is a full rotation with its own journal row, pending file and crash
        safety; a batch only shares the SSH channel and ``su`` session that run their
        ta-tool calls one after the other (``rotation.batch_size`` of them), and each key
        is stored as soon as its output arrives. One scope's failure never stops or
        corrupts the others. ``on_done(scope, outcome or exception)`` is called as each
        one ends. Returns ``[(scope, outcome or exception), ...]`` in the order given.
        """
        from concurrent.futures import ThreadPoolExecutor

        if not scopes:
            return []
        concurrency = max(1, concurrency)
        # Small runs still use every channel: 8 scopes at concurrency 4 make 4 batches of 2.
        size = max(1, min(self.settings.rotation_batch_size, -(-len(scopes) // concurrency)))
        batches = [scopes[i : i + size] for i in range(0, len(scopes), size)]

        def one_batch(batch: list[Scope]) -> list:
            results: list = [None] * len(batch)
            reported: set[int] = set()
            where = {scope: i for i, scope in enumerate(batch)}

            def done(scope: Scope, result) -> None:
                reported.add(where[scope])
                if on_done is not None:
                    on_done(scope, result)

            try:
                return self._rotate_batch(
                    cluster_name, batch, actor=actor, on_done=done, results=results
                )
            except Exception as exc:  # noqa: BLE001 - a bug: what was reported stands; the rest go to recover
                self._reported(exc, batch[0])
                for i, scope in enumerate(batch):
                    if i not in reported:
                        results[i] = exc
                        done(scope, exc)
                return results

        self._defer_cleanup = True
        try:
            with ThreadPoolExecutor(
                max_workers=concurrency, thread_name_prefix="kv-rotate"
            ) as pool:
                results = [
                    r for batch_results in pool.map(one_batch, batches) for r in batch_results
                ]
        finally:
            self._defer_cleanup = False
            cleaned = self._flush_cleanups()
        _note_cleaned(results, cleaned)
        return list(zip(scopes, results, strict=False))

    def _defer(self, host: Host, rids: list[str]) -> None:
        """Leave these rotations' clean-up to the end of the run (one command per host)."""
        if rids:
            with self._conn_lock:
                self._deferred.setdefault(host.id, (host, []))[1].extend(rids)

    def _flush_cleanups(self) -> set[str]:
        """Run the batched clean-ups; rotations whose clean-up fails stay `stored` for recover."""
        with self._conn_lock:
            deferred, self._deferred = self._deferred, {}
        cleaned: set[str] = set()
        for host, rids in deferred.values():
            for start in range(0, len(rids), CLEANUP_CHUNK):
                chunk = rids[start : start + CLEANUP_CHUNK]
                try:
                    conn, _ = self._connect_any([host])
                except KeyvaultError as exc:
                    log.warning("clean-up on %s skipped: %s", host.label, exc)
                    continue
                result = self._try(conn, host, cleanup_many_script(chunk))
                gone = cleaned_ids(result.output, chunk) if result else set()
                done = [rid for rid in chunk if rid in gone]
                cleaned.update(done)
                self._record_cleaned(done)
        return cleaned

    def _record_cleaned(self, rids: list[str]) -> None:
        if not rids:
            return
        with transaction(self.factory) as s:
            for rotation in s.scalars(select(Rotation).where(Rotation.id.in_(rids))):
                rotation.cleaned_up = True
                if rotation.state == "stored" and rotation.verify_state is not None:
                    rotation.state = "completed"
                rotation.updated_at = utcnow()

    # -- step 1 -----------------------------------------------------------------
    def _preflight(self, cluster_name: str, scopes: list[Scope]):
        """Check what a batch needs in one transaction; a problem of one scope only is
        returned in place of its ta-tool command, a problem of all of them is raised."""
        with transaction(self.factory) as s:
            keyring = open_keyring(s, settings=self.settings)
            cluster = get_cluster(s, name=cluster_name)
            options = cluster_options(cluster)
            unresolved = {
                r.scope: r
                for r in s.scalars(
                    select(Rotation).where(
                        Rotation.cluster_id == cluster.id,
                        Rotation.scope.in_([str(scope) for scope in scopes]),
                        Rotation.state.in_(UNRESOLVED_ROTATION_STATES),
                    )
                )
            }
            commands: list[str | KeyvaultError] = []
            for scope in scopes:
                other = unresolved.get(str(scope))
                if other is not None:
                    commands.append(self._unresolved_error(other, cluster_name, scope))
                    continue
                template = options[
                    "generate_root_command" if scope.is_root else "generate_app_command"
                ]
                try:
                    commands.append(render_command(template, scope.appid))
                except KeyvaultError as exc:
                    commands.append(exc)
            if not any(isinstance(command, str) for command in commands):
                return keyring, cluster, [], commands  # every scope refused already: no host needed
            hosts = list_hosts(s, cluster_name=cluster_name)
            if not hosts:
                raise NotFound(
                    f"cluster {cluster_name} has no SSH hosts",
                    hint=f"add one with `keyvault host add {cluster_name} ADDRESS`",
                )
            for host in hosts:
                su_password_for(become_for(host), self.settings)
            return keyring, cluster, hosts, commands

    @classmethod
    def _refuse_unresolved(cls, s, cluster_id: int, cluster_name: str, scope: Scope) -> None:
        other = s.scalar(
            select(Rotation).where(
                Rotation.cluster_id == cluster_id,
                Rotation.scope == str(scope),
                Rotation.state.in_(UNRESOLVED_ROTATION_STATES),
            )
        )
        if other is not None:
            raise cls._unresolved_error(other, cluster_name, scope)

    @staticmethod
    def _unresolved_error(other: Rotation, cluster_name: str, scope: Scope) -> RotationUnresolved:
        return RotationUnresolved(
            f"rotation {other.id} of {scope} in {cluster_name} is {other.state} "
            f"(started {other.created_at:%Y-%m-%d %H:%M:%S} UTC by {other.actor} on {other.host_label})",
            rotation_id=other.id,
            hint=f"if it is still running, wait; otherwise run `keyvault rotations recover {other.id}`",
        )

    def _connect_any(self, hosts: list[Host]) -> tuple[Connection, Host]:
        with self._conn_lock:  # one connection per host, even with many threads
            for host in hosts:
                cached = self._connections.get(host.id)
                if cached is not None and _alive(cached):
                    return cached, host
            errors: list[KeyvaultError] = []
            for host in hosts:
                try:
                    conn = self.connector.connect(ssh_target(host, self.settings))
                except (HostUnreachable, AuthenticationFailed, HostKeyError) as exc:
                    # Nothing has run yet: trying the next host is safe.
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

    # -- the rotation ------------------------------------------------------------
    def rotate(self, cluster_name: str, scope: Scope, *, actor: str) -> RotationOutcome:
        """Generate, capture and store a new key for one scope."""
        (result,) = self._rotate_batch(cluster_name, [scope], actor=actor, per_scope=False)
        if isinstance(result, BaseException):
            raise result
        return result

    def _rotate_batch(
        self,
        cluster_name: str,
        scopes: list[Scope],
        *,
        actor: str,
        per_scope: bool = True,
        on_done: Callable[[Scope, RotationOutcome | Exception], None] | None = None,
        results: list | None = None,
    ) -> list:
        """Steps 1-7 for scopes whose ta-tool calls share one SSH channel and ``su`` session.

        Returns an outcome or an exception per scope (filled into ``results`` as they come,
        when given). With ``per_scope`` false (one rotation) a problem of the whole batch is
        raised rather than returned.
        """
        done = on_done or (lambda scope, result: None)
        try:
            keyring, cluster, hosts, commands = self._preflight(cluster_name, scopes)  # step 1
            if not hosts:  # every scope was refused in step 1
                for scope, refused in zip(scopes, commands, strict=False):
                    done(scope, refused)
                return list(commands)
            conn, host = self._connect_any(hosts)
        except Exception as exc:
            if not per_scope:
                raise
            results = [self._reported(exc, scopes[0])] * len(scopes)
            for scope, result in zip(scopes, results, strict=False):
                done(scope, result)
            return results
        if results is None:
            results = []
        results[:] = commands  # an exception per refused scope, the rest replaced below
        jobs = [
            _Job(i, scope, new_rotation_id(), cmd)
            for i, (scope, cmd) in enumerate(zip(scopes, commands, strict=False))
            if isinstance(cmd, str)
        ]
        healthy = False
        try:
            for job, exc in self._journal(jobs, cluster, host, actor):  # step 2
                results[job.index] = exc
            for i, result in enumerate(results):
                if isinstance(result, BaseException):
                    done(scopes[i], result)
            jobs = [job for job in jobs if not isinstance(results[job.index], BaseException)]
            for job in jobs:
                self.on_step("journaled", job.rid)
            if not jobs:
                return results
            become = become_for(host)
            password = su_password_for(become, self.settings)
            # Bulk runs without a PTY clean up in the same session: keyvault sends each id on
            # stdin once its key is committed (with a PTY, stdin is su's: clean-up is deferred).
            batch = _Batch(
                keyring=keyring,
                cluster=cluster,
                host=host,
                conn=conn,
                actor=actor,
                inline_cleanup=self._defer_cleanup and password is None,
            )

            def finish(job: _Job, report: bytes, exit_status: int | None) -> None:
                results[job.index] = self._finish(batch, job, report, exit_status)
                try:
                    done(job.scope, results[job.index])
                except Exception:  # progress or bookkeeping: it must not stop the other rotations
                    log.error("on_done callback failed for %s", job.scope, exc_info=True)

            stream = _ReportStream(
                jobs, cleanup_marker(jobs[0].rid) if batch.inline_cleanup else None
            )
            sent = 0  # ids of batch.to_clean written to stdin so far

            def on_output(chunk: bytes) -> StdinReply | None:
                nonlocal sent
                # Steps 4-7 for each rotation whose report is complete, while the next runs.
                stream.feed(chunk)
                while (ready := stream.next_ready()) is not None:
                    finish(*ready, 0)
                if not batch.inline_cleanup:
                    return None
                if stream.waiting_for_ids:
                    for (
                        job,
                        report,
                    ) in stream.rest():  # the script went on: these reports are cut short
                        finish(job, report, 0)
                new, sent = batch.to_clean[sent:], len(batch.to_clean)
                # The transport ignores anything after the close, so answering again is harmless.
                return StdinReply(
                    "".join(f"{rid}\n" for rid in new).encode(), close=not stream.pending
                )

            try:  # step 3: one su session for the batch, one pending file per rotation
                script = generate_many_script(
                    [(job.rid, job.command) for job in jobs], clean_from_stdin=batch.inline_cleanup
                )
                # ssh.command_timeout bounds each ta-tool run (the silence between reports);
                # the whole batch gets that much per rotation.
                result = conn.run(
                    become.wrap(script),
                    password=password,
                    timeout=self.settings.ssh_command_timeout * len(jobs),
                    idle_timeout=self.settings.ssh_command_timeout,
                    on_output=on_output,
                )
            except KeyvaultError:
                result = ExecResult(b"", None)
            healthy = result.exit_status is not None
            for job, report in stream.rest():  # reports cut short: what the end of the output says
                finish(job, report, result.exit_status)
            if batch.inline_cleanup:
                try:
                    self._settle_inline_cleanup(batch, result.output, results)
                except Exception as exc:  # noqa: BLE001 - the keys are stored; only the record of clean-up failed
                    log.warning("recording the clean-up on %s failed: %s", host.label, exc)
                    self._defer(host, batch.to_clean)
        finally:
            self._release(host, conn, healthy)
        return results

    def _settle_inline_cleanup(self, batch: _Batch, output: bytes, results: list) -> None:
        """Record what the batch cleaned up; leave the rest to the end-of-run clean-up."""
        cleaned = cleaned_ids(output, batch.to_clean)
        self._record_cleaned(sorted(cleaned))
        _note_cleaned(results, cleaned)
        self._defer(batch.host, [rid for rid in batch.to_clean if rid not in cleaned])

    def _finish(self, batch: _Batch, job: _Job, report: bytes, exit_status: int | None):
        """Steps 4-7 for one rotation of a batch; returns its outcome or its exception."""
        self.on_step("generated", job.rid)
        host, cluster = batch.host, batch.cluster
        try:
            remote = parse_remote(job.rid, report)
            key = self._interpret(job.rid, remote, exit_status, host, cluster.key_pattern)  # step 4
            # A check that cannot happen (no project id) is recorded with the key: one commit less.
            outcome = self._store(
                job.rid,
                batch.keyring,
                cluster,
                job.scope,
                key,
                batch.actor,
                host.label,
                verified=unverifiable(cluster, job.scope),
            )  # step 5
        except Exception as exc:  # noqa: BLE001
            return self._reported(exc, job.scope)
        self.on_step("stored", job.rid)
        try:
            if batch.inline_cleanup:  # step 6, by the batch's own session once it is told
                batch.to_clean.append(job.rid)
            else:
                self._cleanup(batch.conn, host, job.rid, outcome)  # step 6
            if outcome.verify_state is None:
                self._verify(job.rid, cluster, job.scope, key, outcome)  # step 7
        except Exception as exc:  # noqa: BLE001
            # The key is stored: the rotation succeeded even if what follows was not recorded.
            outcome.warnings.append(f"after the key was stored: {self._reported(exc, job.scope)}")
        return outcome

    @staticmethod
    def _reported(exc: Exception, scope: Scope) -> Exception:
        if not isinstance(exc, KeyvaultError):
            log.error("rotation of %s failed unexpectedly", scope, exc_info=exc)
        return exc

    def _journal(
        self, jobs: list[_Job], cluster, host: Host, actor: str
    ) -> list[tuple[_Job, Exception]]:
        """Commit a ``pending`` row per job; returns the jobs refused, with why."""

        def add(s, job: _Job) -> None:
            s.add(
                Rotation(
                    id=job.rid,
                    cluster_id=cluster.id,
                    scope=str(job.scope),
                    state="pending",
                    host_id=host.id,
                    host_label=host.label,
                    actor=actor,
                    created_at=now,
                    updated_at=now,
                )
            )

        now = utcnow()
        if len(jobs) > 1:
            try:
                with transaction(self.factory) as s:
                    for job in jobs:
                        add(s, job)
                return []
            except KeyvaultError:
                pass  # another process took one of the scopes meanwhile: one by one tells which
        refused: list[tuple[_Job, Exception]] = []
        for job in jobs:
            try:
                with transaction(self.factory) as s:
                    add(s, job)
            except KeyvaultError:
                try:
                    with transaction(self.factory) as s:
                        self._refuse_unresolved(s, cluster.id, cluster.name, job.scope)
                except KeyvaultError as unresolved:
                    exc = unresolved
                refused.append((job, exc))
        return refused

    def _mark(
        self, rid: str, state: str, error: str | None = None, event: str | None = None, **fields
    ) -> None:
        """Record a failed or needs_recovery verdict, unless the rotation was resolved meanwhile.

        Another process (a bulk run and a `recover --all`, say) may have stored the key
        between our look at the host and this write: a stored rotation is never demoted.
        """
        with transaction(self.factory) as s:
            rotation = s.scalar(
                select(Rotation).where(Rotation.id == rid).with_for_update(of=Rotation)
            )
            if rotation.state not in UNRESOLVED_ROTATION_STATES:
                log.warning(
                    "rotation %s is %s already; not marking it %s", rid, rotation.state, state
                )
                return
            rotation.state = state
            rotation.updated_at = utcnow()
            if error is not None:
                rotation.error = error
            for name, value in fields.items():
                setattr(rotation, name, value)
            if event:
                payload = {
                    "rotation_id": rid,
                    "cluster": rotation.cluster.name,
                    "scope": rotation.scope,
                    "state": state,
                    "error": error,
                    "host": rotation.host_label,
                }
                s.add(
                    Event(
                        type=event,
                        cluster=rotation.cluster.name,
                        scope=rotation.scope,
                        payload=json.dumps(payload, sort_keys=True),
                        created_at=utcnow(),
                    )
                )

    def _needs_recovery(self, rid: str, message: str, hint: str | None = None) -> NeedsRecovery:
        hint = hint or f"run `keyvault rotations recover {rid}`"
        try:
            self._mark(rid, "needs_recovery", error=message, event="rotation.failed")
        except KeyvaultError as exc:  # the row stays `pending`, which is unresolved too
            log.error("could not record needs_recovery for %s: %s", rid, exc)
        return NeedsRecovery(message, rotation_id=rid, hint=hint)

    def _interpret(
        self, rid: str, remote: RemoteOutput, exit_status: int | None, host: Host, pattern: str
    ) -> str:
        """Turn a generate/fetch report into the key, or record why not and raise."""
        label = host.label if host is not None else "the host"
        if remote.state == "result":
            candidates = find_keys(remote.output, pattern)
            shown = mask_keys(
                (remote.output + b"\n" + remote.errors).decode("utf-8", "replace"), pattern
            )
            shown = " | ".join(
                line.strip() for line in shown.replace("\r", "").splitlines() if line.strip()
            )[:500]
            if len(candidates) == 1 and remote.rc in (0, None):
                return candidates[0]
            if not candidates and remote.rc not in (0, None):
                # ta-tool said it failed and printed nothing that looks like a key. Its output stays
                # on the host all the same: if the real tool ever prints a key in another format and
                # exits non-zero, that file is its only copy.
                message = (
                    f"ta-tool failed on {label} (exit {remote.rc}): {shown or 'no output'}; its output "
                    f"is kept in ~{host.ta_user}/.keyvault/pending/{rid}.out"
                )
                self._mark(rid, "failed", error=message, event="rotation.failed")
                raise RotationError(
                    message,
                    rotation_id=rid,
                    hint="nothing was generated; fix the cause and rotate again",
                )
            if remote.rc is None and not candidates:
                raise self._needs_recovery(
                    rid,
                    f"ta-tool on {label} has not finished (no exit status, no key yet)",
                    hint=f"wait, then run `keyvault rotations recover {rid}`",
                )
            what = "no key" if not candidates else f"{len(candidates)} candidate keys"
            raise self._needs_recovery(
                rid,
                f"ta-tool output on {label} has {what} matching {pattern}: {shown or 'no output'}",
                hint=f"the key is kept on the host; fix the cluster's --key-pattern if needed, then run "
                f"`keyvault rotations recover {rid}`",
            )
        if remote.state == "nodir":
            message = f"cannot create ~{host.ta_user}/.keyvault/pending on {label}"
            self._mark(rid, "failed", error=message, event="rotation.failed")
            raise RotationError(
                message,
                rotation_id=rid,
                hint="nothing was generated; check that ta's home exists, is ta's and is not full",
            )
        if remote.state == "notatool":
            self._mark(rid, "failed", error="ta-tool not found", event="rotation.failed")
            raise TaToolMissing(
                f"ta-tool is not on the PATH of the ta user on {label}",
                host=label,
                hint="nothing was generated; fix ta's login PATH",
            )
        if remote.state == "exists":
            with transaction(self.factory) as s:
                state = s.get(Rotation, rid).state
            if state not in UNRESOLVED_ROTATION_STATES:
                # `rotations recover` found no pending file and claimed the id first: ta-tool did not run.
                raise RotationError(
                    f"rotation {rid} was resolved ({state}) by a recovery before ta-tool could run "
                    f"on {label}; ta-tool did not run",
                    rotation_id=rid,
                    hint="nothing was generated; rotate again",
                )
            raise self._needs_recovery(
                rid, f"a pending file for rotation {rid} already exists on {label}"
            )
        if not remote.started and exit_status is not None:
            try:
                raise_for_become(remote.raw_tail, label, become_for(host))
            except KeyvaultError as exc:
                self._mark(rid, "failed", error=str(exc), event="rotation.failed")
                raise
        raise self._needs_recovery(
            rid,
            f"the connection to {label} was lost after ta-tool may have started; the key, if any, "
            f"is kept in ~{host.ta_user}/.keyvault/pending/{rid}.out on the host",
        )

    # -- step 5 ------------------------------------------------------------------
    def _store(
        self,
        rid: str,
        keyring: crypto.Keyring,
        cluster,
        scope: Scope,
        key: str,
        actor: str,
        host_label: str,
        verified: KeyCheckOutcome | None = None,
    ) -> RotationOutcome:
        """Step 5; ``verified`` (a check known without TA, i.e. skipped) is recorded with it.

        ``cluster`` is the row read in step 1 (its id and name are all that is used: if it
        was deleted meanwhile, the insert fails and the key goes to the spool).
        """
        fp = crypto.fingerprint(key)
        cluster_name = cluster.name
        try:
            with transaction(self.factory) as s:
                rotation = s.scalar(
                    select(Rotation).where(Rotation.id == rid).with_for_update(of=Rotation)
                )
                if rotation.state not in UNRESOLVED_ROTATION_STATES:
                    # Stored by a concurrent recovery; only the same key is acceptable.
                    if rotation.new_fingerprint != fp:
                        raise RotationError(
                            f"rotation {rid} was resolved meanwhile with another key",
                            rotation_id=rid,
                        )
                    return self._outcome(rotation)
                stored = store_version(
                    s,
                    keyring=keyring,
                    cluster=cluster,
                    scope=scope,
                    key=key,
                    source="rotation",
                    actor=actor,
                    rotation_id=rid,
                )
                rotation.state, rotation.updated_at = "stored", utcnow()
                rotation.old_version, rotation.new_version = stored.old_number, stored.number
                rotation.new_fingerprint, rotation.error = stored.fingerprint, None
                if verified is not None:
                    rotation.verify_state, rotation.verify_code = (
                        verified.state,
                        verified.return_code,
                    )
                    rotation.verify_message, rotation.verified_at = verified.message, utcnow()
                outcome = self._outcome(rotation)
                outcome.old_fingerprint = stored.old_fingerprint
        except RotationError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: the key must go somewhere durable first
            try:
                path = spool.write_spool(
                    self.settings,
                    keyring,
                    rotation_id=rid,
                    cluster=cluster_name,
                    scope=str(scope),
                    key=key,
                )
            except Exception as spool_exc:  # noqa: BLE001
                raise StoreFailed(
                    f"THE NEW KEY OF {scope} IN {cluster_name} WAS NOT STORED ({exc}) and the spool failed too "
                    f"({type(spool_exc).__name__}); it is still in the pending file on {host_label}",
                    rotation_id=rid,
                    hint=f"do not rotate again; fix the database, then `keyvault rotations recover {rid}`",
                ) from None
            with contextlib.suppress(Exception):
                self._mark(
                    rid,
                    "needs_recovery",
                    error=f"store failed: {exc}; key spooled at {path}",
                    event="rotation.failed",
                )
            raise StoreFailed(
                f"THE NEW KEY OF {scope} IN {cluster_name} COULD NOT BE STORED ({exc}); it is safe, encrypted, "
                f"in {path}",
                rotation_id=rid,
                hint=f"fix the database, then run `keyvault rotations recover {rid}`",
            ) from None
        try:
            spool.remove_spool(self.settings, rid)
        except (
            OSError
        ) as exc:  # committed already: a stale spool file is harmless, recover skips it
            outcome.warnings.append(f"could not delete the spool file of {rid}: {exc.strerror}")
        return outcome

    @staticmethod
    def _outcome(rotation: Rotation) -> RotationOutcome:
        return RotationOutcome(
            rotation_id=rotation.id,
            cluster=rotation.cluster.name,
            scope=rotation.scope,
            state=rotation.state,
            host=rotation.host_label,
            old_version=rotation.old_version,
            new_version=rotation.new_version,
            new_fingerprint=rotation.new_fingerprint,
            cleaned_up=bool(rotation.cleaned_up),
            verify_state=rotation.verify_state,
            verify_message=rotation.verify_message,
        )

    # -- steps 6 and 7 -------------------------------------------------------------
    def _try(self, conn: Connection, host: Host, script: str) -> ExecResult | None:
        become = become_for(host)
        try:
            return conn.run(
                become.wrap(script),
                password=su_password_for(become, self.settings),
                timeout=self.settings.ssh_connect_timeout + 30,
            )
        except KeyvaultError as exc:
            log.warning("on %s: %s", host.label, exc)
            return None

    def _cleanup(self, conn: Connection, host: Host, rid: str, outcome: RotationOutcome) -> None:
        if self._defer_cleanup:
            self._defer(host, [rid])
            return
        result = self._try(conn, host, cleanup_script(rid))
        if result is not None and parse_remote(rid, result.output).state == "cleaned":
            outcome.cleaned_up = True
            if outcome.verify_state is not None:  # checked already (skipped): nothing is left to do
                outcome.state = "completed"
                self._update(rid, cleaned_up=True, state="completed")
            else:
                self._update(rid, cleaned_up=True)
        else:
            outcome.warnings.append(
                f"could not delete the pending file on {host.label}; "
                f"`keyvault rotations recover {rid}` retries"
            )

    def _update(self, rid: str, **fields) -> None:
        with transaction(self.factory) as s:
            rotation = s.get(Rotation, rid)
            for name, value in fields.items():
                setattr(rotation, name, value)
            rotation.updated_at = utcnow()

    def _verify(self, rid: str, cluster, scope: Scope, key: str, outcome: RotationOutcome) -> None:
        # The TA call happens outside any transaction: on SQLite a transaction holds the
        # write lock, and bulk runs must not queue their commits behind a slow TA.
        result = verify_scope_key(
            cluster, scope, key, settings=self.settings, client_factory=self.ta_client_factory
        )
        cluster_name = cluster.name
        with transaction(self.factory) as s:
            rotation = s.get(Rotation, rid)
            rotation.verify_state, rotation.verify_code = result.state, result.return_code
            rotation.verify_message, rotation.verified_at = result.message, utcnow()
            rotation.state = "completed" if rotation.cleaned_up else "stored"
            rotation.updated_at = utcnow()
            if result.state == "failed":
                payload = {
                    "rotation_id": rid,
                    "cluster": cluster_name,
                    "scope": str(scope),
                    "return_code": result.return_code,
                    "message": result.message,
                    "fingerprint": crypto.fingerprint(key),
                }
                s.add(
                    Event(
                        type="rotation.verification_failed",
                        cluster=cluster_name,
                        scope=str(scope),
                        payload=json.dumps(payload, sort_keys=True),
                        created_at=utcnow(),
                    )
                )
            outcome.state = rotation.state
        outcome.verify_state, outcome.verify_message = result.state, result.message

    # -- recovery ------------------------------------------------------------------
    def recover(self, rid: str, *, actor: str) -> RotationOutcome:
        """Complete an interrupted rotation from the local spool or the remote pending file."""
        with transaction(self.factory) as s:
            rotation = s.get(Rotation, rid)
            if rotation is None:
                raise NotFound(f"no rotation {rid!r}", hint="see `keyvault rotations list`")
            keyring = open_keyring(s, settings=self.settings)
            cluster, scope = rotation.cluster, parse_scope(rotation.scope, r".+")
            host = rotation.host
            state = rotation.state
            outcome = self._outcome(rotation)
        if state in ("completed", "failed", "abandoned"):
            outcome.warnings.append(f"rotation {rid} is already {state}; nothing to do")
            return outcome
        spooled = spool.read_spool(self.settings, keyring, rid)
        if spooled is not None and state in UNRESOLVED_ROTATION_STATES:
            outcome = self._store(rid, keyring, cluster, scope, spooled.key, actor, outcome.host)
            key: str | None = spooled.key
        else:
            key = None
        if host is None:
            raise InvalidInput(
                f"the host of rotation {rid} was removed", hint="re-add it, then recover again"
            )
        conn = self.connector.connect(ssh_target(host, self.settings))
        try:
            if key is None and state in UNRESOLVED_ROTATION_STATES:
                result = self._try(conn, host, fetch_script(rid))
                remote = parse_remote(rid, result.output if result else b"")
                if remote.state == "absent":
                    message = f"no pending file for rotation {rid} on {host.label}: ta-tool never ran for it"
                    self._mark(rid, "failed", error=message)
                    outcome.state = "failed"
                    outcome.warnings.append(message + "; nothing was generated, rotate again")
                    return outcome
                if remote.state == "cleaned":
                    raise RotationError(
                        f"the pending file of {rid} was deleted but the key is not stored",
                        rotation_id=rid,
                        hint="check `keyvault secrets history`; then rotate again",
                    )
                key = self._interpret(
                    rid, remote, result.exit_status if result else None, host, cluster.key_pattern
                )
                outcome = self._store(rid, keyring, cluster, scope, key, actor, host.label)
            if key is None:  # stored earlier: the key is in the database
                with transaction(self.factory) as s:
                    version = get_version(
                        s, cluster_name=cluster.name, scope=scope, number=outcome.new_version
                    )
                    key = reveal(keyring, version)
            self._cleanup(conn, host, rid, outcome)
        finally:
            conn.close()
        self._verify(rid, cluster, scope, key, outcome)
        return outcome

    def recover_all(self, *, actor: str, cluster_name: str | None = None) -> list:
        """Recover every unresolved rotation, and every stored one not yet cleaned up.

        For after a crash or a dropped bulk run. Safe even while a run is still going: a
        recovery can only make its not-yet-started rotations fail, never lose a key.
        Returns ``[(rotation id, scope, outcome or exception), ...]``, oldest first.
        """
        with transaction(self.factory) as s:
            stmt = select(Rotation).where(
                Rotation.state.in_((*UNRESOLVED_ROTATION_STATES, "stored"))
            )
            if cluster_name is not None:
                stmt = stmt.where(Rotation.cluster_id == get_cluster(s, name=cluster_name).id)
            todo = [
                (r.id, r.scope) for r in s.scalars(stmt.order_by(Rotation.created_at, Rotation.id))
            ]
        results = []
        for rid, scope in todo:
            try:
                results.append((rid, scope, self.recover(rid, actor=actor)))
            except Exception as exc:  # noqa: BLE001 - one rotation's trouble never stops the others
                results.append((rid, scope, self._reported(exc, scope)))
        return results

    def abandon(self, rid: str, *, reason: str) -> None:
        """Give up an unresolved rotation (the operator chose to regenerate).

        Refused while the rotation's host still holds a parseable key for it, or a
        spooled key exists: that key is the valid one and must be recovered instead.
        """
        with transaction(self.factory) as s:
            rotation = s.get(Rotation, rid)
            if rotation is None or rotation.state not in UNRESOLVED_ROTATION_STATES:
                raise InvalidInput(f"rotation {rid} is not unresolved")
            host, pattern, keyring = (
                rotation.host,
                rotation.cluster.key_pattern,
                open_keyring(s, settings=self.settings),
            )
        if spool.read_spool(self.settings, keyring, rid) is not None:
            raise RotationError(
                f"rotation {rid} has a key in the local spool",
                rotation_id=rid,
                hint=f"run `keyvault rotations recover {rid}` without --regenerate",
            )
        if host is not None:
            conn = self.connector.connect(ssh_target(host, self.settings))
            try:
                result = self._try(conn, host, fetch_script(rid))
            finally:
                conn.close()
            remote = parse_remote(rid, result.output if result else b"")
            if remote.state == "result" and len(find_keys(remote.output, pattern)) == 1:
                raise RotationError(
                    f"the host {host.label} holds the key ta-tool generated for rotation {rid}; it is the valid one",
                    rotation_id=rid,
                    hint=f"run `keyvault rotations recover {rid}` without --regenerate",
                )
        with transaction(self.factory) as s:
            rotation = s.get(Rotation, rid)
            if rotation is None or rotation.state not in UNRESOLVED_ROTATION_STATES:
                raise InvalidInput(f"rotation {rid} is not unresolved")
            rotation.state, rotation.error, rotation.updated_at = "abandoned", reason, utcnow()
