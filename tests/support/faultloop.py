"""Seeded fault loops over the real sshd: kill -9 and database faults at random moments.

Each round (its randomness from ``Random(f"{seed}:{round}")``, so one round replays alone)
picks a scope (root or an app), a fault and a moment, runs one real rotation as a
subprocess (``tests/integration/rotate_driver.py``, the CLI's rotation service) and
injects the fault at that moment: the chosen step hook line on the driver's stdout
(``start`` = the spawn) plus a random extra delay. The delays place the fault; nothing
waits on time to decide the outcome. Faults:

- ``kill9``          SIGKILL of the rotating process
- ``pg_terminate``   ``pg_terminate_backend`` of every connection to the store's database
- ``pg_refuse``      ``ALLOW_CONNECTIONS false`` for a random 0.1-3 s (half the time also
                     cutting the open connections), then true again
- ``sqlite_lock``    another connection holds ``BEGIN EXCLUSIVE`` for a random 0.1-3 s
- ``sqlite_vanish``  the database file renamed away for a random 0.1-3 s, then back

Then, as an operator would: `keyvault status` must name any rotation left unresolved,
`keyvault rotations recover --all` is run until it settles everything (a killed
rotation's ta-tool may still be running on the host: recover says so, and is run again),
and the invariants are checked (:func:`check_round`): every key the emulator generated
in the round is in keyvault's history (by fingerprint, one version per key), the
current version is the emulator's current key (revealed and compared, never shown),
nothing is unresolved or unsettled, and the spool is empty.

The sshd and the emulator are shared machine-wide: run under ``flock /tmp/kv-sshd.lock``.
The standalone runner (``python -m tests.support.faultloop``, ``make faultloop``) takes
that lock itself, ``--chunk`` rounds at a time, so other users get the sshd in between.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from keyvault.sandbox import state as st
from tests.support import dbfaults
from tests.support.sshd_env import SshdEnv
from tests.support.storereader import StoreReader
from tests.support.timeouts import TIMEOUT

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "integration" / "rotate_driver.py"
SSHD_LOCK = Path("/tmp/kv-sshd.lock")
STEPS = ("start", "journaled", "generated", "sealed", "stored")
KILL_FAULTS = ("kill9",)
DB_FAULTS = {"postgres": ("pg_terminate", "pg_refuse"), "sqlite": ("sqlite_lock", "sqlite_vanish")}
UNRESOLVED = ("pending", "needs_recovery")
RECOVER_DEADLINE = 4 * TIMEOUT  # a bound for the operator's retries, never a wait


class LoopFailure(AssertionError):
    """An invariant broke; the message names the seed and round to replay."""


@dataclass
class Store:
    """The keyvault home and database of one loop."""

    backend: str
    url: str
    home: Path
    db_name: str  # PostgreSQL database name, or the SQLite file
    server_url: str | None = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYVAULT_")}
        env |= {k: v for k, v in os.environ.items() if k.startswith("KEYVAULT_TEST_")}
        env |= {
            "KEYVAULT_HOME": str(self.home),
            "KEYVAULT_DATABASE_URL": self.url,
            "KEYVAULT_MASTER_KEY_FILE": str(self.home / "master.key"),
            "KEYVAULT_ACTOR": "faultloop",
            "PYTHONPATH": str(ROOT),
        }
        return env


@dataclass(frozen=True)
class Plan:
    """What one round does, drawn from the seed."""

    round: int
    scope: str
    fault: str
    step: str
    paused: bool  # the driver waits at the step's hook until the fault is in place
    delay: float
    duration: float
    cut: bool

    @classmethod
    def draw(cls, seed: int, n: int, scopes: list[str], faults: tuple[str, ...]) -> Plan:
        rng = random.Random(f"{seed}:{n}")
        step = rng.choice(STEPS)
        paused = step != "start" and rng.random() < 0.3
        # From the spawn: anywhere in a whole rotation. From a step: mostly just after it
        # (a store transaction lasts milliseconds), sometimes into what follows.
        spread = rng.choice((0.0, 0.05, 0.05, 0.4, 0.4)) if step != "start" else 2.5
        return cls(
            round=n,
            scope=rng.choice(scopes),
            fault=rng.choice(faults),
            step=step,
            paused=paused,
            delay=0.0 if paused else rng.uniform(0.0, spread),
            duration=rng.uniform(0.1, 3.0),
            cut=rng.random() < 0.5,
        )

    @property
    def moment(self) -> str:
        return f"paused at {self.step}" if self.paused else f"{self.step}+{self.delay:.3f}s"


@dataclass
class Outcome:
    plan: Plan
    landed: bool  # the fault happened while the rotation process was alive
    before_recover: str  # stored-directly, spooled, remote-pending, not-journaled, failed...
    after_recover: str
    generated: int
    recover_runs: int
    seconds: float


@dataclass
class Tally:
    """The figures of a loop."""

    outcomes: list[Outcome] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def summary(self) -> dict[str, object]:
        count = collections.Counter
        return {
            "rounds": len(self.outcomes),
            "faults": dict(count(o.plan.fault for o in self.outcomes)),
            "landed": sum(o.landed for o in self.outcomes),
            "moments": dict(count(o.plan.step for o in self.outcomes if o.landed)),
            "paused_at_hook": sum(o.plan.paused for o in self.outcomes if o.landed),
            "by_fault": {
                fault: dict(count(o.before_recover for o in self.outcomes if o.plan.fault == fault))
                for fault in sorted({o.plan.fault for o in self.outcomes})
            },
            "before_recover": dict(count(o.before_recover for o in self.outcomes)),
            "after_recover": dict(count(o.after_recover for o in self.outcomes)),
            "recover_runs": sum(o.recover_runs for o in self.outcomes),
            "keys_generated": sum(o.generated for o in self.outcomes),
            "wall_seconds": round(time.monotonic() - self.started, 1),
        }


# ----------------------------------------------------------------------------- the loop
class FaultLoop:
    """One keyvault home with one cluster on the test sshd, and its rounds."""

    def __init__(
        self,
        store: Store,
        sshd: SshdEnv,
        *,
        api_url: str,
        seed: int,
        faults: tuple[str, ...],
        tag: str,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.store, self.sshd, self.api_url, self.seed = store, sshd, api_url, seed
        self.faults, self.log = faults, log
        self.state_dir = Path(sshd.tatool_state_dir)
        self.reader = StoreReader(store)
        self.cluster = f"fl-{tag}"
        self.apps = [f"kvfl-{tag}-{n}" for n in (1, 2)]
        self.scopes = ["root", *(f"app:{a}" for a in self.apps)]
        self.tally = Tally()
        self.ta_pending = Path(os.path.expanduser("~ta")) / ".keyvault" / "pending"

    # -- running keyvault -------------------------------------------------------------------
    def keyvault(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "keyvault", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self.store.env,
            timeout=TIMEOUT,
            check=False,
        )

    def must(self, *args: str) -> subprocess.CompletedProcess:
        done = self.keyvault(*args)
        if done.returncode != 0:
            raise LoopFailure(
                f"keyvault {' '.join(args[:3])} exited {done.returncode}: {done.stderr.strip()}"
            )
        return done

    def setup(self) -> None:
        """`init`, the cluster, its host (the test sshd as root, su) and a first clean
        rotation of every scope (so every scope has a current key to lose)."""
        st.add_apps(self.state_dir, self.apps)
        self.must("init")
        self.must(
            "cluster", "add", self.cluster, "--open-api-url", self.api_url, "--login-name", "root"
        )
        ids = [f"{a}={st.project_id(self.state_dir, a)}" for a in self.apps]
        self.must("cluster", "set", self.cluster, *[x for i in ids for x in ("--project-id", i)])
        self.must(
            "host", "add", self.cluster, self.sshd.host, "--port", str(self.sshd.port),
            "--user", "root", "--identity", str(self.sshd.identity("root")),
            "--become", "su", "--fingerprint", self.sshd.host_key_fingerprint,
        )  # fmt: skip
        for scope in self.scopes:
            self.must("rotate", *self._scope_args(scope), "--cluster", self.cluster, "--yes")
            self._check_current(scope, "after the set-up rotation")

    @staticmethod
    def _scope_args(scope: str) -> list[str]:
        return ["root"] if scope == "root" else ["app", scope[4:]]

    def run(self, rounds: range, *, lock: Path | None = None, chunk: int = 50) -> Tally:
        """Run ``rounds``, taking ``lock`` (flock) for ``chunk`` rounds at a time if given."""
        for start in range(rounds.start, rounds.stop, chunk):
            with _flocked(lock):
                for n in range(start, min(start + chunk, rounds.stop)):
                    self.tally.outcomes.append(self.round(n))
            self.log(
                f"rounds {rounds.start}..{min(start + chunk, rounds.stop) - 1}: {self.tally.summary()}"
            )
        return self.tally

    # -- one round --------------------------------------------------------------------------
    def round(self, n: int) -> Outcome:
        plan = Plan.draw(self.seed, n, self.scopes, self.faults)
        began = time.monotonic()
        log_before = _generation_log(self.state_dir)
        scope_gens = st.generations(self.state_dir, plan.scope)
        versions = self.reader.versions(self.cluster, plan.scope)
        known = set(self.reader.rotations())
        try:
            landed = self._rotate_with_fault(plan)
        finally:
            dbfaults.restore_all()
        new = {rid: row for rid, row in self.reader.rotations().items() if rid not in known}
        before = self._classify(new)
        runs = self._recover(plan, new)
        generated = _generation_log(self.state_dir)[len(log_before) :]
        self.check_round(
            plan, versions, generated, st.generations(self.state_dir, plan.scope) - scope_gens
        )
        after = {rid: row for rid, row in self.reader.rotations().items() if rid in new}
        self._remove_tombstones(list(after))
        outcome = Outcome(
            plan, landed, before, ",".join(sorted({s for _, s, _ in after.values()})) or "none",
            len(generated), runs, round(time.monotonic() - began, 2),
        )  # fmt: skip
        self.log(
            f"round {n} {plan.scope} {plan.fault}@{plan.moment} landed={landed} {before} -> {outcome.after_recover}"
        )
        return outcome

    def _rotate_with_fault(self, plan: Plan) -> bool:
        """Run the driver with the fault placed per ``plan``; True if it landed."""
        with (
            tempfile.TemporaryDirectory(prefix="kv-fl-") as tmp,
            open(Path(tmp) / "err", "w+") as err,
        ):
            go = Path(tmp) / "go"
            pause = ["--pause-at", plan.step, "--pause-file", str(go)] if plan.paused else []
            proc = subprocess.Popen(
                [sys.executable, str(DRIVER), *pause, self.cluster, plan.scope],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                text=True, env=self.store.env,
            )  # fmt: skip
            steps = StepWatcher(proc)
            landed = threading.Event()
            injector = threading.Thread(target=self._inject, args=(plan, proc, steps, landed, go))
            injector.start()
            try:
                proc.wait(timeout=RECOVER_DEADLINE)
            finally:
                go.touch()  # never leave the driver waiting at its hook
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                steps.gone.set()
                injector.join()
                steps.join()
                if proc.stdout is not None:
                    proc.stdout.close()
        return landed.is_set()

    def _inject(
        self,
        plan: Plan,
        proc: subprocess.Popen,
        steps: StepWatcher,
        landed: threading.Event,
        go: Path,
    ) -> None:
        if not steps.wait_for(plan.step):
            return  # the rotation ended before its chosen step (e.g. refused at once)
        if plan.delay and steps.gone.wait(plan.delay):
            return  # ended during the delay: the fault would miss it
        if proc.poll() is not None:
            return
        landed.set()
        if plan.fault == "kill9":
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            return
        if plan.fault == "pg_terminate":
            dbfaults.terminate_backends(self.store.server_url or "", self.store.db_name)
            go.touch()
            return
        if plan.fault == "sqlite_lock":
            go.touch()  # paused inside its transaction, it holds the write lock: let it go first
        with self._fault_block(plan):
            go.touch()
            steps.gone.wait(plan.duration)  # the outage lasts this long, or until exit

    def _fault_block(self, plan: Plan) -> contextlib.AbstractContextManager[None]:
        if plan.fault == "pg_refuse":
            return dbfaults.refusing_connections(
                self.store.server_url or "", self.store.db_name, cut=plan.cut
            )
        if plan.fault == "sqlite_lock":
            return dbfaults.exclusive_lock(Path(self.store.db_name))
        if plan.fault == "sqlite_vanish":
            return dbfaults.vanished(Path(self.store.db_name))
        raise ValueError(f"unknown fault {plan.fault!r}")

    def _classify(self, new: dict[str, tuple[str, str, bool]]) -> str:
        """Where the round's key was when the fault was over (before any recovery)."""
        if not new:
            return "not-journaled"
        spooled = {p.stem for p in (self.store.home / "spool").glob("*.json")}
        kinds = set()
        for rid, (_scope, state, cleaned) in new.items():
            if state in UNRESOLVED:
                kinds.add("spooled" if rid in spooled else f"{state}(remote pending file)")
            elif state == "stored":
                kinds.add("stored, not settled" + ("" if cleaned else " (pending file left)"))
            elif state == "completed":
                kinds.add("stored directly")
            else:
                kinds.add(state)
        return ",".join(sorted(kinds))

    def _recover(self, plan: Plan, new: dict[str, tuple[str, str, bool]]) -> int:
        """The operator's part: status names what is unresolved; recover --all until settled."""
        open_ids = [rid for rid, (_s, state, _c) in new.items() if state in UNRESOLVED]
        if open_ids:
            status = self.keyvault("status", "--json")
            missing = [rid for rid in open_ids if rid not in status.stdout]
            if status.returncode != 3 or missing:
                self.fail(
                    plan, f"status (exit {status.returncode}) does not report {missing or open_ids}"
                )
        deadline = time.monotonic() + RECOVER_DEADLINE
        runs = 0
        while True:
            runs += 1
            done = self.keyvault("rotations", "recover", "--all", "--json")
            try:
                summary = json.loads(done.stdout)["summary"]
            except (ValueError, KeyError):
                summary = None
            if done.returncode == 0 and summary and summary["unresolved"] == 0:
                return runs
            if time.monotonic() > deadline:
                self.fail(
                    plan,
                    f"recover --all still leaves rotations unresolved: {done.stderr.strip()[-500:]}",
                )
            time.sleep(0.2)  # a poll: ta-tool of a killed run may still be running on the host

    # -- the invariants ---------------------------------------------------------------------
    def check_round(
        self, plan: Plan, versions: list, generated: list[str], scope_gens: int
    ) -> None:
        """Every key generated in the round is stored, once; the current key is TA's; nothing
        is left unresolved, unsettled or spooled."""
        if len(generated) != scope_gens:
            self.fail(
                plan,
                f"{len(generated)} keys generated, {scope_gens} of them for {plan.scope}: "
                "another user of the emulator (no flock)?",
            )
        after = self.reader.versions(self.cluster, plan.scope)
        if [v[:2] for v in after[: len(versions)]] != [v[:2] for v in versions]:
            self.fail(plan, "the history before the round changed")
        stored = {fp for _n, fp, _s in after}
        lost = [full[:16] for full in generated if full[:16] not in stored]
        if lost:
            self.fail(
                plan,
                f"KEY LOST: generated key(s) {lost} of {plan.scope} are not in keyvault's history",
            )
        if len(after) != len(versions) + len(generated):
            self.fail(
                plan,
                f"{len(generated)} key(s) generated but {len(after) - len(versions)} version(s) added",
            )
        if generated or plan.scope != "root":
            self._check_current(plan.scope, f"round {plan.round}", plan)
        elif [v[:2] for v in after] != [v[:2] for v in versions]:
            self.fail(plan, "no key was generated but the history changed")
        left = {
            rid: row
            for rid, row in self.reader.rotations().items()
            if row[1] not in ("completed", "failed")
        }
        if left:
            self.fail(plan, f"rotations left unsettled after recover --all: {left}")
        spooled = sorted((self.store.home / "spool").glob("*.json"))
        if spooled:
            self.fail(plan, f"the spool is not empty: {[p.name for p in spooled]}")

    def _check_current(self, scope: str, what: str, plan: Plan | None = None) -> None:
        if not self.reader.current_is(self.cluster, scope, st.current_key(self.state_dir, scope)):
            message = f"{scope} {what}: keyvault's current key is not the emulator's valid key"
            if plan is None:
                raise LoopFailure(message)
            self.fail(plan, message)

    def fail(self, plan: Plan, message: str) -> None:
        raise LoopFailure(
            f"seed {self.seed} round {plan.round} ({plan.scope}, {plan.fault} at {plan.moment}, "
            f"outage {plan.duration:.2f}s, cut={plan.cut}): {message}; replay with "
            f"KEYVAULT_FAULTLOOP_SEED={self.seed} KEYVAULT_FAULTLOOP_FIRST={plan.round}"
        )

    def _remove_tombstones(self, rids: list[str]) -> None:
        for rid in rids:
            for path in self.ta_pending.glob(f"{rid}.*"):
                path.unlink(missing_ok=True)


def _generation_log(state_dir: Path) -> list[str]:
    """The emulator's log of every key generated (SHA-256 hex, oldest first)."""
    try:
        return (state_dir / st.FINGERPRINT_LOG).read_text().split()
    except FileNotFoundError:
        return []


class StepWatcher(threading.Thread):
    """Reads the driver's ``step STEP RID`` lines; ``wait_for(step)`` until seen or exit."""

    def __init__(self, proc: subprocess.Popen) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.seen: dict[str, threading.Event] = {s: threading.Event() for s in STEPS}
        self.seen["start"].set()
        self.gone = threading.Event()
        self.start()

    def run(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # never a key: the driver prints steps and ids only
            parts = line.split()
            if len(parts) == 3 and parts[0] == "step" and parts[1] in self.seen:
                self.seen[parts[1]].set()
        self.gone.set()

    def wait_for(self, step: str) -> bool:
        while not self.seen[step].wait(0.05):
            if self.gone.is_set():
                return self.seen[step].is_set()
        return True


@contextlib.contextmanager
def _flocked(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------ the standalone run
def make_store(backend: str, workdir: Path) -> tuple[Store, Callable[[], None]]:
    """A fresh store on ``backend`` and the function that drops it."""
    from tests.support.db import (
        create_postgres_database,
        drop_postgres_database,
        postgres_server_url,
    )

    home = workdir / "home"
    if backend == "sqlite":
        path = workdir / "keyvault.db"
        return Store("sqlite", f"sqlite:///{path}", home, str(path)), lambda: None
    server = postgres_server_url()
    pg = create_postgres_database(server)
    return Store("postgres", pg.url, home, pg.name, server), lambda: drop_postgres_database(pg)


def main(argv: list[str] | None = None) -> int:
    from keyvault.sandbox.openapi import serving
    from tests.support.sshd_env import load_sshd_env

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), required=True)
    parser.add_argument("--faults", choices=("kill9", "db"), required=True)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--first", type=int, default=0, help="first round (to replay one)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=50, help="rounds per hold of the sshd lock")
    parser.add_argument("--lock", type=Path, default=SSHD_LOCK)
    parser.add_argument("--quiet", action="store_true", help="no line per round")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    sshd = load_sshd_env()
    if sshd is None:
        parser.error("no test sshd (tests/sshd/setup.sh)")
    faults = KILL_FAULTS if args.faults == "kill9" else DB_FAULTS[args.backend]
    print(
        f"faultloop: seed {seed}, {args.rounds} rounds of {', '.join(faults)} on {args.backend}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="kv-faultloop-") as tmp:
        store, drop = make_store(args.backend, Path(tmp))
        try:
            with serving(sshd.tatool_state_dir) as server:
                loop = FaultLoop(
                    store, sshd, api_url=f"http://127.0.0.1:{server.server_address[1]}",
                    seed=seed, faults=faults, tag=f"long-{args.backend}-{args.faults}",
                    log=(lambda line: None) if args.quiet else (lambda line: print(line, flush=True)),
                )  # fmt: skip
                with _flocked(args.lock):
                    loop.setup()
                try:
                    loop.run(
                        range(args.first, args.first + args.rounds),
                        lock=args.lock,
                        chunk=args.chunk,
                    )
                except LoopFailure as exc:
                    print(f"FAILED: {exc}", flush=True)
                    print(json.dumps(loop.tally.summary(), indent=1), flush=True)
                    return 1
                print(json.dumps(loop.tally.summary(), indent=1), flush=True)
        finally:
            dbfaults.restore_all()
            drop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
