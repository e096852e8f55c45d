"""Benchmark: the cost the row MAC check adds to a cold token lookup (issue 10).

A cold lookup is what a server does for a token after any commit bumped the revision
counter: one SELECT of the token row, then ``check_token``. This times
``ServerState.authenticate`` with empty caches on a temporary SQLite store, with the MAC
check (as shipped) and, in the same run, with ``integrity.failure`` replaced by a no-op (the
baseline: what a lookup cost before row MACs). No token or key is printed.

    python bench/token_lookup.py [--rounds 3000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _store(home: Path) -> str:
    os.environ.update(
        KEYVAULT_HOME=str(home),
        KEYVAULT_DATABASE_URL=f"sqlite:///{home}/kv.db",
        KEYVAULT_MASTER_KEY_FILE=str(home / "master.key"),
    )
    from click.testing import CliRunner

    from keyvault.cli import main

    runner = CliRunner()
    for args in (["init"], ["cluster", "add", "C", "--open-api-url", "http://127.0.0.1:9"]):
        assert runner.invoke(main, args).exit_code == 0
    made = runner.invoke(main, ["token", "create", "bench", "--scope", "app:C/*", "--json"])
    assert made.exit_code == 0
    import json

    return json.loads(made.stdout)["token"]


def _time(state, header: str, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        state.authenticate(header)  # no revision read: nothing is cached, every call is cold
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3000)
    rounds = parser.parse_args().rounds
    with tempfile.TemporaryDirectory() as tmp:
        token = _store(Path(tmp) / "home")
        from sqlalchemy import select

        from keyvault.config import load_settings
        from keyvault.db import transaction
        from keyvault.http.state import ServerState
        from keyvault.models import AccessToken
        from keyvault.services import integrity, tokens

        state = ServerState(load_settings())
        header = f"Bearer {token}"
        _time(state, header, 200)  # warm up (imports, HKDF, connection pool)
        checked_run = integrity.failure
        results: dict[str, list[float]] = {"with MAC check": [], "baseline (no check)": []}
        # Interleaved in small blocks, so a busy machine slows both alike.
        for _ in range(max(1, rounds // 100)):
            for name, check in (("with MAC check", checked_run), ("baseline (no check)", None)):
                tokens.integrity.failure = check or (lambda row, *, keyring: None)  # type: ignore[assignment]
                results[name] += _time(state, header, 100)
        tokens.integrity.failure = checked_run
        with transaction(state.factory) as session:
            row = session.scalars(select(AccessToken)).one()
        start = time.perf_counter()
        for _ in range(rounds):
            assert checked_run(row, keyring=state.keyring) is None
        alone = (time.perf_counter() - start) / rounds
        state.close()
    for name, times in results.items():
        us = sorted(t * 1e6 for t in times)
        print(
            f"{name:22} median {statistics.median(us):7.1f} us   "
            f"p99 {us[int(len(us) * 0.99)]:7.1f} us   ({len(us)} cold lookups)"
        )
    added = statistics.median(results["with MAC check"]) - statistics.median(
        results["baseline (no check)"]
    )
    print(f"added by the row MAC check: {added * 1e6:.1f} us per cold lookup (median)")
    print(f"the check alone (integrity.failure on a loaded row): {alone * 1e6:.1f} us")


if __name__ == "__main__":
    main()
