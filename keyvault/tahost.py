"""The protocol keyvault speaks to a TA host: shell scripts run as the ta user.

Every script is one line (so it survives ``su -c`` and ``sudo -i`` quoting)
and reports through markers ``@@KV:<rotation id>:<WORD>@@``. ta-tool's output
goes to a file private to ta (umask 077) named by the rotation id under
``~/.keyvault/pending/``, so that a dropped connection or a dead keyvault
cannot lose a key that ta-tool already generated. The file is printed back one
line at a time behind a ``|``, so no output line can pass for a marker; markers
are looked for only in lines that do not start with ``|``.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

from keyvault.errors import BecomeFailed, InvalidInput, TaToolMissing

# Every expansion in these scripts is written ${...} or $(...): `sudo -i` re-quotes the
# command for ta's login shell with backslashes before everything but letters, digits,
# "_", "-" and "$", so a bare $name would be expanded by that outer shell, not ours.
PENDING_DIR = "${HOME}/.keyvault/pending"
# What generate_script's claim writes into .out before ta-tool replaces it (never a key).
CLAIM_TOKEN = "KV-CLAIMED"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_RID = re.compile(r"^[a-z0-9-]{6,32}$")


@dataclass(frozen=True)
class Become:
    """How to become the ta user: ``su`` (default), ``sudo`` or ``none``."""

    method: str
    ta_user: str = "ta"
    ssh_user: str = "root"

    @property
    def needs_password(self) -> bool:
        return self.method == "su" and self.ssh_user != "root"

    def wrap(self, script: str) -> str:
        """The command line the SSH server runs."""
        if self.method == "su":
            return f"su - {shlex.quote(self.ta_user)} -c {shlex.quote(script)}"
        if self.method == "sudo":
            return f"sudo -n -iu {shlex.quote(self.ta_user)} sh -c {shlex.quote(script)}"
        if self.method == "none":
            # The SSH user is ta; a login shell gives ta's PATH like `su -` would.
            return f"bash -lc {shlex.quote(script)}"
        raise InvalidInput(f"unknown become method {self.method!r}", hint="use su, sudo or none")


def _check_rid(rid: str) -> str:
    if not _RID.match(rid):
        raise InvalidInput(f"invalid rotation id {rid!r}")
    return rid


def render_command(template: str, appid: str | None) -> str:
    """Fill ``{appid}`` in a configured ta-tool command, shell-quoted; refuse option-like ids."""
    if appid is None:
        return template
    if appid.startswith("-") or "\x00" in appid:
        raise InvalidInput(f"invalid APPID {appid[:40]!r}: it must not start with '-'")
    return template.replace("{appid}", shlex.quote(appid))


def _marker(rid: str, word: str) -> str:
    return f"@@KV:{rid}:{word}@@"


def generate_script(rid: str, command: str) -> str:
    """Run ta-tool once, output to the pending file, then print that file back."""
    return generate_many_script([(rid, command)])


def generate_many_script(jobs: list[tuple[str, str]], *, clean_from_stdin: bool = False) -> str:
    """Run ta-tool for several rotations in one ``su`` session: ``[(rotation id, command), ...]``.

    Each rotation keeps its own claim, pending file and markers, one after the other; an
    early outcome of one (EXISTS, NOTATOOL) ends only its own part. One job without
    clean-up is :func:`generate_script`. With ``clean_from_stdin`` the script then reads
    rotation ids (of this batch only), one per line until end of input, and cleans each
    up as :func:`cleanup_script` does: keyvault sends an id only once its key is committed.
    """
    if not jobs:
        raise InvalidInput("no rotation to run")
    calls = []
    for rid, command in jobs:
        tool = shlex.split(command)[
            0
        ]  # a command that does not parse as shell words is refused here
        calls.append(f"kv_gen {_check_rid(rid)} {shlex.quote(tool)} {shlex.quote(command)}")
    script = GENERATE_PREFIX + "; ".join(calls)
    if clean_from_stdin:
        # The CLEANUP marker says every ta-tool run is over: keyvault must close stdin now.
        script += f"; echo {cleanup_marker(jobs[0][0])}; " + _clean_from_stdin(
            [rid for rid, _ in jobs]
        )
    return script


def cleanup_marker(first_rid: str) -> str:
    """What a batch with ``clean_from_stdin`` prints once it waits for rotation ids."""
    return _marker(first_rid, "CLEANUP")


def _clean_from_stdin(rids: list[str]) -> str:
    # keyvault writes a rotation id to stdin once that key is committed, then closes stdin.
    # Only this batch's own ids are accepted: stdin can name nothing else to delete.
    ids = "|".join(_check_rid(rid) for rid in rids)
    return (
        f"umask 077; kv_ids=; kv_files=; while read -r kv_rid; do case ${{kv_rid}} in {ids}) "
        f'kv_ids="${{kv_ids}} ${{kv_rid}}"; kv_files="${{kv_files}} {_files("${kv_rid}")}";; esac; done; '
        + _clean_ids()
    )


def _files(rid: str) -> str:
    return f"{rid}.out {rid}.err {rid}.rc {rid}.launch"


def _clean_ids() -> str:
    # The one clean-up rule for many rotations: the files of ${kv_ids} (listed in ${kv_files})
    # go with one rm; each id is reported CLEANED, and gets its tombstone, only once its
    # files are gone.
    return (
        f'if [ -n "${{kv_ids}}" ] && cd "{PENDING_DIR}"; then rm -f ${{kv_files}}; '
        f"for kv_rid in ${{kv_ids}}; do [ -e ${{kv_rid}}.out ] || [ -e ${{kv_rid}}.err ] || "
        f'{{ : >${{kv_rid}}.done; echo "@@KV:${{kv_rid}}:CLEANED@@"; }}; done; fi'
    )


def _readback(rid: str, f: str, rc: str) -> str:
    # Shell builtins only (no base64 process per rotation): every line of the file is
    # printed with a "|" in front, and markers count only in lines that do not start with
    # one, so nothing ta-tool prints can pass for a marker. Lines are gathered in "$@" and
    # printed 64 at a time: one write (one SSH packet) for the usual short output.
    def lines(path: str) -> str:
        return (
            'while IFS= read -r kv_l || [ -n "${kv_l}" ]; do set -- "${@}" "|${kv_l}"; '
            f'[ ${{#}} -lt 64 ] || {{ printf \'%s\\n\' "${{@}}"; set --; }}; done <"{f}.{path}"'
        )

    return (
        f'set -- "@@KV:{rid}:OUT@@"; {lines("out")}; set -- "${{@}}" "@@KV:{rid}:ERR@@"; '
        f'[ ! -s "{f}.err" ] || {lines("err")}; printf \'%s\\n\' "${{@}}" "@@KV:{rid}:RC:{rc}@@"'
    )


# One rotation's part of a generate script, as a shell function: `kv_gen RID TOOL 'COMMAND'`.
# Builtins wherever they do: in a batch every fork and exec is paid once per rotation, so
# the only process a rotation starts is ta-tool itself. Early outcomes `return` (the next
# rotation of a batch still runs); only a dead connection ends the whole script.
_SH_RID = "${kv_rid}"  # the rotation id, inside kv_gen
_GEN_FUNCTION = (
    "kv_gen() { "
    + "; ".join(
        [
            f'kv_rid=${{1}}; kv_tool=${{2}}; kv_cmd=${{3}}; kv_f="{PENDING_DIR}/${{kv_rid}}"',
            f'[ -d "{PENDING_DIR}" ] || mkdir -p "{PENDING_DIR}" || {{ echo "{_marker(_SH_RID, "NODIR")}"; return 70; }}',  # noqa: E501
            # Printed before anything is claimed: when the connection is gone this write fails
            # (SIGPIPE, or EIO on a PTY) and the id stays unclaimed, so recovery can say "never ran".
            f'echo "{_marker(_SH_RID, "START")}" || exit 75',
            # A second run for the same rotation id must never generate again, nor a run after a
            # recovery declared it "never ran": creating .out exclusively (noclobber) claims the id.
            # The claim writes CLAIM_TOKEN, which ta-tool's own redirect replaces: only this script
            # leaves a .out holding exactly it, so recovery can tell "claimed, not launched".
            f'if [ -e "${{kv_f}}.done" ] || ! {{ set -C; echo {CLAIM_TOKEN} >"${{kv_f}}.out"; }} 2>/dev/null; '
            f'then set +C; echo "{_marker(_SH_RID, "EXISTS")}"; return 73; fi',
            f'if ! command -v "${{kv_tool}}" >/dev/null 2>&1; then set +C; echo "{_marker(_SH_RID, "NOTATOOL")}"; return 74; fi',  # noqa: E501
            # The last claim, just before ta-tool: a recovery that finds .out but takes .launch
            # first has proved ta-tool never started, and it never will. `true`, a regular builtin,
            # so a refused redirection fails the command, not the shell.
            f'if ! {{ true >"${{kv_f}}.launch"; }} 2>/dev/null; then set +C; echo "{_marker(_SH_RID, "EXISTS")}"; return 73; fi',  # noqa: E501
            "set +C",
            # Ignoring HUP keeps ta-tool alive when the connection drops mid-run. The configured
            # command is shell text (it may hold a pipe, `&&`, redirections): it runs whole inside
            # this subshell, so all it prints goes to the pending file, as it is typed in the config.
            """( trap '' HUP; eval "exec ${kv_cmd}" ) >"${kv_f}.out" 2>"${kv_f}.err" </dev/null""",
            'kv_rc=${?}; echo "${kv_rc}" >"${kv_f}.rc"',
            _readback(_SH_RID, "${kv_f}", "${kv_rc}"),
        ]
    )
    + "; }"
)
# What every generate script starts with; the calls `kv_gen RID TOOL 'COMMAND'` follow, "; " apart.
GENERATE_PREFIX = f"umask 077; {_GEN_FUNCTION}; "


def fetch_script(rid: str) -> str:
    """Print a pending file back, or say it is absent (for good) or already cleaned.

    Anything that may hold a key (an exit status, or output other than the claim) is
    printed back before any "absent" verdict is considered.
    """
    _check_rid(rid)
    f = f'"{PENDING_DIR}/{rid}"'
    return "; ".join(
        [
            "umask 077",
            f"if [ -e {f}.done ]; then echo {_marker(rid, 'CLEANED')}; exit 0; fi",
            f"kv_first=; [ -e {f}.rc ] || {{ read -r kv_first <{f}.out; }} 2>/dev/null",
            # Claimed by generate_script but ta-tool not launched (the connection went between the
            # two claims): take the launch claim so it never starts; "never ran" is then true for
            # good. Only .out holding exactly the claim token qualifies, never an empty one: an
            # older keyvault's run leaves that while its ta-tool is still running.
            f'if [ ! -e {f}.rc ] && [ "${{kv_first}}" = {CLAIM_TOKEN} ] && {{ true >{f}.launch; }} 2>/dev/null; '
            f"then : >{f}.void; echo {_marker(rid, 'ABSENT')}; exit 0; fi",
            # "Absent" must stay true: claim the id as generate_script does (exclusive .out), so a
            # rotation process that is slow to start can no longer run ta-tool for it; .void says so.
            f'if [ ! -e {f}.rc ] && [ ! -s {f}.out ] && {{ [ -e {f}.void ] || {{ mkdir -p "{PENDING_DIR}" && '
            f"( set -C; : >{f}.out ) 2>/dev/null && : >{f}.void; }}; }}; "
            f"then echo {_marker(rid, 'ABSENT')}; exit 0; fi",
            # (A recovery is rare: the exit status may cost a process.)
            _readback(rid, f"{PENDING_DIR}/{rid}", f"$(cat {f}.rc 2>/dev/null || echo none)"),
        ]
    )


def cleanup_script(rid: str) -> str:
    """Delete the pending files, leaving a key-less tombstone so recovery can tell."""
    _check_rid(rid)
    f = f'"{PENDING_DIR}/{rid}"'
    return f"umask 077; rm -f {f}.out {f}.err {f}.rc {f}.launch; : >{f}.done; echo {_marker(rid, 'CLEANED')}"


def cleanup_many_script(rids: list[str]) -> str:
    """Clean up several rotations in one command (one su, one channel, one ``rm``).

    A rotation is reported CLEANED (and gets its tombstone) only once its files are gone.
    """
    ids = [_check_rid(rid) for rid in rids]
    return (
        f'umask 077; kv_ids="{" ".join(ids)}"; kv_files="{" ".join(_files(rid) for rid in ids)}"; '
        + _clean_ids()
    )


def check_script(command: str) -> str:
    """Confirm the ta-tool of ``command`` is on the ta user's PATH; generate nothing."""
    tool = shlex.split(command)[0]
    return (
        f"if command -v {shlex.quote(tool)} >/dev/null 2>&1; then "
        f'echo "@@KV:check:OK:$(id -un):$(command -v {shlex.quote(tool)})@@"; '
        f"else echo @@KV:check:NOTATOOL@@; exit 74; fi"
    )


# A marker counts only in a line that is not ta-tool's output (those start with "|"); it
# need not start its line: a PTY may put su's password prompt in front of the first one.
_NOT_CONTENT = rb"(?m)^(?!\|)[^\n]*?"
_REPORT_END = re.compile(_NOT_CONTENT + rb"@@KV:([a-z0-9-]+):(?:RC:\w+|EXISTS|NOTATOOL|NODIR)@@")


def report_end(rid: str, output: bytes | bytearray, start: int = 0) -> int | None:
    """Where the report of generate ``rid`` in ``output`` (from ``start``) ends, once complete.

    A report is complete at its RC marker, or at EXISTS / NOTATOOL / NODIR when ta-tool never ran.
    ``start`` must be where a line starts, or where an earlier report ended.
    """
    for match in _REPORT_END.finditer(output, start):
        if match.group(1).decode() == rid:
            return match.end()
    return None


def find_marker(output: bytes | bytearray, marker: str, start: int = 0) -> int:
    """Where ``marker`` is in ``output`` outside ta-tool's output lines, or -1."""
    found = re.compile(_NOT_CONTENT + re.escape(marker.encode())).search(output, start)
    return -1 if found is None else found.end() - len(marker)


def cleaned_ids(output: bytes, rids: list[str]) -> set[str]:
    """The rotations whose pending files a clean-up script reported gone."""
    found = {m.decode() for m in re.findall(_NOT_CONTENT + rb"@@KV:([a-z0-9-]+):CLEANED@@", output)}
    return {rid for rid in rids if rid in found}


@dataclass(frozen=True)
class RemoteOutput:
    """What a generate or fetch reported. ``output`` holds ta-tool's stdout (may hold a key)."""

    started: bool
    state: str  # "result", "absent", "cleaned", "exists", "notatool", "nodir", "none"
    output: bytes = field(default=b"", repr=False)
    errors: bytes = field(default=b"", repr=False)
    rc: int | None = None
    raw_tail: str = field(default="", repr=False)


def _result_sections(words: list[str]) -> tuple[int, int, int] | None:
    """Where the OUT, ERR and RC markers of a complete result are, in that order; or None."""
    rc_at = next((i for i, word in enumerate(words) if word.startswith("RC:")), None)
    if rc_at is None:
        return None
    out_at = next((i for i, word in enumerate(words[:rc_at]) if word == "OUT"), None)
    if out_at is None:
        return None
    err_at = next((i for i in range(out_at + 1, rc_at) if words[i] == "ERR"), None)
    return None if err_at is None else (out_at, err_at, rc_at)


def parse_remote(rid: str, raw: bytes) -> RemoteOutput:
    """Read the markers of one script's output."""
    text = raw.decode("utf-8", "replace").replace("\r", "")
    tail = text[-2000:]
    lines = text.split("\n")
    prefix = f"@@KV:{rid}:"
    # Each marker line of this rotation, by the word after the id ("" for noise lines).
    words = [
        line.split(prefix, 1)[1].removesuffix("@@")
        if not line.startswith("|") and prefix in line and line.endswith("@@")
        else ""
        for line in lines
    ]
    started = "START" in words
    for word, state in (
        ("CLEANED", "cleaned"),
        ("ABSENT", "absent"),
        ("EXISTS", "exists"),
        ("NOTATOOL", "notatool"),
        ("NODIR", "nodir"),
    ):
        if word in words:
            return RemoteOutput(started=started, state=state, raw_tail=tail)
    sections = _result_sections(words)
    if sections is None:
        return RemoteOutput(started=started, state="none", raw_tail=tail)
    out_at, err_at, rc_at = sections

    def content(first: int, end: int) -> bytes:
        # Each line as printed back; a last line without a newline gets one.
        return "".join(
            line[1:] + "\n" for line in lines[first:end] if line.startswith("|")
        ).encode()

    rc_text = words[rc_at][3:]
    return RemoteOutput(
        started=True,
        state="result",
        output=content(out_at + 1, err_at),
        errors=content(err_at + 1, rc_at),
        rc=int(rc_text) if rc_text.isdigit() else None,
        raw_tail=tail,
    )


def raise_for_become(result_tail: str, host: str, become: Become) -> None:
    """Turn a script that never started into the right error."""
    if re.search(r"@@KV:[a-z0-9-]+:NOTATOOL@@", result_tail):
        raise TaToolMissing(
            f"ta-tool is not on the PATH of {become.ta_user} on {host}",
            host=host,
            hint="install ta-tool or fix the ta user's login PATH; nothing was generated",
        )
    shown = mask_keys(clean_output(result_tail))[-300:].strip().replace("\n", " | ")
    raise BecomeFailed(
        f"could not become {become.ta_user} with {become.method} on {host}: {shown or 'no output'}",
        host=host,
        hint="check KEYVAULT_SU_PASSWORD(_FILE) for su, the sudoers rule for sudo, or --ta-user; "
        "nothing was generated",
    )


def clean_output(text: str) -> str:
    """Strip ANSI escape codes and carriage returns."""
    return _ANSI.sub("", text).replace("\r", "")


def _bounded(pattern: str) -> re.Pattern:
    # A key is a whole token: a longer alphanumeric run is not a key.
    return re.compile(rf"(?<![A-Za-z0-9])(?:{pattern})(?![A-Za-z0-9])")


def find_keys(output: bytes, pattern: str) -> list[str]:
    """Distinct candidate keys in ta-tool's output, in order of appearance."""
    text = clean_output(output.decode("utf-8", "replace"))
    seen: list[str] = []
    for match in _bounded(pattern).finditer(text):
        if match.group(0) not in seen:
            seen.append(match.group(0))
    return seen


def mask_keys(text: str, pattern: str = r"[A-Za-z0-9]{64}") -> str:
    """Replace every candidate key (and any long token) so output can be shown safely."""
    text = _bounded(pattern).sub(lambda m: f"<candidate key, {len(m.group(0))} chars>", text)
    return re.sub(r"[A-Za-z0-9+/=_-]{24,}", lambda m: f"<masked {len(m.group(0))} chars>", text)
