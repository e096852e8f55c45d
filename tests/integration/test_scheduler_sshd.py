"""Scheduled and bulk rotation through the real OpenSSH sshd of tests/sshd/setup.sh
(issue 5, "Acceptance"): three `rotate due` processes racing on PostgreSQL, and a bulk
rotation of 100 apps with two failing in the ta-tool emulator.

Every rotation really runs the emulator's ``ta-tool`` as the ta user on the test sshd
(an emulator state of the test's own, see ``emulator``), and every key is checked against
the emulator's state; generations are compared as *deltas*. keyvault runs as
real processes (``python -m keyvault``) with the ``home`` environment of the db fixtures.
Keys are compared with ``==`` in helpers that report APPIDs and fingerprints only; output
shown in a failure is masked. Nothing here sleeps: processes are waited for with a bound.
"""

from __future__ import annotations

import json
import os
import pty
import pwd
import re
import secrets as pysecrets
import select as io_select
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from keyvault import crypto
from keyvault.config import load_settings
from keyvault.db import make_engine, session_factory, transaction
from keyvault.models import CURRENT, Lease, Secret, SecretVersion
from keyvault.sandbox import state as st
from keyvault.scope import app_scope
from keyvault.services import clusters, secrets
from keyvault.services.scheduler import LEASE
from keyvault.services.store import open_keyring
from tests.support.cli import KEYVAULT, run_process, spawn_process
from tests.support.cluster import TaTool, install_ta_tool
from tests.support.timeouts import TIMEOUT

PYTHON = sys.executable
PROCESS_TIMEOUT = 2 * TIMEOUT  # a bound for a whole bulk run, never a duration that must elapse
KEY_TOKEN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z0-9]{64}(?![A-Za-z0-9])")
TA_PENDING = Path(pwd.getpwnam("ta").pw_dir) / ".keyvault" / "pending"
PROGRESS_LABEL = re.compile(r"rotating \d+ keys")

SQLITE_ONLY = pytest.mark.parametrize("blank_database", ["sqlite"], indirect=True)
POSTGRES_ONLY = pytest.mark.parametrize("blank_database", ["postgres"], indirect=True)


def masked(text: str) -> str:
    return KEY_TOKEN.sub("<64-char token>", text)


@pytest.fixture
def emulator(sshd_env, tmp_path):
    """A ta-tool emulator of this test alone, run as ta through the test sshd.

    The emulator of tests/sshd/setup.sh (/var/lib/ta-sim) is one state shared by every test
    run on the machine, and its noise options are global: a run next to this one clears
    or sets them (`fail_apps`, `output_mode`, holds) under this test's feet. So this test
    gets its own state dir (owned by ta) and wrapper, beside the shared one, and points its
    cluster's generate commands at it. The same emulator code, the same python, the same
    sshd, `su - ta` and pending files. At the end, the SHA-256 log of the keys it made is
    kept under tmp_path, where tests/support/leak_guard.py looks for it."""
    base = Path(sshd_env.tatool_state_dir).parent / f"kvtest-ta-sim-{pysecrets.token_hex(6)}"
    base.mkdir(mode=0o755)
    try:
        os.chmod(base, 0o755)  # ta must traverse it (mkdir's mode passes through umask)
        ta = install_ta_tool(base, owner="ta", python=sshd_env.python or PYTHON, pythonpath=None)
        os.chmod(ta.tool.parent, 0o755)
        yield ta
    finally:
        log = base / "state" / st.FINGERPRINT_LOG
        if log.exists():
            (tmp_path / "emulator-keys").mkdir(exist_ok=True)
            shutil.copyfile(log, tmp_path / "emulator-keys" / st.FINGERPRINT_LOG)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def openapi(emulator):
    """The TA Open API emulator on this test's emulator state, in a thread."""
    from keyvault.sandbox.openapi import serving

    with serving(emulator.state_dir) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}"


class Harness:
    """A keyvault home on one database, next to the test sshd and its emulator."""

    def __init__(
        self, *, cli, sshd, emulator: TaTool, api_url: str, backend: str, tmp_path: Path
    ) -> None:
        self.cli, self.sshd, self.api_url, self.backend, self.tmp_path = (
            cli,
            sshd,
            api_url,
            backend,
            tmp_path,
        )
        self.state_dir, self.tool = emulator.state_dir, emulator.tool
        self._engine = None

    # -- keyvault -----------------------------------------------------------------
    def __call__(self, *args: str, code: int = 0):
        """keyvault in-process (CliRunner), for set-up and reading."""
        result = self.cli(*args)
        if result.exit_code != code:
            pytest.fail(
                f"keyvault {' '.join(args[:3])}... exited {result.exit_code}, not {code}; "
                f"stderr: {masked(result.stderr.strip())!r}",
                pytrace=False,
            )
        return result

    def json(self, *args: str):
        return json.loads(self(*args, "--json").stdout)

    def argv(self, *args: str) -> list[str]:
        return [*KEYVAULT, *args]

    def run(self, *args: str) -> subprocess.CompletedProcess:
        """keyvault as a real process (stdout and stderr are pipes: not a terminal)."""
        return run_process(self.argv(*args), cwd=self.tmp_path, timeout=PROCESS_TIMEOUT)

    @property
    def factory(self):
        if self._engine is None:
            self._engine = make_engine(load_settings().database_url)
        return session_factory(self._engine)

    def close(self) -> None:
        # The remote tombstones of this test's rotations: debris now.
        for row in self.json("rotations", "list"):
            for path in TA_PENDING.glob(f"{row['id']}.*"):
                path.unlink(missing_ok=True)
        if self._engine is not None:
            self._engine.dispose()

    # -- set-up ----------------------------------------------------------------------
    def apps(self, tag: str, count: int) -> list[str]:
        apps = [f"kvit-{tag}-{self.backend}-{n:03d}" for n in range(1, count + 1)]
        st.add_apps(self.state_dir, apps)
        return apps

    def cluster(self, tag: str, apps) -> str:
        """A cluster on the Open API emulator (project ids of ``apps``) with the test sshd as
        its one host (root, then `su - ta`), host key pinned, ta-tool the test's emulator."""
        name = f"{tag}-{self.backend}"
        self("cluster", "add", name, "--open-api-url", self.api_url, "--login-name", "root")
        with transaction(self.factory) as s:
            clusters.set_options(
                s,
                keyring=open_keyring(s, settings=load_settings()),
                name=name,
                generate_root_command=f"{self.tool} generate_root_secret",
                generate_app_command=f"{self.tool} generate_api_secret -appid {{appid}}",
            )
        state = st.read_state(self.state_dir)
        ids = [
            a for app in apps for a in ("--project-id", f"{app}={state['apps'][app]['project_id']}")
        ]
        self("cluster", "set", name, *ids)
        self(
            "host",
            "add",
            name,
            self.sshd.host,
            "--port",
            str(self.sshd.port),
            "--user",
            "root",
            "--identity",
            str(self.sshd.identity("root")),
            "--become",
            "su",
            "--fingerprint",
            self.sshd.host_key_fingerprint,
        )
        return name

    def backdate(self, cluster: str, apps, by: timedelta) -> None:
        """Make the current keys of ``apps`` older by ``by`` (an UPDATE of created_at)."""
        with transaction(self.factory) as s:
            cid = clusters.get_cluster(s, name=cluster).id
            rows = s.scalars(
                select(SecretVersion)
                .join(Secret, SecretVersion.secret_id == Secret.id)
                .where(
                    Secret.cluster_id == cid,
                    Secret.scope.in_([f"app:{a}" for a in apps]),
                    SecretVersion.state == CURRENT,
                )
            ).all()
            assert len(rows) == len(apps)
            for row in rows:
                row.created_at = row.created_at - by

    # -- checks ------------------------------------------------------------------------
    def gens(self, apps) -> dict[str, int]:
        state = st.read_state(self.state_dir)
        return {a: state["apps"][a]["generations"] for a in apps}

    def check_keys(self, cluster: str, apps, what: str) -> None:
        """Every stored current key equals the emulator's valid key (fingerprints if not)."""
        valid = {
            a: e["key"] for a, e in st.read_state(self.state_dir)["apps"].items() if a in set(apps)
        }
        wrong = []
        with transaction(self.factory) as s:
            keyring = open_keyring(s, settings=load_settings())
            for app in apps:
                stored = secrets.reveal(
                    keyring, secrets.get_version(s, cluster_name=cluster, scope=app_scope(app))
                )
                if not valid[app] or stored != valid[app]:
                    wrong.append(
                        f"{app}: keyvault {crypto.fingerprint(stored)}, emulator "
                        f"{crypto.fingerprint(valid[app]) if valid[app] else None}"
                    )
        if wrong:
            pytest.fail(
                f"{what}: {len(wrong)} stored key(s) differ from the emulator's: {wrong[:5]}",
                pytrace=False,
            )

    def rotations(self, cluster: str) -> list[dict]:
        return self.json("rotations", "list", "--cluster", cluster)


@pytest.fixture
def kv(cli, database, sshd_env, emulator, openapi, tmp_path):
    harness = Harness(
        cli=cli,
        sshd=sshd_env,
        emulator=emulator,
        api_url=openapi,
        backend=database.backend,
        tmp_path=tmp_path,
    )
    harness("init")
    try:
        yield harness
    finally:
        harness.close()


def assert_pending_cleaned(rotation_ids) -> None:
    """No pending file of these rotations is left on the host (only key-less tombstones)."""
    left = sorted(
        p.name for rid in rotation_ids for p in TA_PENDING.glob(f"{rid}.*") if p.suffix != ".done"
    )
    assert left == [], f"pending files left under {TA_PENDING}: {left[:10]}"
    missing = [rid for rid in rotation_ids if not (TA_PENDING / f"{rid}.done").exists()]
    assert missing == [], f"rotations without a tombstone: {missing[:10]}"


# ---------------------------------------------------------------- three `rotate due` at once


@POSTGRES_ONLY
def test_three_rotate_due_processes_rotate_each_due_scope_once(kv):
    apps = kv.apps("due3", 7)
    due, fresh = apps[:6], apps[6]
    cluster = kv.cluster("due3", apps)
    first = kv.json("rotate", "app", "--cluster", cluster, "--yes", *apps)
    assert first["summary"] == {"rotated": 7, "failed": 0, "skipped": 0}, first
    kv.backdate(cluster, due, timedelta(days=2))
    kv("policy", "set", "--cluster", cluster, "--all-apps", "--max-age", "1d")
    before = kv.gens(apps)

    procs = [
        spawn_process(kv.argv("rotate", "due", "--json"), cwd=kv.tmp_path) for _ in range(3)
    ]  # all started before any is waited for: they race
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=PROCESS_TIMEOUT)
            outputs.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    for code, _out, err in outputs:
        assert code == 0, f"exit {code}; stderr: {masked(err.strip())!r}"
    reports = [json.loads(out) for _code, out, _err in outputs]

    # Each due scope rotated exactly once, by one process; the emulator counted one generation each.
    rotated = sorted(
        r["scope"] for rep in reports for r in rep["results"] if r["status"] == "rotated"
    )
    assert rotated == sorted(f"app:{a}" for a in due)
    after = kv.gens(apps)
    assert {a: after[a] - before[a] for a in apps} == {**dict.fromkeys(due, 1), fresh: 0}
    actors = [rep for rep in reports if any(r["status"] == "rotated" for r in rep["results"])]
    assert len(actors) == 1 and actors[0]["lease"] == "acquired"
    assert {r["scope"]: r["status"] for r in actors[0]["results"]} == {
        **{f"app:{a}": "rotated" for a in due},
        f"app:{fresh}": "skipped",
    }
    for rep in reports:
        if rep is actors[0]:
            continue
        if (
            rep["lease"] == "held elsewhere"
        ):  # the lease was held: it says by whom, and does nothing
            assert " until " in rep["holder"] and rep["results"] == [], rep
        else:  # it came after the first runner: nothing was due any more
            assert rep["lease"] == "acquired", rep
            assert {r["status"] for r in rep["results"]} == {"skipped"}, rep
            assert all(r["reason"].startswith("not due") for r in rep["results"]), rep
    kv.check_keys(cluster, apps, "after three racing `rotate due`")

    rows = [r for r in kv.rotations(cluster) if r["actor"] == "scheduler"]
    assert sorted(r["scope"] for r in rows) == sorted(f"app:{a}" for a in due)
    assert {(r["state"], r["cleaned_up"], r["verify_state"]) for r in rows} == {
        ("completed", True, "verified")
    }
    assert_pending_cleaned([r["id"] for r in rows])
    with transaction(kv.factory) as s:
        lease = s.get(Lease, LEASE)
        assert (lease.holder, lease.expires_at) == (None, None), "the lease was not given back"


# ------------------------------------------------------------------------- bulk: 100 apps


@pytest.mark.slow  # 100 rotations through the real sshd, twice
@pytest.mark.parametrize("blank_database", ["sqlite", "postgres"], indirect=True)
def test_bulk_rotation_of_100_apps_with_two_failing(kv):
    apps = kv.apps("bulk", 100)
    failing = [apps[16], apps[61]]
    # Two more apps for `--all`: one keyvault knows only from its store (no project id),
    # one only from its project id (no key yet).
    store_only, pid_only = f"kvit-bulk-{kv.backend}-store-only", f"kvit-bulk-{kv.backend}-pid-only"
    st.add_apps(kv.state_dir, [store_only, pid_only])
    cluster = kv.cluster("bulk", [*apps, pid_only])
    # The two failing apps have a key already: it must stay current (and valid).
    pre = kv.json("rotate", "app", "--cluster", cluster, "--yes", *failing, store_only)
    assert pre["summary"]["rotated"] == 3, pre
    before = kv.gens(apps)
    st.set_noise(kv.state_dir, fail_apps=failing)

    done = kv.run(
        "rotate", "app", "--cluster", cluster, *apps, "--yes", "--concurrency", "4", "--json"
    )
    st.set_noise(kv.state_dir, fail_apps=None)
    assert done.returncode == 1, f"exit {done.returncode}; stderr: {masked(done.stderr.strip())!r}"
    assert not PROGRESS_LABEL.search(done.stderr), masked(done.stderr)  # --json, and not a terminal
    out = json.loads(done.stdout)
    assert sorted(out) == ["results", "summary"] and out["summary"]["skipped"] == 0
    rotated = [o for o in out["results"] if o["error"] is None]
    failed = [o for o in out["results"] if o["status"] == "failed"]
    assert len(rotated) + len(failed) == len(out["results"])
    assert sorted(o["scope"] for o in rotated) == sorted(
        f"app:{a}" for a in apps if a not in failing
    )
    assert {
        (o["state"], o["cleaned_up"], o["verify_state"], o["new_version"]) for o in rotated
    } == {("completed", True, "verified", 1)}
    assert sorted(f["scope"] for f in failed) == sorted(f"app:{a}" for a in failing)
    for f in failed:
        reason = f"{f['error']['message']}; {f['error']['hint']}"
        assert "ta-tool failed" in reason and "ERROR: internal error" in reason, f
        assert "nothing was generated" in reason and f["rotation_id"], f

    after = kv.gens(apps)
    assert {a: after[a] - before[a] for a in apps} == {a: (0 if a in failing else 1) for a in apps}
    kv.check_keys(cluster, apps, "after the bulk rotation")
    rows = kv.rotations(cluster)
    by_id = {r["id"]: r for r in rows}
    assert {
        (by_id[o["rotation_id"]]["state"], by_id[o["rotation_id"]]["cleaned_up"]) for o in rotated
    } == {("completed", True)}
    assert {by_id[f["rotation_id"]]["state"] for f in failed} == {"failed"}
    assert (
        sorted(r["state"] for r in rows) == ["completed"] * 101 + ["failed"] * 2
    )  # 98 + the 3 earlier ones
    assert_pending_cleaned([r["id"] for r in rows if r["state"] == "completed"])
    # A failed ta-tool's output is kept on the host (it is never deleted unread), and holds no key.
    for f in failed:
        kept = TA_PENDING / f"{f['rotation_id']}.out"
        assert kept.exists() and not KEY_TOKEN.search(kept.read_text(errors="replace"))

    # --all: every app keyvault knows (stored secrets and project ids); text output, not a terminal.
    known = [*apps, store_only, pid_only]
    before = kv.gens(known)
    done = kv.run("rotate", "app", "--cluster", cluster, "--all", "--yes", "--concurrency", "8")
    assert done.returncode == 0, f"exit {done.returncode}; stderr: {masked(done.stderr.strip())!r}"
    assert not PROGRESS_LABEL.search(done.stderr), masked(done.stderr)
    assert "summary: 102 rotated, 0 failed, 0 skipped" in done.stderr, masked(done.stderr)
    lines = {line.split(":")[1]: line for line in done.stdout.splitlines()}
    assert sorted(lines) == sorted(known), masked(done.stdout[:500])
    assert lines[store_only].endswith("verify skipped")  # no project id: nothing to check it with
    assert lines[pid_only].split(": ", 1)[1].startswith("v1 ") and "(was" not in lines[pid_only]
    assert all(lines[a].endswith("verify verified") for a in [*apps, pid_only]), masked(
        done.stdout[:500]
    )
    assert not KEY_TOKEN.search(done.stdout + done.stderr), "a key-shaped token was printed"
    after = kv.gens(known)
    assert {a: after[a] - before[a] for a in known} == dict.fromkeys(known, 1)
    kv.check_keys(cluster, known, "after `rotate app --all`")
    rows = kv.rotations(cluster)
    assert sorted(r["state"] for r in rows) == ["completed"] * 203 + ["failed"] * 2
    assert all(r["cleaned_up"] for r in rows if r["state"] == "completed")
    assert_pending_cleaned([r["id"] for r in rows if r["state"] == "completed"])


def _run_on_terminal(kv: Harness, *args: str) -> tuple[int, str, str]:
    """keyvault with stderr on a pseudo-terminal (stdout a pipe); returns code, stdout, terminal text."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            kv.argv(*args),
            stdout=subprocess.PIPE,
            stderr=slave,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=kv.tmp_path,
            env=dict(os.environ),
        )
    finally:
        os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + PROCESS_TIMEOUT
    try:
        while time.monotonic() < deadline:  # ends at EOF (EIO once the child closed the terminal)
            ready, _, _ = io_select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        os.close(master)
    return proc.returncode, out, b"".join(chunks).decode("utf-8", "replace")


@SQLITE_ONLY
def test_progress_bar_only_on_a_terminal_and_never_with_json(kv):
    apps = kv.apps("bar", 3)
    cluster = kv.cluster("bar", apps)
    code, out, terminal = _run_on_terminal(
        kv, "rotate", "app", "--cluster", cluster, *apps, "--yes"
    )
    assert code == 0, masked(terminal)
    assert "rotating 3 keys" in terminal and "3/3" in terminal, masked(terminal)
    assert "summary: 3 rotated, 0 failed, 0 skipped" in terminal
    code, out, terminal = _run_on_terminal(
        kv, "rotate", "app", "--cluster", cluster, *apps, "--yes", "--json"
    )
    assert code == 0, masked(terminal)
    assert not PROGRESS_LABEL.search(terminal), masked(terminal)
    assert json.loads(out)["summary"]["rotated"] == 3
    assert not KEY_TOKEN.search(out + terminal), "a key-shaped token was printed"
    kv.check_keys(cluster, apps, "after rotating on a terminal")
