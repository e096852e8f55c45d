"""Which commands the sandbox SSH front runs: exactly the scripts keyvault sends.

A command line must be exactly ``tahost.Become.wrap(script)`` for su, sudo or none, and the
script exactly one of ``check_script(cmd)``, ``generate_script(rid, cmd)``,
``generate_many_script(jobs)``, ``fetch_script(rid)``, ``cleanup_script(rid)`` or
``cleanup_many_script(rids)`` with ``cmd`` ``ta-tool generate_root_secret`` or ``ta-tool
generate_api_secret -appid APPID`` (APPID per ``keyvault.scope``). Candidates are pulled
out of the script with regexes, re-rendered with the tahost functions and compared for
equality, so nothing but keyvault's own scripts can pass. ``classify`` is pure.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from keyvault import tahost
from keyvault.scope import APPID

MAX_COMMAND_BYTES = 65536
MAX_BATCH = 50  # rotations in one generate_many_script
ROOT_COMMAND = "ta-tool generate_root_secret"
APP_TEMPLATE = "ta-tool generate_api_secret -appid {appid}"
_RID_RE = re.compile(r"@@KV:([a-z0-9-]{6,32}):")
_CLEANUP_IDS_RE = re.compile(r'umask 077; kv_ids="([a-z0-9-]{6,32}(?: [a-z0-9-]{6,32})*)"; ')
_CALL_RE = re.compile(r"([a-z0-9-]{6,32}) (.*)")
# shlex.quote leaves every APPID unquoted, so the rendered command contains it verbatim.
_APPID_RE = re.compile(rf"-appid ({APPID})")
_MAX_CANDIDATES = 4


@dataclass(frozen=True)
class Accepted:
    """A command the front will run: which tahost script, for what."""

    method: str  # su | sudo | none
    kind: str  # check | generate | fetch | cleanup
    script: str
    rid: str | None = None
    scope: str | None = None  # for generate: root or app:<APPID>
    batch: int = 1  # rotations in a generate_many_script

    def describe(self) -> str:
        parts = [f"{self.kind} via {self.method}"]
        if self.rid:
            parts.append(f"rotation {self.rid}")
        if self.scope:
            parts.append(self.scope)
        if self.batch > 1:
            parts.append(f"and {self.batch - 1} more")
        return ", ".join(parts)


def _unwrap(command: str, ta_user: str) -> tuple[str, str] | None:
    """(method, script) if ``command`` is exactly a ``Become.wrap`` of some script."""
    try:
        argv = shlex.split(command)
    except ValueError:
        return None
    if len(argv) == 5 and argv[:2] == ["su", "-"] and argv[2] == ta_user and argv[3] == "-c":
        method, script = "su", argv[4]
    elif (
        len(argv) == 7
        and argv[:3] == ["sudo", "-n", "-iu"]
        and argv[3] == ta_user
        and argv[4:6] == ["sh", "-c"]
    ):
        method, script = "sudo", argv[6]
    elif len(argv) == 3 and argv[:2] == ["bash", "-lc"]:
        method, script = "none", argv[2]
    else:
        return None
    if tahost.Become(method=method, ta_user=ta_user).wrap(script) != command:
        return None
    return method, script


def _candidates(pattern: re.Pattern[str], text: str) -> list[str]:
    found: list[str] = []
    for value in pattern.findall(text):
        if value not in found:
            found.append(value)
        if len(found) >= _MAX_CANDIDATES:
            break
    return found


def classify(command: str, *, ta_user: str = "ta") -> Accepted | None:
    """The keyvault script that ``command`` is, character for character; else None."""
    if len(command) > MAX_COMMAND_BYTES:
        return None
    unwrapped = _unwrap(command, ta_user)
    if unwrapped is None:
        return None
    method, script = unwrapped
    if script == tahost.check_script(ROOT_COMMAND):
        return Accepted(method, "check", script)
    many = _CLEANUP_IDS_RE.match(script)
    if many and script == tahost.cleanup_many_script(many.group(1).split(" ")):
        return Accepted(method, "cleanup", script, many.group(1).split(" ")[0])
    if script.startswith(tahost.GENERATE_PREFIX):
        return _classify_generate(method, script)
    for rid in _candidates(_RID_RE, script):
        if script == tahost.fetch_script(rid):
            return Accepted(method, "fetch", script, rid)
        if script == tahost.cleanup_script(rid):
            return Accepted(method, "cleanup", script, rid)
    return None


def _job(call: str) -> tuple[str, str, str] | None:
    """(rid, scope, command) of one ``kv_gen RID TOOL 'COMMAND'`` call, for the commands allowed."""
    found = _CALL_RE.fullmatch(call)
    if found is None:
        return None
    rid, rest = found.groups()
    try:
        words = shlex.split(rest)
    except ValueError:
        return None
    if len(words) != 2:
        return None
    command = words[1]
    if command == ROOT_COMMAND:
        return rid, "root", command
    appid = _APPID_RE.search(command)
    if appid is not None and command == tahost.render_command(APP_TEMPLATE, appid.group(1)):
        return rid, f"app:{appid.group(1)}", command
    return None


def _classify_generate(method: str, script: str) -> Accepted | None:
    # Splitting is only a way to find the parts: the whole script is re-rendered and
    # compared, so a part that merely contains the separator cannot slip through.
    body, clean = script[len(tahost.GENERATE_PREFIX) :], False
    cut = body.rfind("; echo @@KV:")
    if cut != -1 and ":CLEANUP@@; " in body[cut:]:  # the clean_from_stdin tail
        body, clean = body[:cut], True
    if not body.startswith("kv_gen "):
        return None
    calls = body[len("kv_gen ") :].split("; kv_gen ")
    if not 1 <= len(calls) <= MAX_BATCH:
        return None
    jobs = [job for job in map(_job, calls) if job is not None]
    if len(jobs) != len(calls):
        return None
    if (
        tahost.generate_many_script([(rid, cmd) for rid, _, cmd in jobs], clean_from_stdin=clean)
        != script
    ):
        return None
    return Accepted(method, "generate", script, jobs[0][0], jobs[0][1], batch=len(jobs))
