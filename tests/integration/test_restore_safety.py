"""Restore never resurrects or destroys (issue 10), and neither side of it needs the file in memory.

A restore of an older backup keeps the key versions made since (unless each is named with
--discard-newer and confirmed), keeps tokens and their revocations, keeps the audit log
and records itself in it. A file that is not a backup, too large, garbage or truncated is
refused with one error line, nothing written, in bounded memory; a backup of a store with
many audit records is written in bounded memory too (peak RSS of a real `keyvault`
process, read with wait4; RLIMIT_AS keeps a regression from taking the machine down).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pty
import select
import subprocess
import sys
import zlib
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, func, insert
from sqlalchemy import select as sql_select

from keyvault import crypto
from keyvault.config import os_actor
from keyvault.db import make_engine, session_factory, transaction
from keyvault.models import AccessToken, AuditRecord, Cluster, Rotation, utcnow
from keyvault.services import backup as service
from keyvault.services.backup.fileformat import header_bytes
from tests.support.cli import Cli, describe, expect, one_error_line, run_process
from tests.support.db import comparable, dump_store
from tests.support.leak_guard import new_key
from tests.support.timeouts import TIMEOUT

MiB = 1 << 20
# No keyvault command here needs more address space than this; without the streaming
# reader, `restore /dev/zero` passes it within a second and dies of MemoryError.
ADDRESS_SPACE_LIMIT = 1536 * MiB


# --- helpers --------------------------------------------------------------------------------


def import_root(cli: Cli, cluster: str, key: str) -> None:
    expect(cli("import", "--cluster", cluster, "--root", input=key + "\n"))


def versions(cli: Cli, cluster: str) -> list[tuple[int, str]]:
    rows = json.loads(
        expect(cli("secrets", "history", "--cluster", cluster, "--root", "--json")).stdout
    )
    return [(r["version"], r["fingerprint"]) for r in rows]


def tokens(cli: Cli) -> dict[str, str]:
    return {
        t["name"]: t["status"] for t in json.loads(expect(cli("token", "list", "--json")).stdout)
    }


def rows(url: str, model) -> list[dict]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            table = model.__table__
            return [dict(r._mapping) for r in conn.execute(sql_select(table).order_by(table.c.id))]
    finally:
        engine.dispose()


def write_rows(url: str, model, values: list[dict]) -> None:
    engine = make_engine(url)
    try:
        with transaction(session_factory(engine)) as session:
            session.execute(insert(model.__table__), values)
    finally:
        engine.dispose()


def audit(action: str, n: int, *, client: str = "127.0.0.1") -> list[dict]:
    now = utcnow()
    return [
        {
            "at": now + timedelta(microseconds=i),
            "token_name": "reader",
            "action": action,
            "cluster": "ta2",
            "scope": "root",
            "version": 1,
            "client": client,
            "outcome": "ok",
        }
        for i in range(n)
    ]


def store_state(url: str) -> dict[str, list]:
    """Every row of every table of the store, as it compares across backup/restore attempts."""
    return comparable(dump_store(url))


@pytest.fixture
def store(cli: Cli, home, tmp_path) -> dict:
    """ta2 with two root versions, a token, two audit records; and its backup file."""
    expect(cli("init"))
    expect(cli("cluster", "add", "ta2", "--open-api-url", "http://ta2:8992"))
    keys = [new_key(), new_key()]
    for key in keys:
        import_root(cli, "ta2", key)
    expect(cli("token", "create", "reader", "--scope", "root:ta2"))
    write_rows(home.database_url, AuditRecord, audit("read", 2))
    path = tmp_path / "before.kvbackup"
    expect(cli("backup", str(path)))
    return {"file": path, "keys": keys, "versions": versions(cli, "ta2")}


# --- newer key versions ---------------------------------------------------------------------


def test_newer_versions_are_refused_and_kept(cli, home, store, tmp_path):
    newer = new_key()
    import_root(cli, "ta2", newer)
    current = store_state(home.database_url)

    for args in (["--replace", "--yes"], ["--replace"]):
        line = one_error_line(cli("restore", str(store["file"]), *args), 1, "--discard-newer")
        assert "1 key version newer than the backup" in line and "ta2 root v3" in line, line
        assert store_state(home.database_url) == current

    # Same numbers, another line of history: v3 exists in both, with different keys.
    expect(cli("backup", str(tmp_path / "with-v3.kvbackup")))
    expect(cli("restore", str(store["file"]), "--replace", "--discard-newer", "--yes"))
    import_root(cli, "ta2", new_key())  # a new v3, not the one in with-v3.kvbackup
    diverged = store_state(home.database_url)
    result = cli("restore", str(tmp_path / "with-v3.kvbackup"), "--replace", "--yes")
    one_error_line(result, 1, "ta2 root v3", "--discard-newer")
    assert store_state(home.database_url) == diverged


def test_discard_newer_lists_each_loss_and_drops_only_when_confirmed(cli, home, store):
    newer = new_key()
    import_root(cli, "ta2", newer)
    (lost,) = [v for v in versions(cli, "ta2") if v[0] == 3]
    current = store_state(home.database_url)

    # Without a terminal --yes is required.
    asked = cli("restore", str(store["file"]), "--replace", "--discard-newer")
    assert asked.exit_code == 2 and "--yes" in asked.stderr, describe(asked)
    assert store_state(home.database_url) == current

    # On a terminal the question lists what would be lost; "n" changes nothing.
    declined = restore_on_terminal(store["file"], answer="n")
    assert f"ta2 root v3 (fingerprint {lost[1]}, created " in declined, declined
    assert newer not in declined
    assert store_state(home.database_url) == current
    accepted = restore_on_terminal(store["file"], answer="y")
    assert f"discarded: ta2 root v3 (fingerprint {lost[1]}" in accepted, accepted
    assert newer not in accepted
    assert versions(cli, "ta2") == store["versions"]


def restore_on_terminal(path: Path, *, answer: str) -> str:
    """`keyvault restore --replace --discard-newer` on a pseudo-terminal; its whole output."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "keyvault", "restore", str(path), "--replace", "--discard-newer"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=dict(os.environ),
    )
    os.close(slave)
    os.write(master, answer.encode() + b"\n")
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], TIMEOUT)
        assert ready, "the restore did not finish"
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    proc.wait(timeout=TIMEOUT)
    return out.decode(errors="replace")


def test_an_unresolved_rotation_is_refused_unless_named(cli, home, store):
    engine = make_engine(home.database_url)
    try:
        with transaction(session_factory(engine)) as session:
            cluster_id = session.scalars(sql_select(Cluster.id)).one()
            now = utcnow()
            session.add(
                Rotation(
                    id="r" + "0" * 31,
                    cluster_id=cluster_id,
                    scope="root",
                    state="needs_recovery",
                    host_label="ops@10.0.0.2",
                    actor="pytest",
                    created_at=now,
                    updated_at=now,
                )
            )
    finally:
        engine.dispose()
    current = store_state(home.database_url)
    result = cli("restore", str(store["file"]), "--replace", "--yes")
    one_error_line(result, 1, "1 unresolved rotation(s) (r000", "rotations recover")
    assert store_state(home.database_url) == current
    result = expect(cli("restore", str(store["file"]), "--replace", "--discard-newer", "--yes"))
    assert "discarded: rotation r000" in result.stdout


def test_a_key_waiting_in_the_spool_is_refused_unless_named(cli, home, store):
    spool = home.path / "spool"
    spool.mkdir(mode=0o700, exist_ok=True)
    (spool / "rspooled.json").write_text("{}")  # its content is not read by restore
    current = store_state(home.database_url)
    one_error_line(
        cli("restore", str(store["file"]), "--replace", "--yes"), 1, "rspooled", "--discard-newer"
    )
    assert store_state(home.database_url) == current
    result = expect(cli("restore", str(store["file"]), "--replace", "--discard-newer", "--yes"))
    assert "discarded: rotation rspooled (a key waiting in the local spool)" in result.stdout
    assert (spool / "rspooled.json").exists()  # a restore never deletes a spooled key


# --- tokens and the audit log ---------------------------------------------------------------


def test_a_revoked_token_stays_revoked_and_new_tokens_stay(cli, home, store):
    expect(cli("token", "revoke", "reader", "--yes"))
    expect(cli("token", "create", "later", "--scope", "root:ta2"))
    before = rows(home.database_url, AccessToken)
    expect(cli("restore", str(store["file"]), "--replace", "--yes"))
    assert tokens(cli) == {"reader": "revoked", "later": "active"}
    assert rows(home.database_url, AccessToken) == before


def access_records(url: str) -> list[dict]:
    """The audit records of accesses and of restores (not the CLI's intent/outcome trail, nor
    the chain's own chain-key records)."""
    return [
        r
        for r in rows(url, AuditRecord)
        if r["phase"] is None and not r["action"].startswith("audit.chain_key_started")
    ]


def test_audit_records_since_the_backup_survive_and_the_restore_is_audited(cli, home, store):
    write_rows(home.database_url, AuditRecord, audit("read", 3, client="10.9.9.9"))
    before = access_records(home.database_url)
    assert len(before) == 5
    expect(cli("restore", str(store["file"]), "--replace", "--yes"))
    after = access_records(home.database_url)
    assert after[:5] == before  # kept as they were, none duplicated by the backup's copies
    (record,) = after[5:]
    digest = hashlib.sha256(store["file"].read_bytes()).hexdigest()
    assert record["action"] == "restore" and record["outcome"] == "ok"
    assert record["actor"] == os_actor(os.environ) and record["token_name"] is None
    assert record["target"] == f"before.kvbackup sha256:{digest[:32]}"


def test_backup_audit_records_the_store_lacks_are_merged(cli, home, store):
    # The store lost its audit log (say, pruned) and wrote a new record with a reused id.
    engine = make_engine(home.database_url)
    try:
        with transaction(session_factory(engine)) as session:
            session.execute(delete(AuditRecord))
    finally:
        engine.dispose()
    write_rows(home.database_url, AuditRecord, [{**audit("denied", 1)[0], "id": 1}])
    expect(cli("restore", str(store["file"]), "--replace", "--yes"))
    after = access_records(home.database_url)
    # The backup's records the store lacks are appended to its chain after a marker.
    assert [r["action"] for r in after] == ["denied", "audit.restored", "read", "read", "restore"]
    assert len({r["id"] for r in rows(home.database_url, AuditRecord)}) == len(
        rows(home.database_url, AuditRecord)
    )


# --- files that are not backups, in bounded memory -------------------------------------------


# Runs ARGV under RLIMIT_AS and writes the peak RSS (KiB) of that one child to PEAK_FILE.
_MEASURE = (
    "import resource, subprocess, sys\n"
    "peak_file, limit = sys.argv[1], int(sys.argv[2])\n"
    "resource.setrlimit(resource.RLIMIT_AS, (limit, limit))\n"
    "rc = subprocess.call(sys.argv[3:], stdin=subprocess.DEVNULL)\n"
    "open(peak_file, 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(rc if rc >= 0 else 128 - rc)\n"
)


def keyvault_measured(tmp_path: Path, *args: str) -> tuple[int, str, str, int]:
    """`keyvault ARGS` under RLIMIT_AS: exit code, stdout, stderr, peak RSS in bytes."""
    peak_file = tmp_path / "peak"
    argv = [sys.executable, "-m", "keyvault", *args]
    limit = str(ADDRESS_SPACE_LIMIT)
    done = run_process([sys.executable, "-c", _MEASURE, str(peak_file), limit, *argv])
    return done.returncode, done.stdout, done.stderr, int(peak_file.read_text()) * 1024


def refused(tmp_path: Path, *args: str, code: int, fragment: str) -> int:
    """The restore exits ``code`` with one ``error:`` line naming ``fragment``; its peak RSS."""
    rc, out, err, peak = keyvault_measured(tmp_path, "restore", *args)
    lines = err.splitlines()
    assert rc == code and len(lines) == 1 and lines[0].startswith("error: "), (rc, err[-500:])
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in out + err
    return peak


def bomb(home, megabytes: int) -> bytes:
    """A validly sealed backup whose body inflates to ``megabytes`` MiB of zeros."""
    ring = crypto.load_keyring(home.master_key_file)
    raw_header = header_bytes(
        {
            "format": 1,
            "created_at": utcnow().isoformat(),
            "master_key_id": ring.active,
            "schema_revision": "x",
            "check_value": base64.b64encode(crypto.check_value(ring, ring.active)).decode(),
        }
    )
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = b"".join(z.compress(bytes(MiB)) for _ in range(megabytes)) + z.flush()
    sealed = crypto.seal(ring, body, service.body_aad(raw_header))
    return raw_header + sealed.wrapped_key + sealed.ciphertext


@pytest.mark.slow
def test_files_that_are_not_backups_are_refused_in_bounded_memory(cli, home, store, tmp_path):
    current = store_state(home.database_url)
    peaks = {
        "/dev/zero": refused(
            tmp_path, "/dev/zero", "--replace", "--yes", code=2, fragment="not a keyvault backup"
        )
    }
    good = store["file"].read_bytes()
    header_end = good.index(b"\n", len(service.MAGIC) + 1)
    header_end = good.index(b"\n", header_end + 1) + 1

    huge = tmp_path / "huge.kvbackup"  # sparse: 2 GiB after a valid header
    with open(huge, "wb") as fh:
        fh.write(good[:header_end])
        fh.truncate(2 << 30)
    peaks["2 GiB file"] = refused(
        tmp_path, str(huge), "--replace", "--yes", code=2, fragment="larger than the restore limit"
    )

    garbage = tmp_path / "garbage.kvbackup"
    garbage.write_bytes(good[:header_end] + os.urandom(64 * MiB))
    peaks["64 MiB garbage"] = refused(
        tmp_path, str(garbage), "--replace", "--yes", code=1, fragment="integrity check"
    )

    truncated = tmp_path / "truncated.kvbackup"
    truncated.write_bytes(good[: len(good) - 10])
    peaks["truncated"] = refused(
        tmp_path, str(truncated), "--replace", "--yes", code=1, fragment="integrity check"
    )

    inflating = tmp_path / "bomb.kvbackup"
    inflating.write_bytes(bomb(home, 512))
    peaks["512 MiB bomb, 32M limit"] = refused(
        tmp_path,
        str(inflating),
        "--max-size",
        "32M",
        "--replace",
        "--yes",
        code=2,
        fragment="larger than the restore limit of 33554432",
    )
    peaks["valid backup, 1K limit"] = refused(
        tmp_path,
        str(store["file"]),
        "--max-size",
        "1K",
        "--replace",
        "--yes",
        code=2,
        fragment="larger than the restore limit",
    )
    assert store_state(home.database_url) == current
    # Each of them stays within a small, fixed budget, whatever the file's size.
    assert max(peaks.values()) < 200 * MiB, {k: v // MiB for k, v in peaks.items()}
    print("peak RSS (MiB):", {k: v // MiB for k, v in peaks.items()})


# The big store: ~88 MiB of audit records' detail, as 40,000 records of 2.25 KiB (a long ``detail``)
# rather than 300,000 short ones: the same volume a backup held whole would need, at a
# seventh of the rows (each row costs the backup and the restore time, not memory).
BIG_RECORDS = 40_000
DETAIL_BYTES = 2304


@pytest.mark.slow
def test_a_backup_of_many_audit_records_streams(cli, home, store, tmp_path):
    rc, _, err, small_peak = keyvault_measured(tmp_path, "backup", str(tmp_path / "small.kvbackup"))
    assert rc == 0, err
    batch = audit("read", BIG_RECORDS // 4)
    for part in range(4):  # each record's own detail: no two rows share a string
        write_rows(
            home.database_url,
            AuditRecord,
            [
                {**r, "detail": f"{part}:{i:06d} ".ljust(DETAIL_BYTES, "d")}
                for i, r in enumerate(batch)
            ],
        )
    engine = make_engine(home.database_url)
    try:
        with engine.connect() as conn:
            records = conn.execute(sql_select(func.count()).select_from(AuditRecord)).scalar_one()
            volume = conn.execute(
                sql_select(func.sum(func.length(AuditRecord.detail)))
            ).scalar_one()
    finally:
        engine.dispose()
    assert volume >= BIG_RECORDS * DETAIL_BYTES > 2 * 40 * MiB  # twice the bound on the growth
    records += 1  # the backup's own intent record is in it
    rc, out, err, big_peak = keyvault_measured(tmp_path, "backup", str(tmp_path / "big.kvbackup"))
    assert rc == 0, err
    assert f"{records} audit_log" in out and records > BIG_RECORDS
    print(
        f"backup peak RSS: {small_peak // MiB} MiB small store, {big_peak // MiB} MiB with"
        f" {BIG_RECORDS:,} audit records ({volume // MiB} MiB of detail)"
    )
    assert big_peak - small_peak < 40 * MiB, (small_peak // MiB, big_peak // MiB)
    # And it restores, every record there once.
    expect(cli("restore", str(tmp_path / "big.kvbackup"), "--replace", "--yes"))
    # Every access record once, and the restore's own record (the CLI trail aside).
    assert len(access_records(home.database_url)) == BIG_RECORDS + 2 + 1
