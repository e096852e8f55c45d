"""The agent's and run's arguments: bad input is one InvalidInput naming the problem; the
formats and the template render what docs/consumers.md says; no code runs from a template."""

from __future__ import annotations

import os
import signal

import pytest

from keyvault_client import agent, run
from keyvault_client.client import KeyInfo
from keyvault_client.errors import InvalidInput

KEY = "Kq" + "z" * 62
INFO = KeyInfo("prod", "app:APP1", 7, "fp7", "2026-01-01T00:00:00+00:00", KEY)


def target(**spec) -> agent.Target:
    return agent.make_target({"cluster": "prod", "appid": "APP1", "file": "/x/k", **spec}, "t")


def test_formats_render_the_key():
    assert target().render(INFO) == f"{KEY}\n".encode()
    assert target(format="env", env_name="TA_KEY").render(INFO) == f"TA_KEY={KEY}\n".encode()
    assert b'"version": 7' in target(format="json").render(INFO)


def test_a_template_substitutes_only(tmp_path):
    path = tmp_path / "t.tmpl"
    path.write_text("k=$key v=${version} a=$appid s=$scope c=$cluster f=$fingerprint $$HOME\n")
    rendered = target(template=str(path)).render(INFO).decode()
    ok = rendered == f"k={KEY} v=7 a=APP1 s=app:APP1 c=prod f=fp7 $HOME\n"
    assert ok
    for bad in ("$nope", "${__import__('os')}", "$"):
        path.write_text(bad)
        with pytest.raises(InvalidInput, match="is not valid"):
            target(template=str(path))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"appid": None}, "exactly one of appid or root"),
        ({"root": True}, "exactly one of appid or root"),
        ({"file": ""}, "a key needs cluster, file"),
        ({"format": "yaml"}, "unknown format"),
        ({"env_name": "TA-KEY"}, "invalid env name"),
        ({"mode": "0999"}, "invalid mode"),
        ({"mode": "rw"}, "invalid mode"),
        ({"owner": "no-such-user-kv"}, "unknown user"),
        ({"on_change": ""}, "on_change is empty"),
    ],
)
def test_bad_settings_are_one_clear_error(spec, message):
    with pytest.raises(InvalidInput, match=message):
        target(**spec)


def test_mode_owner_and_on_change_parse():
    t = target(mode="0640", owner=str(os.geteuid()), on_change="systemctl reload 'my app'")
    assert t.mode == 0o640 and t.owner is not None and t.owner[0] == os.geteuid()
    assert t.on_change == ["systemctl", "reload", "my app"]


def test_child_environment_drops_every_keyvault_variable():
    environ = {
        "KEYVAULT_TOKEN": "kvt_x",
        "KEYVAULT_TOKEN_FILE": "/etc/kv/token",
        "KEYVAULT_ADDR": "http://kv1:8200",
        "PATH": "/bin",
        "MY_KEYVAULT_NOTE": "kept",
    }
    assert agent.child_environment(environ) == {"PATH": "/bin", "MY_KEYVAULT_NOTE": "kept"}


def test_run_exit_status_and_signal_names():
    assert run.exit_status(0) == 0 and run.exit_status(3) == 3
    assert run.exit_status(-signal.SIGKILL) == 137
    assert run._signal_number("hup") == signal.SIGHUP
    assert run._signal_number("SIGUSR1") == signal.SIGUSR1
    with pytest.raises(InvalidInput, match="unknown signal"):
        run._signal_number("NOPE")


def test_agent_and_run_usage_errors_exit_2(capsys, tmp_path):
    assert agent.main(["--cluster", "c", "--file", str(tmp_path / "k")]) == 2
    assert capsys.readouterr().err.startswith("error: the command line: a key needs")
    assert run.main(["--cluster", "c", "--root", "--env", "K"]) == 2
    assert capsys.readouterr().err.startswith("error: no command to run")


class _BrokenWatch:
    """A client whose watch fails with a bug (not a KeyvaultError) after one rotation."""

    def watch(self, scopes, *, wait):
        yield "rotation"
        raise RuntimeError("a bug")


def test_an_unexpected_watch_failure_is_fatal_for_run_never_silent(capsys):
    supervisor = run.Supervisor(["true"], "K", mode="restart", reload_signal=1, grace=0)
    run._watch(_BrokenWatch(), supervisor, ("c", "app:a1"), 0.0)  # type: ignore[arg-type]
    assert supervisor.inbox.get_nowait() == "rotation"
    failure = supervisor.inbox.get_nowait()
    assert isinstance(failure, run.WatchFailed) and failure.exit_code == 1
    assert "RuntimeError" in failure.message
    # With no child running, run ends at once: one error line, exit 1.
    supervisor.inbox.put(failure)
    assert supervisor.supervise() == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: the rotation watch failed (RuntimeError)")
