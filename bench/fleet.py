"""Benchmark: how long after a rotation's commit every consumer holds the new key.

One `keyvault serve` on 127.0.0.1 (SQLite in a temp KEYVAULT_HOME unless --database-url),
one app key, and a fleet of consumers of it on this machine:
  --agents N   `keyvault agent` processes, each keeping its own file current
  --runs N     `keyvault run` supervisors, each restarting a child that writes the key from
               its environment to a file at start (so "holds the key" is observable)
  --clients N  `keyvault_client.Client` watchers (`on_rotate`) in this process
Then --rotations times, one at a time: a new key is stored with `keyvault import` (another
process, as an operator would), its commit time is the `secret.rotated` event's
created_at, and the bench waits until every consumer holds the new key (files polled every
millisecond or two, callbacks timestamped). It reports, per rotation, the time from the
commit until the last consumer had it (p50 / p99 / max over the rotations), and the same
per consumer. No key or token is printed.

    python bench/fleet.py [--agents 8] [--runs 6] [--clients 6] [--rotations 20]
                          [--database-url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLUSTER, APPID = "C", "A"
DEADLINE = 60.0  # seconds for one rotation to reach everyone: only a hang reaches it
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def new_key() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(64))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class Fleet:
    def __init__(self, tmp: Path, args: argparse.Namespace) -> None:
        self.tmp = tmp
        self.args = args
        self.kv = [sys.executable, "-m", "keyvault"]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KEYVAULT_")} | {
            "KEYVAULT_HOME": str(tmp / "home"),
            "KEYVAULT_SERVE_WEBHOOKS": "0",
            "KEYVAULT_SERVE_SCHEDULER": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        if args.database_url:
            self.env["KEYVAULT_DATABASE_URL"] = args.database_url
        self.procs: list[subprocess.Popen] = []
        self.files: list[Path] = []
        self.watch_times: list[dict[int, float]] = []
        self.clients: list = []

    def cli(self, *args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [*self.kv, *args], input=stdin, capture_output=True, text=True, env=self.env,
            timeout=300, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"keyvault {args[0]} failed: {done.stderr.strip()[-500:]}")
        return done.stdout

    def setup(self) -> None:
        self.cli("init")
        self.cli("cluster", "add", CLUSTER, "--open-api-url", "http://127.0.0.1:9")
        self.cli("import", "--cluster", CLUSTER, "--appid", APPID, stdin=new_key() + "\n")
        out = self.cli("token", "create", "fleet", "--scope", f"app:{CLUSTER}/{APPID}", "--json")
        self.token = json.loads(out)["token"]
        self.token_file = self.tmp / "token"
        self.token_file.write_text(self.token + "\n")
        self.token_file.chmod(0o600)
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.spawn([*self.kv, "serve", "--port", str(port), "--no-access-log"], "serve")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with _NO_PROXY.open(f"{self.url}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("keyvault serve did not become healthy")

    def spawn(self, argv: list[str], name: str) -> None:
        with open(self.tmp / f"{name}-{len(self.procs)}.log", "wb") as log:
            self.procs.append(
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=self.env,
                    cwd=self.tmp,
                )
            )

    def start_consumers(self) -> None:
        base = ["--addr", self.url, "--token-file", str(self.token_file), "--cluster", CLUSTER]
        base += ["--appid", APPID, "--wait", "25"]
        for i in range(self.args.agents):
            path = self.tmp / f"agent-{i}.key"
            self.files.append(path)
            self.spawn([*self.kv, "agent", *base, "--file", str(path), "-q"], f"agent{i}")
        for i in range(self.args.runs):
            path = self.tmp / f"run-{i}.key"
            self.files.append(path)
            script = f'printf "%s\\n" "$TA_API_KEY" > {shlex.quote(str(path))}.tmp && '
            script += (
                f"mv {shlex.quote(str(path))}.tmp {shlex.quote(str(path))}; exec sleep 1000000"
            )
            argv = [*self.kv, "run", *base[:-2], "--env", "TA_API_KEY", "--grace", "5", "-q"]
            self.spawn([*argv, "--wait", "25", "--", "sh", "-c", script], f"run{i}")
        from keyvault_client import Client

        for _ in range(self.args.clients):
            seen: dict[int, float] = {}
            kv = Client(self.url, token_file=str(self.token_file), consumer="fleet-client")
            kv.get_app(CLUSTER, APPID)
            self.clients.append(kv)
            kv.on_rotate(lambda r, seen=seen: seen.setdefault(r.version, time.time()), wait=25)
            self.watch_times.append(seen)

    def commit_time(self, version: int) -> float:
        """created_at of the secret.rotated event that made ``version``."""
        request = urllib.request.Request(
            f"{self.url}/v1/events?after=0", headers={"Authorization": f"Bearer {self.token}"}
        )
        after = 0
        while True:
            request.full_url = f"{self.url}/v1/events?after={after}"
            with _NO_PROXY.open(request, timeout=10) as resp:
                body = json.loads(resp.read())
            for event in body["events"]:
                if event["payload"].get("new_version") == version:
                    at = datetime.fromisoformat(event["created_at"])
                    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()
            if not body["events"]:
                raise SystemExit(f"no event for version {version}")
            after = body["last_id"]

    def wait_all(self, key: str, version: int) -> list[float]:
        """Poll until every consumer holds ``key``; the time each was first seen holding it."""
        want = key + "\n"
        got: dict[int, float] = {}
        deadline = time.monotonic() + DEADLINE
        while len(got) < len(self.files) or any(version not in w for w in self.watch_times):
            for i, path in enumerate(self.files):
                if i not in got:
                    try:
                        if path.read_text() == want:
                            got[i] = time.time()
                    except OSError:
                        pass
            if time.monotonic() > deadline:
                raise SystemExit(f"version {version} did not reach every consumer in {DEADLINE}s")
            time.sleep(0.001)
        return list(got.values()) + [w[version] for w in self.watch_times]

    def wait_all_initial(self) -> None:
        """Every file consumer wrote version 1 (the watchers hold it already)."""
        deadline = time.monotonic() + 120
        while not all(p.exists() and p.stat().st_size for p in self.files):
            if time.monotonic() > deadline:
                raise SystemExit("the consumers did not all start")
            time.sleep(0.01)

    def stop(self) -> None:
        for kv in self.clients:
            kv.close()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rotations", type=int, default=20)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kv-fleet-") as tmp:
        fleet = Fleet(Path(tmp), args)
        try:
            fleet.setup()
            fleet.start_consumers()
            fleet.wait_all_initial()
            return report(fleet, args)
        finally:
            fleet.stop()


def report(fleet: Fleet, args: argparse.Namespace) -> int:
    everyone, each = [], []
    for version in range(2, args.rotations + 2):
        key = new_key()
        fleet.cli("import", "--cluster", CLUSTER, "--appid", APPID, stdin=key + "\n")
        seen = fleet.wait_all(key, version)
        committed = fleet.commit_time(version)
        lags = [max(0.0, t - committed) for t in seen]
        everyone.append(max(lags))
        each.extend(lags)
    consumers = args.agents + args.runs + args.clients
    db = "PostgreSQL" if args.database_url and "postgres" in args.database_url else "SQLite"
    print(
        f"fleet: {consumers} consumers ({args.agents} agents, {args.runs} run, "
        f"{args.clients} Client watchers), {args.rotations} rotations, {db}"
    )
    for name, values in (("every consumer holds it", everyone), ("per consumer", each)):
        print(
            f"  {name:<24} p50 {statistics.median(values) * 1000:7.0f} ms   "
            f"p99 {percentile(values, 99) * 1000:7.0f} ms   max {max(values) * 1000:7.0f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
