"""The Open API emulator stops on SIGINT and SIGTERM even when it inherited SIGINT ignored.

A background job (``cmd &`` without job control, as many CI runners start the suite)
inherits SIGINT ignored; Python then raises no KeyboardInterrupt, and an emulator relying
on it ran until killed (``test_cli_serves_until_interrupted`` timed out that way).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from keyvault.sandbox import state as st
from tests.support.timeouts import TIMEOUT

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stops_on_signal_with_sigint_ignored_by_the_parent(tmp_path, sig):
    state_dir = tmp_path / "state"
    st.init_state(state_dir, ["APP1"])
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    emulator = [sys.executable, "-m", "keyvault.sandbox.openapi", "--state-dir", str(state_dir)]
    # `trap '' INT TERM` makes both signals ignored across exec, as a background job inherits.
    script = f"trap '' INT TERM; exec {shlex.join([*emulator, '--port', '0'])}"
    with subprocess.Popen(
        ["/bin/sh", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        try:
            banner = proc.stdout.readline().decode()
            assert re.search(r"127\.0\.0\.1:\d+/", banner), banner
            proc.send_signal(sig)
            proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
