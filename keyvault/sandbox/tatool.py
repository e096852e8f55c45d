"""Emulator of TA's ``ta-tool`` key commands, backed by :mod:`keyvault.sandbox.state`.

Run as ``python -m keyvault.sandbox.tatool ARGS`` with ``TA_SIM_STATE_DIR`` set (the
wrapper written by ``state.install_wrapper`` does both). Supported commands::

    generate_root_secret
    generate_api_secret -appid APPID        (also -appid=APPID)

The real tool's output is unknown; this one prints a plausible form::

    generate api secret success, appid: APPID
    secret: <64-char key>

Noise and faults come from the state dir's ``noise.json`` (``state.set_noise``):
``banner`` (lines printed first), ``crlf``, ``ansi`` (colours the key line),
``delay_seconds`` (sleep before generating), ``fail_apps`` (APPIDs, or ``root``, that
fail with ``ERROR: internal error`` and generate nothing), ``output_mode``
(``normal`` | ``no_key``: generates but prints no key | ``two_keys``: adds a
``trace: <token>`` line), ``hold_file`` (after printing, create ``state_dir/holding``
holding the pid and wait, SIGHUP ignored, until hold_file exists; at most 120 s;
``holding`` is removed when the wait ends) and ``hold_before_print`` (hold before
printing instead). ``state_dir/last_run.json`` records pid and scope of each generation.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from keyvault.sandbox import state as st

USAGE = """usage: ta-tool <command> [options]
commands:
  generate_root_secret                  generate a new root secret (valid for every project)
  generate_api_secret -appid <APPID>    generate a new api secret for one project
"""
HOLD_POLL_SECONDS = 0.05
HOLD_MAX_SECONDS = 120.0
_ANSI_KEY, _ANSI_RESET = "\x1b[1;32m", "\x1b[0m"


def parse_args(argv):
    """Return the scope ('root' or 'app:<APPID>') asked for by argv, or None if invalid."""
    if argv == ["generate_root_secret"]:
        return "root"
    if argv and argv[0] == "generate_api_secret":
        rest = argv[1:]
        if len(rest) == 2 and rest[0] == "-appid" and rest[1]:
            return f"app:{rest[1]}"
        if len(rest) == 1 and rest[0].startswith("-appid=") and len(rest[0]) > len("-appid="):
            return f"app:{rest[0][len('-appid=') :]}"
    return None


def _emit(lines, noise):
    # Bytes, so that crlf mode gives exactly \r\n whatever the locale or platform.
    eol = b"\r\n" if noise.get("crlf") else b"\n"
    out = sys.stdout.buffer
    for line in lines:
        out.write(line.encode("utf-8") + eol)
    out.flush()


def _success_lines(scope, key, noise):
    mode = noise.get("output_mode") or "normal"
    if mode == "no_key":
        return ["generate success"]
    if scope == "root":
        lines = ["generate root secret success"]
    else:
        lines = [f"generate api secret success, appid: {scope[4:]}"]
    key_line = f"secret: {key}"
    lines.append(f"{_ANSI_KEY}{key_line}{_ANSI_RESET}" if noise.get("ansi") else key_line)
    if mode == "two_keys":
        lines.append(f"trace: {st.new_key()}")
    return lines


def _hold(state_dir, hold_file):
    # A dropped SSH session sends SIGHUP; tests kill connections mid-run and then
    # need this process alive to observe what happens to the key.
    import signal  # here: only a held run needs it, and every run pays for imports

    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from keyvault.fsutil import atomic_write  # imports only os and contextlib

    marker = os.path.join(state_dir, "holding")
    # Atomic: pollers never see an empty marker. It holds a pid only, so others may read it.
    atomic_write(marker, f"{os.getpid()}\n".encode("ascii"), mode=0o644, durable=False)
    deadline = time.monotonic() + HOLD_MAX_SECONDS
    try:
        while not os.path.exists(hold_file) and time.monotonic() < deadline:
            time.sleep(HOLD_POLL_SECONDS)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(marker)


def _print_or_fail(lines, noise):
    try:
        _emit(lines, noise)
        return True
    except OSError:  # EPIPE/EIO: whoever ran us has gone away
        # Point stdout at /dev/null so the flush at interpreter exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return False


def main(argv=None):
    """Run one ta-tool command; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    state_dir = os.environ.get("TA_SIM_STATE_DIR")
    if not state_dir:
        sys.stderr.write(
            "ta-tool (TA simulator): TA_SIM_STATE_DIR is not set; run the wrapper "
            "installed by `python -m keyvault.sandbox.state install`\n"
        )
        return 1
    try:
        noise = st.read_noise(state_dir)
        # With no noise the common path reads the state once, inside generate().
        state = st.read_state(state_dir) if noise else None
    except (OSError, ValueError) as exc:  # ValueError: corrupt JSON
        sys.stderr.write(f"ERROR: {exc}\n")
        return 1
    if noise.get("banner"):
        _emit(noise["banner"], noise)  # models MOTD/profile noise of `su - ta`
    scope = parse_args(argv)
    if scope is None:
        sys.stderr.write(USAGE)
        return 1
    name = "root" if scope == "root" else scope[4:]
    unknown = [f"ERROR: appid {name} does not exist"]
    if state is not None and scope != "root" and name not in state["apps"]:
        _emit(unknown, noise)
        return 1
    delay = float(noise.get("delay_seconds") or 0)
    if delay > 0:
        time.sleep(delay)
    if name in (noise.get("fail_apps") or ()):
        _emit(["ERROR: internal error"], noise)
        return 1
    try:
        key = st.generate(state_dir, scope, record=True)
    except st.UnknownApp:
        _emit(unknown, noise)
        return 1
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"ERROR: {exc}\n")
        return 1
    lines = _success_lines(scope, key, noise)
    hold_file = noise.get("hold_file")
    if hold_file and noise.get("hold_before_print"):
        _hold(state_dir, hold_file)
    if not _print_or_fail(lines, noise):
        return 1
    if hold_file and not noise.get("hold_before_print"):
        _hold(state_dir, hold_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
