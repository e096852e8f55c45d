"""Run one rotation like `keyvault rotate` does, optionally dying with SIGKILL at a step.

Used by tests/integration/test_rotation_sshd.py as a real subprocess:

    python rotate_driver.py --kill-at generated CLUSTER SCOPE
    python rotate_driver.py --pause-at journaled --pause-file /some/dir/go CLUSTER SCOPE

SCOPE is ``root`` or ``app:<APPID>``. The service is built exactly as the CLI builds
it (``AppContext().rotation_service()``, configured from the environment); the only
difference is its ``on_step(step, rotation_id)`` hook, which prints
``step <STEP> <ROTATION_ID>`` (never a key) and, at the step named by ``--kill-at``
("journaled", "generated", "sealed" - inside the store transaction, before its
commit - or "stored"), kills this process with SIGKILL: no cleanup,
no finally blocks, no atexit, as with ``kill -9`` or a power cut. At the step named by
``--pause-at`` it writes the rotation id to ``<pause-file>.paused`` and waits (at most
120 s) until ``--pause-file`` exists: a slow process, for races with other processes.

Exit status: 0 when the rotation completed, the error's exit code otherwise.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

STEPS = ("journaled", "generated", "sealed", "stored")


def _pause(pause_file: str, rotation_id: str) -> None:
    tmp = f"{pause_file}.paused.tmp"
    with open(tmp, "w") as f:
        f.write(rotation_id + "\n")
    os.replace(tmp, f"{pause_file}.paused")  # pollers never see an empty file
    deadline = time.monotonic() + 120
    while not os.path.exists(pause_file) and time.monotonic() < deadline:
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-at", choices=(*STEPS, "none"), default="none")
    parser.add_argument("--pause-at", choices=(*STEPS, "none"), default="none")
    parser.add_argument("--pause-file", help="with --pause-at: continue once this file exists")
    parser.add_argument("cluster")
    parser.add_argument("scope", help="root or app:<APPID>")
    args = parser.parse_args(argv)
    if args.pause_at != "none" and not args.pause_file:
        parser.error("--pause-at needs --pause-file")

    from keyvault.cli.context import AppContext
    from keyvault.errors import KeyvaultError
    from keyvault.scope import parse_scope

    app = AppContext()
    try:
        scope = parse_scope(args.scope, app.settings.appid_pattern)
        service = app.rotation_service()

        def on_step(step: str, rotation_id: str) -> None:
            print(f"step {step} {rotation_id}", flush=True)
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if step == args.pause_at:
                _pause(args.pause_file, rotation_id)

        service.on_step = on_step
        outcome = service.rotate(args.cluster, scope, actor=app.settings.actor)
    except KeyvaultError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    finally:
        app.close()
    print(
        f"rotation {outcome.rotation_id} {outcome.state} v{outcome.new_version} {outcome.new_fingerprint}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
