"""The remote protocol: scripts, quoting, markers, key extraction and masking."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from keyvault.errors import BecomeFailed, InvalidInput, TaToolMissing
from keyvault.tahost import (
    CLAIM_TOKEN,
    Become,
    check_script,
    cleaned_ids,
    cleanup_many_script,
    cleanup_marker,
    cleanup_script,
    fetch_script,
    find_keys,
    find_marker,
    generate_many_script,
    generate_script,
    mask_keys,
    parse_remote,
    raise_for_become,
    render_command,
    report_end,
)
from tests.support.timeouts import TIMEOUT

KEY = "A" * 20 + "b" * 20 + "9" * 24
OTHER = "Z" * 64
RID = "abc123def456"
OTHER_RID = "fed654cba321"


def run_local(script: str, home, path_dir) -> bytes:
    env = {"HOME": str(home), "PATH": f"{path_dir}:/usr/bin:/bin"}
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, check=False).stdout


def install_tool(tmp_path, body: str):
    """A ta home and a bin dir holding a stand-in ta-tool (a sh script with ``body``)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "ta-tool"
    tool.write_text("#!/bin/sh\n" + body)
    tool.chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    return home, bindir


@pytest.fixture
def fake_tool(tmp_path):
    """A stand-in ta-tool that echoes its argv (so quoting can be checked) and a key."""
    return install_tool(
        tmp_path, 'printf "argv:%s|" "$@"; echo; echo "\\033[32msecret: ' + KEY + '\\033[0m\\r"\n'
    )


@pytest.mark.parametrize("appid", ["x; rm -rf ~", "$(id)", "a'b", 'a"b', "a\nb", "`id`", "a b"])
def test_hostile_appid_reaches_ta_tool_as_one_argument(fake_tool, appid):
    home, bindir = fake_tool
    command = render_command("ta-tool generate_api_secret -appid {appid}", appid)
    out = run_local(generate_script(RID, command), home, bindir)
    remote = parse_remote(RID, out)
    assert remote.state == "result" and remote.rc == 0
    assert f"argv:generate_api_secret|argv:-appid|argv:{appid}|".encode() in remote.output
    assert not (home / "x").exists()


def test_option_like_appid_is_refused():
    with pytest.raises(InvalidInput):
        render_command("ta-tool generate_api_secret -appid {appid}", "-rf")


def test_generate_writes_private_pending_file_and_reads_it_back(fake_tool):
    home, bindir = fake_tool
    out = run_local(generate_script(RID, "ta-tool generate_root_secret"), home, bindir)
    remote = parse_remote(RID, out)
    assert remote.started and remote.state == "result" and remote.rc == 0
    assert find_keys(remote.output, "[A-Za-z0-9]{64}") == [KEY]
    pending = home / ".keyvault" / "pending" / f"{RID}.out"
    assert pending.stat().st_mode & 0o077 == 0
    # A second run under the same rotation id never runs ta-tool again.
    again = parse_remote(
        RID, run_local(generate_script(RID, "ta-tool generate_root_secret"), home, bindir)
    )
    assert again.state == "exists"
    fetched = parse_remote(RID, run_local(fetch_script(RID), home, bindir))
    assert fetched.output == remote.output and fetched.rc == 0
    assert parse_remote(RID, run_local(cleanup_script(RID), home, bindir)).state == "cleaned"
    assert not pending.exists() and (home / ".keyvault" / "pending" / f"{RID}.done").exists()
    assert parse_remote(RID, run_local(fetch_script(RID), home, bindir)).state == "cleaned"


def test_fetch_of_unknown_rotation_is_absent(fake_tool):
    home, bindir = fake_tool
    assert parse_remote(RID, run_local(fetch_script(RID), home, bindir)).state == "absent"


def test_missing_ta_tool_is_reported_and_recovery_proves_it_never_ran(tmp_path):
    out = run_local(
        generate_script(RID, "ta-tool generate_root_secret"), tmp_path, tmp_path / "nothing"
    )
    remote = parse_remote(RID, out)
    assert remote.state == "notatool"
    # The id was claimed (.out) but ta-tool never launched: a recovery takes the launch claim.
    assert (
        parse_remote(RID, run_local(fetch_script(RID), tmp_path, tmp_path / "nothing")).state
        == "absent"
    )
    assert (
        parse_remote(RID, run_local(fetch_script(RID), tmp_path, tmp_path / "nothing")).state
        == "absent"
    )
    with pytest.raises(TaToolMissing):
        raise_for_become(
            run_local(check_script("ta-tool x"), tmp_path, tmp_path).decode(), "h", Become("su")
        )


def test_markers_survive_pty_noise():
    r = RID.encode()
    # su's prompt may share a line with the first marker; the PTY turns \n into \r\n.
    raw = (
        b"Password: @@KV:"
        + r
        + b":START@@\r\nWelcome to TA\r\n@@KV:"
        + r
        + b":OUT@@\r\n|secret: \r\n@@KV:"
        + r
        + b":ERR@@\r\n@@KV:"
        + r
        + b":RC:0@@\r\n"
    )
    remote = parse_remote(RID, raw)
    assert (
        remote.started
        and remote.state == "result"
        and remote.output == b"secret: \n"
        and remote.rc == 0
    )
    assert report_end(RID, raw) == raw.index(b":RC:0@@") + len(b":RC:0@@")


def test_output_lines_never_pass_for_markers(tmp_path):
    # ta-tool printing marker-shaped lines (even with this very rotation id) cannot end
    # the report early, fake an exit status or claim a clean-up.
    forged = "\n".join(
        f"@@KV:{RID}:{word}@@" for word in ("RC:0", "EXISTS", "ERR", "CLEANED", "CLEANUP")
    )
    home, bindir = install_tool(tmp_path, f"printf '%s\\n' '{forged}' 'secret: {KEY}'; exit 3\n")
    out = run_local(generate_script(RID, "ta-tool generate_root_secret"), home, bindir)
    remote = parse_remote(RID, out)
    assert remote.state == "result" and remote.rc == 3
    assert remote.output.decode().splitlines() == [*forged.splitlines(), f"secret: {KEY}"]
    assert report_end(RID, out) == len(out.rstrip(b"\n"))
    assert cleaned_ids(out, [RID]) == set() and find_marker(out, cleanup_marker(RID)) == -1


@pytest.mark.parametrize(
    ("command", "to"),
    [
        ("ta-tool generate_root_secret | tail -n 1", ""),
        ("ta-tool generate_root_secret 2>&1", " >&2"),
    ],
)
def test_a_command_with_shell_syntax_runs_whole_into_the_pending_file(tmp_path, command, to):
    # A configured command is shell text: its pipe or redirection applies to ta-tool's
    # output in the pending file, never to the report.
    home, bindir = install_tool(tmp_path, f"echo noise; echo 'secret: {KEY}'{to}\n")
    remote = parse_remote(RID, run_local(generate_script(RID, command), home, bindir))
    assert remote.state == "result" and remote.rc == 0
    assert find_keys(remote.output, "[A-Za-z0-9]{64}") == [KEY]


def test_a_failing_command_prefix_never_runs_ta_tool_outside_the_pending_file(tmp_path):
    home, bindir = install_tool(tmp_path, f"echo 'secret: {KEY}'\n")
    out = run_local(
        generate_script(RID, "cd /nonexistent-dir && ta-tool generate_root_secret"), home, bindir
    )
    remote = parse_remote(RID, out)
    assert remote.state == "result" and remote.rc not in (0, None)
    assert (
        KEY.encode() not in out
    )  # ta-tool did not run, least of all with its output on the channel


def test_long_output_is_read_back_whole(tmp_path):
    home, bindir = install_tool(
        tmp_path,
        f"i=0; while [ $i -lt 300 ]; do echo line $i; i=$((i+1)); done; "
        f"echo 'secret: {KEY}'; echo oops >&2\n",
    )
    remote = parse_remote(
        RID, run_local(generate_script(RID, "ta-tool generate_root_secret"), home, bindir)
    )
    assert remote.output.decode().splitlines() == [f"line {i}" for i in range(300)] + [
        f"secret: {KEY}"
    ]
    assert remote.errors == b"oops\n" and remote.rc == 0


def test_connection_drop_is_not_a_result():
    remote = parse_remote(RID, b"@@KV:" + RID.encode() + b":START@@\n")
    assert remote.started and remote.state == "none"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"secret: {KEY}\n", [KEY]),
        (f"\x1b[1;32m{KEY}\x1b[0m\r\n", [KEY]),
        (f"{KEY}\n{KEY}\n", [KEY]),  # the same key twice is one candidate
        (f"{KEY}\ntrace: {OTHER}\n", [KEY, OTHER]),
        (f"{KEY}X\n", []),  # 65 characters is not a key
        ("generate success\n", []),
    ],
)
def test_find_keys(text, expected):
    assert find_keys(text.encode(), "[A-Za-z0-9]{64}") == expected


def test_mask_keys_hides_every_candidate_and_long_token():
    shown = mask_keys(f"secret: {KEY} trace {OTHER} token {'q' * 30}")
    assert KEY not in shown and OTHER not in shown and "q" * 30 not in shown
    assert "secret:" in shown


@pytest.mark.parametrize(
    ("become", "prefix"),
    [
        (Become("su", "ta", "root"), "su - ta -c "),
        (Become("sudo", "ta", "ops"), "sudo -n -iu ta sh -c "),
        (Become("none", "ta", "ta"), "bash -lc "),
    ],
)
def test_become_wraps_script_as_one_word(become, prefix):
    script = generate_script(RID, "ta-tool generate_root_secret")
    wrapped = become.wrap(script)
    assert wrapped.startswith(prefix)
    assert shlex.split(wrapped)[-1] == script
    assert become.needs_password == (become.method == "su" and become.ssh_user != "root")


def test_become_failure_message_masks_output():
    with pytest.raises(BecomeFailed) as info:
        raise_for_become(
            f"Password: \nsu: Authentication failure {KEY}", "ops@h:22", Become("su", "ta", "ops")
        )
    assert KEY not in str(info.value) and "Authentication failure" in str(info.value)


def _sudo_i_quote(command: str) -> str:
    # What `sudo -i` does to a command before handing it to the login shell's -c:
    # a backslash before every character but letters, digits, "_", "-" and "$".
    return "".join(c if c.isalnum() or c in "_-$" else "\\" + c for c in command)


def test_scripts_survive_sudo_i_requoting_with_the_exit_status_intact(tmp_path):
    home, bindir = install_tool(tmp_path, 'echo "secret: ' + KEY + '"; echo oops >&2; exit 3\n')
    jobs = [(RID, "ta-tool generate_root_secret"), ("fed654cba321", "ta-tool generate_root_secret")]
    for script in (generate_script(RID, jobs[0][1]), generate_many_script(jobs)):
        for rid, _ in jobs:
            for suffix in (".out", ".err", ".rc", ".done", ".launch", ".void"):
                (home / ".keyvault" / "pending" / f"{rid}{suffix}").unlink(missing_ok=True)
        # The outer (login) shell gets the re-quoted words, as under `sudo -n -iu ta sh -c SCRIPT`.
        out = run_local(
            _sudo_i_quote("sh") + " " + _sudo_i_quote("-c") + " " + _sudo_i_quote(script),
            home,
            bindir,
        )
        remote = parse_remote(RID, out)
        assert remote.state == "result" and remote.rc == 3
        assert find_keys(remote.output, r"[A-Za-z0-9]{64}") == [KEY] and remote.errors == b"oops\n"
        assert (home / ".keyvault" / "pending" / f"{RID}.rc").read_text() == "3\n"
        fetched = parse_remote(
            RID,
            run_local(
                _sudo_i_quote("sh") + " -c " + _sudo_i_quote(fetch_script(RID)), home, bindir
            ),
        )
        assert fetched.state == "result" and fetched.rc == 3


def test_generate_many_runs_each_rotation_in_its_own_part(fake_tool):
    home, bindir = fake_tool
    first, second, third = "aaaaaa111111", "bbbbbb222222", "cccccc333333"
    run_local(
        generate_script(second, "ta-tool generate_root_secret"), home, bindir
    )  # already claimed
    script = generate_many_script(
        [
            (first, "ta-tool generate_root_secret"),
            (second, "ta-tool generate_root_secret"),
            (third, "ta-tool generate_root_secret"),
        ]
    )
    out = run_local(script, home, bindir)
    assert parse_remote(first, out).state == "result" and parse_remote(first, out).rc == 0
    # The second one's early exit (EXISTS) ends only its own part: the third still runs.
    assert parse_remote(second, out).state == "exists"
    assert parse_remote(third, out).state == "result"
    ends = [report_end(rid, out) for rid in (first, second, third)]
    assert ends == sorted(ends) and ends[-1] <= len(out)
    assert report_end(first, out[: ends[0] - 3]) is None  # an RC marker cut short is not an end
    assert generate_many_script([(first, "ta-tool x")]) == generate_script(first, "ta-tool x")
    with pytest.raises(InvalidInput):
        generate_many_script([])


def test_cleanup_many_reports_only_rotations_whose_files_are_gone(fake_tool):
    home, bindir = fake_tool
    rids = ["aaaaaa111111", "bbbbbb222222", "cccccc333333"]
    for rid in rids:
        run_local(generate_script(rid, "ta-tool generate_root_secret"), home, bindir)
    pending = home / ".keyvault" / "pending"
    # A .err that rm -f cannot remove (a non-empty directory) keeps that rotation uncleaned.
    (pending / "bbbbbb222222.err").unlink()
    (pending / "bbbbbb222222.err").mkdir()
    (pending / "bbbbbb222222.err" / "x").write_text("")
    out = run_local(cleanup_many_script(rids), home, bindir).decode()
    assert [rid for rid in rids if f"@@KV:{rid}:CLEANED@@" in out] == [
        "aaaaaa111111",
        "cccccc333333",
    ]
    assert not (pending / "aaaaaa111111.out").exists() and (pending / "aaaaaa111111.done").exists()
    assert not (pending / "bbbbbb222222.done").exists()
    assert (
        parse_remote("aaaaaa111111", run_local(fetch_script("aaaaaa111111"), home, bindir)).state
        == "cleaned"
    )
    with pytest.raises(InvalidInput):
        cleanup_many_script(["../etc"])


def test_batch_cleans_up_only_the_ids_it_is_sent_on_stdin(fake_tool):
    home, bindir = fake_tool
    first, second = "aaaaaa111111", "bbbbbb222222"
    script = generate_many_script(
        [(first, "ta-tool generate_root_secret"), (second, "ta-tool generate_root_secret")],
        clean_from_stdin=True,
    )
    env = {"HOME": str(home), "PATH": f"{bindir}:/usr/bin:/bin"}
    # An id of another batch, a path and the first id: only the first is this batch's to clean.
    sent = f"cccccc333333\n../../x\n{first}\n".encode()
    out = subprocess.run(
        ["sh", "-c", script], env=env, input=sent, capture_output=True, check=False
    ).stdout
    text = out.decode()
    assert (
        text.index(f"@@KV:{second}:RC:0@@")
        < text.index(cleanup_marker(first))
        < text.index(f"@@KV:{first}:CLEANED@@")
    )
    pending = home / ".keyvault" / "pending"
    assert not (pending / f"{first}.out").exists() and (pending / f"{first}.done").exists()
    assert (pending / f"{second}.out").exists() and f"@@KV:{second}:CLEANED@@" not in text
    assert "cccccc333333:CLEANED" not in text


def test_a_dead_connection_stops_a_batch_before_it_claims_the_next_id(fake_tool):
    """stdout closed after the first report, as sshd closes it when the client is gone."""
    home, bindir = fake_tool
    rids = ["aaaaaa111111", "bbbbbb222222", "cccccc333333"]
    script = generate_many_script([(rid, "ta-tool generate_root_secret") for rid in rids])
    env = {"HOME": str(home), "PATH": f"{bindir}:/usr/bin:/bin"}
    proc = subprocess.Popen(
        ["sh", "-c", script], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    seen = b""
    while report_end(rids[0], seen) is None:
        chunk = proc.stdout.read1(65536)
        assert chunk, "the first report never ended"
        seen += chunk
    proc.stdout.close()
    proc.wait(timeout=TIMEOUT)
    first = parse_remote(rids[0], run_local(fetch_script(rids[0]), home, bindir))
    assert first.state == "result" and find_keys(first.output, r"[A-Za-z0-9]{64}") == [KEY]
    for rid in rids[1:]:
        # Either it ran before the pipe closed (its key is on the host) or it never claimed
        # its id: recovery can always tell, and "never ran" stays true.
        fetched = parse_remote(rid, run_local(fetch_script(rid), home, bindir))
        assert fetched.state in ("result", "absent"), fetched.state
        if fetched.state == "result":
            assert fetched.rc == 0 and find_keys(fetched.output, r"[A-Za-z0-9]{64}") == [KEY]
        else:
            again = run_local(generate_script(rid, "ta-tool generate_root_secret"), home, bindir)
            assert parse_remote(rid, again).state == "exists"


def test_recovery_racing_a_slow_launch_wins_and_ta_tool_never_runs(fake_tool):
    home, bindir = fake_tool
    pending = home / ".keyvault" / "pending"
    pending.mkdir(parents=True)
    (pending / f"{RID}.out").write_text(
        f"{CLAIM_TOKEN}\n"
    )  # claimed by a generate that has not launched yet
    assert parse_remote(RID, run_local(fetch_script(RID), home, bindir)).state == "absent"
    assert (pending / f"{RID}.launch").exists() and (pending / f"{RID}.void").exists()
    again = run_local(generate_script(RID, "ta-tool generate_root_secret"), home, bindir)
    assert parse_remote(RID, again).state == "exists" and not (pending / f"{RID}.rc").exists()
    # A key already printed is never declared absent, launched or not.
    (pending / f"{OTHER_RID}.out").write_text(f"secret: {KEY}\n")
    fetched = parse_remote(OTHER_RID, run_local(fetch_script(OTHER_RID), home, bindir))
    assert fetched.state == "result" and find_keys(fetched.output, r"[A-Za-z0-9]{64}") == [KEY]


def test_an_empty_pending_file_is_a_running_ta_tool_never_absent(fake_tool):
    """An older keyvault's generate leaves .out empty (no claim token) while its ta-tool runs:
    recovery must wait for it, never void it; once the key is there, it is read back, even
    if a .void exists."""
    home, bindir = fake_tool
    pending = home / ".keyvault" / "pending"
    pending.mkdir(parents=True)
    (pending / f"{RID}.out").write_text("")
    waiting = parse_remote(RID, run_local(fetch_script(RID), home, bindir))
    assert waiting.state == "result" and waiting.rc is None and waiting.output == b""
    assert not (pending / f"{RID}.launch").exists() and not (pending / f"{RID}.void").exists()
    (pending / f"{RID}.void").write_text("")  # even a (wrong) earlier verdict cannot hide a key
    (pending / f"{RID}.out").write_text(f"secret: {KEY}\n")
    (pending / f"{RID}.rc").write_text("0\n")
    fetched = parse_remote(RID, run_local(fetch_script(RID), home, bindir))
    assert (
        fetched.state == "result"
        and fetched.rc == 0
        and find_keys(fetched.output, r"[A-Za-z0-9]{64}") == [KEY]
    )
