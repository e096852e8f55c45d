"""Benchmark: what consumer tracking costs the key read (docs/propagation.md), in one run.

The keyvault side of bench/serve.py (the same setup, wrk and checks), twice per round: one
`keyvault serve` with tracking (the default) and one with KEYVAULT_TRACK_CONSUMERS=0, each on
its own temporary store, measured alternately for --rounds rounds so that the machine's
drift hits both alike. wrk sends `X-Keyvault-Consumer` (one steady consumer per run, as a
fleet member would). Needs wrk only.

    python bench/tracking.py [--seconds 5] [--rounds 4] [--warmup 2] [--database-url URL]

A PostgreSQL --database-url must name an empty scratch database per side: give two, comma
separated (tracking on, then off); SQLite (the default) needs nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import LOADS, BenchError, Keyvault, WrkResult, parse_wrk

CONSUMER_HEADER = "X-Keyvault-Consumer: bench-consumer-1"


class _Side(Keyvault):
    def __init__(self, tmp: Path, args: argparse.Namespace, track: bool) -> None:
        super().__init__(tmp, args, sys.executable)
        self.track = track
        self.env["KEYVAULT_TRACK_CONSUMERS"] = "1" if track else "0"

    def consumer_rows(self) -> int:
        from sqlalchemy import text

        self.audit_count()  # opens the engine
        assert self._engine is not None
        with self._engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM consumer_reads")).scalar_one()


def _run(wrk_bin: str, side: _Side, connections: int, threads: int, seconds: int) -> WrkResult:
    label = "tracking on" if side.track else "tracking off"
    cmd = [wrk_bin, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency"]
    cmd += ["-H", side.header(), "-H", CONSUMER_HEADER, side.read_url]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk ({label}) did not finish within {seconds + 60}s") from None
    if res.returncode != 0:
        raise BenchError(f"wrk ({label}) failed: {res.stderr.strip()[-1000:]}")
    return parse_wrk(res.stdout, label, connections, threads)


def _seen_cost() -> float:
    """Microseconds per ``seen`` of a steady consumer (the whole per-read cost), best of 7."""
    import timeit

    from sqlalchemy import create_engine

    from keyvault.http.consumer_tracker import ConsumerTracker

    tracker = ConsumerTracker(create_engine("sqlite://"))  # never started: nothing is written
    headers = [(b"host", b"127.0.0.1"), (b"authorization", b"Bearer kvt_" + b"x" * 43)]
    scope = {"headers": [*headers, (b"x-keyvault-consumer", b"bench-consumer-1")]}

    def seen() -> None:
        tracker.seen(scope, "bench", "127.0.0.1", "C", "app:A", 1)

    seen()
    for entry in tracker._entries.values():
        entry.refresh_due = float("inf")  # as between two refreshes
    number = 100_000
    return min(timeit.repeat(seen, number=number, repeat=7)) / number * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--database-url", help="two URLs, comma separated (on, off)")
    args = parser.parse_args()
    args.workers = 1
    wrk_bin = shutil.which("wrk")
    if wrk_bin is None:
        print("bench/tracking: wrk not found (apt-get install -y wrk)", file=sys.stderr)
        return 2
    urls = (args.database_url or ",").split(",")
    results: dict[tuple[bool, int], list[WrkResult]] = {}
    with tempfile.TemporaryDirectory(prefix="kv-bench-tracking-") as tmpdir:
        sides = []
        for track, url in zip((True, False), urls, strict=True):
            tmp = Path(tmpdir) / ("on" if track else "off")
            tmp.mkdir()
            side_args = argparse.Namespace(**{**vars(args), "database_url": url or None})
            sides.append(_Side(tmp, side_args, track))
        try:
            for side in sides:
                side.setup()
                if args.warmup:
                    _run(wrk_bin, side, 8, 1, args.warmup)
            for round_ in range(args.rounds):
                for connections, threads in LOADS:
                    # The order flips each round: neither side always runs right after the other.
                    for side in sides if round_ % 2 == 0 else sides[::-1]:
                        r = _run(wrk_bin, side, connections, threads, args.seconds)
                        results.setdefault((side.track, connections), []).append(r)
            rows = sides[0].consumer_rows()
        except BenchError as exc:
            print(f"bench/tracking: {exc}", file=sys.stderr)
            return 1
        finally:
            for side in sides:
                side.stop()
    print(
        f"key read, audit on, keyvault serve --workers 1 ({'SQLite' if not args.database_url else 'PostgreSQL'}); "
        f"wrk {args.seconds}s x {args.rounds} rounds per row, alternating; {os.cpu_count()} CPUs"
    )
    print(
        f"{'tracking':9} {'conns':>5} {'req/s median':>13} {'p50 ms':>8} {'p99 ms':>8}  runs req/s"
    )
    for connections, _ in LOADS:
        medians = {}
        for track in (True, False):
            rs = results[(track, connections)]
            rps = statistics.median(r.rps for r in rs)
            medians[track] = rps
            print(
                f"{'on' if track else 'off':9} {connections:5d} {rps:13.1f} "
                f"{statistics.median(r.p50_ms for r in rs):8.3f} "
                f"{statistics.median(r.p99_ms for r in rs):8.3f}  "
                + " ".join(f"{r.rps:.0f}" for r in rs)
            )
        print(f"          {connections:5d} on/off: {medians[True] / medians[False]:.3f}")
    print(
        f"consumer_reads rows written by the tracking server: {rows} "
        "(the setup's check read, then one steady consumer)"
    )
    print(f"ConsumerTracker.seen, steady consumer, in process: {_seen_cost():.2f} us per read")
    bad = [r for rs in results.values() for r in rs if r.bad_status or r.socket_errors]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
