"""Benchmark: milliseconds per rotated key through the real sshd, beside two baselines.

Needs the test sshd made by `tests/sshd/setup.sh` (root). Measured in one run:
  floor  local `su - ta -c 'ta-tool generate_api_secret -appid X'` (no SSH, no storage)
  naive  `ssh root@host "su - ta -c 'ta-tool ...'"` with the OpenSSH client, one connection per key
  keyvault  `keyvault rotate app --cluster C APP1 ... APPn --yes --concurrency N` (journal,
            pending file, parse, encrypted store, cleanup, verify skipped) in one CLI process,
            sequentially (N=1) and with each --concurrency given; the CLI's start-up is
            included. Bulk runs batch up to `rotation.batch_size` ta-tool calls per channel
            (docs/rotation.md), so the per-key cost of an sshd session and su login is shared.
The baselines run on a sample of the apps (--baseline-sample) to keep the run short;
they are per key either way. Methods take turns within each of --repeat rounds and the
median is reported. Keys are generated and discarded; none is printed.

    python bench/rotation.py [--apps 200] [--concurrency 4 8] [--database-url URL]

The last line compares the best keyvault row with issue 5's target: at most 1.5x the
floor per key and at least 20x faster than the naive loop.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--apps", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--baseline-sample", type=int, default=50)
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds; each round measures every method once, in turn, and the median "
        "round is reported, so a slow spell of the machine hits all methods alike",
    )
    parser.add_argument("--database-url")
    parser.add_argument(
        "--sshd-json",
        default=os.environ.get("KEYVAULT_TEST_SSHD", "/var/lib/keyvault-test/sshd.json"),
    )
    args = parser.parse_args()
    if not 1 <= args.apps <= 1000:
        parser.error("--apps must be 1..1000")
    if not 1 <= args.repeat <= 9:
        parser.error("--repeat must be 1..9")
    env_file = Path(args.sshd_json)
    if not env_file.exists():
        print(
            f"no sshd environment at {env_file}: run tests/sshd/setup.sh as root first",
            file=sys.stderr,
        )
        return 2
    sshd = json.loads(env_file.read_text())
    from keyvault.sandbox import state

    state_dir = sshd["tatool_state_dir"]
    tag = f"b{os.getpid()}"
    apps = [f"{tag}-{i}" for i in range(args.apps)]
    sample = apps[: max(1, min(args.apps, args.baseline_sample))]
    state.add_apps(state_dir, apps)
    identity = sshd["users"]["root"]["identity"]
    known = sshd["known_hosts_file"]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "check": True}

    def floor():
        for app in sample:
            subprocess.run(
                ["su", "-", "ta", "-c", f"ta-tool generate_api_secret -appid {shlex.quote(app)}"],
                **quiet,
            )

    def naive():
        for app in sample:
            remote = "su - ta -c " + shlex.quote(
                f"ta-tool generate_api_secret -appid {shlex.quote(app)}"
            )
            subprocess.run(
                [
                    "ssh",
                    "-i",
                    identity,
                    "-p",
                    str(sshd["port"]),
                    "-o",
                    f"UserKnownHostsFile={known}",
                    "-o",
                    "StrictHostKeyChecking=yes",
                    "-o",
                    "BatchMode=yes",
                    f"root@{sshd['host']}",
                    remote,
                ],
                **quiet,
            )

    with tempfile.TemporaryDirectory(prefix="kv-bench-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYVAULT_")}
        env["KEYVAULT_HOME"] = home
        if args.database_url:
            env["KEYVAULT_DATABASE_URL"] = args.database_url
        kv = [sys.executable, "-m", "keyvault"]
        setup = [
            ["init"],
            ["cluster", "add", "bench", "--open-api-url", "http://127.0.0.1:9"],
            [
                "host",
                "add",
                "bench",
                sshd["host"],
                "--port",
                str(sshd["port"]),
                "--identity",
                identity,
                "--fingerprint",
                sshd["host_key_fingerprint"],
            ],
        ]
        for cmd in setup:
            subprocess.run(kv + cmd, env=env, **quiet)

        def keyvault(concurrency):
            def run():
                subprocess.run(
                    [
                        *kv,
                        "rotate",
                        "app",
                        "--cluster",
                        "bench",
                        *apps,
                        "--yes",
                        "--json",
                        "--concurrency",
                        str(concurrency),
                    ],
                    env=env,
                    **quiet,
                )

            return run

        methods = [
            ("floor: local su - ta -c ta-tool", len(sample), floor),
            ('naive: ssh host "su - ta -c ..." per key', len(sample), naive),
            ("keyvault rotate app, sequential", args.apps, keyvault(1)),
        ]
        methods += [
            (f"keyvault rotate app, --concurrency {c}", args.apps, keyvault(c))
            for c in args.concurrency
        ]
        times: dict[str, list[float]] = {label: [] for label, _, _ in methods}
        for _ in range(args.repeat):  # every round re-rotates the same keys
            for label, keys, fn in methods:
                times[label].append(timed(fn) * 1000 / keys)
    rows = [(label, statistics.median(times[label])) for label, _, _ in methods]
    floor_ms, naive_ms = rows[0][1], rows[1][1]
    print(
        f"rotation benchmark: {args.apps} app keys through sshd {sshd['host']}:{sshd['port']}, "
        f"median of {args.repeat} rounds (min-max in brackets)"
    )
    print(f"{'method':44} {'ms/key':>8} {'(min-max)':>15} {'x floor':>8} {'naive/this':>11}")
    for label, ms in rows:
        spread = f"({min(times[label]):.1f}-{max(times[label]):.1f})"
        print(f"{label:44} {ms:8.1f} {spread:>15} {ms / floor_ms:8.2f} {naive_ms / ms:11.1f}")
    label, best = min(rows[2:], key=lambda row: row[1])
    met = best <= 1.5 * floor_ms and naive_ms / best >= 20
    print(
        f"target (<= 1.5x floor, >= 20x naive): {'met' if met else 'NOT met'} by {label.split(', ')[-1]}: "
        f"{best / floor_ms:.2f}x floor, {naive_ms / best:.1f}x faster than naive"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
