#!/usr/bin/env bash
# Set up a real OpenSSH sshd on 127.0.0.1 for keyvault's integration tests.
#
#   sudo tests/sshd/setup.sh --python /path/to/.venv/bin/python [--out DIR] [--port N]
#                            [--fix-perms] [--reset-state]
#
# Idempotent: run it again at any time (keys, host key and the ta password are
# kept; users, profiles, sudoers and the ta-tool wrapper are brought back in line;
# a running instance started from the same --out is restarted).
#
# What it makes (see tests/support/sshd_env.py for how tests read it):
#   users    ta        bash; random password (saved to $OUT/ta-password, 0600); its
#                      login shell's PATH has /opt/ta-sim/bin (the ta-tool emulator)
#            kvops     plain SSH user; must type ta's password to `su - ta`
#            kvsudo    may run anything as ta without a password (`sudo -n -iu ta ...`)
#            tanotool  a user whose PATH has no ta-tool
#   keys     $OUT/keys/<user> (ed25519, 0600) for root kvops kvsudo ta tanotool,
#            each in that user's ~/.ssh/authorized_keys
#   sshd     127.0.0.1:$PORT, own host key and config in $OUT, log $OUT/sshd.log
#   emulator /opt/ta-sim/bin/ta-tool, state /var/lib/ta-sim (owned by ta)
#   $OUT/sshd.json  everything a test needs (host, port, host key, identities, ...)
#
# tests/sshd/stop.sh stops the sshd again.
set -euo pipefail

OUT=/var/lib/keyvault-test
PYTHON=""
PORT=""
FIX_PERMS=0
RESET_STATE=0

TA_SIM_PREFIX=/opt/ta-sim
TA_BIN_DIR=$TA_SIM_PREFIX/bin
TA_BIN=$TA_BIN_DIR/ta-tool
TA_STATE=/var/lib/ta-sim
TA_APPS=demo,app1,app2,app3
SUDOERS_FILE=/etc/sudoers.d/keyvault-test
SSHD=/usr/sbin/sshd
LOGINS=(root kvops kvsudo ta tanotool)
PATH_LINE='export PATH=/opt/ta-sim/bin:$PATH  # keyvault-test: ta-tool emulator'

log() { printf '[sshd-setup] %s\n' "$*"; }
die() { printf '[sshd-setup] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    cat <<EOF
usage: $0 --python PATH [--out DIR] [--port N] [--fix-perms] [--reset-state]

  --python PATH   python of the venv that has keyvault installed (required); the
                  ta user runs it, so it must be reachable by other users
  --out DIR       where keys, config, log and sshd.json go (default $OUT)
  --port N        port on 127.0.0.1 (default: 2222, or the next free one up to 2299)
  --fix-perms     add go+x (traversal only) to the directories that keep the ta
                  user from reaching the python or the keyvault sources (default:
                  stop with an error naming them)
  --reset-state   wipe $TA_STATE before initialising it (fresh keys and counters)
EOF
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --python) [[ $# -ge 2 ]] || die "--python needs a value"; PYTHON=$2; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --out) [[ $# -ge 2 ]] || die "--out needs a value"; OUT=$2; shift 2 ;;
        --out=*) OUT=${1#*=}; shift ;;
        --port) [[ $# -ge 2 ]] || die "--port needs a value"; PORT=$2; shift 2 ;;
        --port=*) PORT=${1#*=}; shift ;;
        --fix-perms) FIX_PERMS=1; shift ;;
        --reset-state) RESET_STATE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[[ $(id -u) -eq 0 ]] || die "must be run as root (it creates users, a sudoers drop-in and starts sshd); try: sudo $0 $*"
[[ -n $PYTHON ]] || { usage >&2; die "--python PATH is required"; }
if [[ -n $PORT ]] && ! [[ $PORT =~ ^[0-9]+$ && $PORT -ge 1 && $PORT -le 65535 ]]; then
    die "--port must be a number between 1 and 65535, not '$PORT'"
fi

# Absolute paths without resolving symlinks: a venv's bin/python is a symlink, and
# resolving it would lose the venv (and keyvault with it).
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s/%s\n' "$PWD" "$1" ;; esac; }
PYTHON=$(abspath "$PYTHON")
OUT=$(abspath "$OUT")
OUT=${OUT%/}
[[ -x $PYTHON ]] || die "--python $PYTHON is not an executable file"
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null \
    || die "$PYTHON is not a working Python >= 3.11"

CONFIG=$OUT/sshd_config
LOG=$OUT/sshd.log
PID_FILE=$OUT/sshd.pid
HOST_KEY=$OUT/ssh_host_ed25519_key
KNOWN_HOSTS=$OUT/known_hosts
PASSWORD_FILE=$OUT/ta-password
KEYS=$OUT/keys
JSON=$OUT/sshd.json

# --------------------------------------------------------------------------- packages
need=()
[[ -x $SSHD ]] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
command -v sudo >/dev/null 2>&1 && command -v visudo >/dev/null 2>&1 || need+=(sudo)
if [[ ${#need[@]} -gt 0 ]]; then
    log "installing ${need[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # Without systemd, openssh-server's postinst would start the system sshd on
    # 0.0.0.0:22; a policy-rc.d that says "no" keeps it from starting anything.
    policy_created=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        policy_created=1
    fi
    rc=0
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}"; } || rc=$?
    if [[ $policy_created -eq 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
    [[ $rc -eq 0 ]] || die "apt-get install ${need[*]} failed (exit $rc)"
else
    log "openssh-server, openssh-client and sudo are installed"
fi

install -d -m 0755 -o root -g root "$OUT"
install -d -m 0700 -o root -g root "$KEYS"

# --------------------------------------------------------------------------- users
ensure_user() {  # ensure_user NAME: a bash user with a home dir
    local name=$1
    if ! id -u "$name" >/dev/null 2>&1; then
        useradd --create-home --shell /bin/bash "$name"
        log "created user $name"
    fi
    [[ $(getent passwd "$name" | cut -d: -f7) == /bin/bash ]] || usermod --shell /bin/bash "$name"
    local home
    home=$(getent passwd "$name" | cut -d: -f6)
    if [[ ! -d $home ]]; then
        install -d -m 0750 -o "$name" -g "$(id -gn "$name")" "$home"
        cp -rT /etc/skel "$home" 2>/dev/null || true
        chown -R "$name:$(id -gn "$name")" "$home"
    fi
    chmod go-w "$home"  # StrictModes refuses keys under a group/world-writable home
}
home_of() { getent passwd "$1" | cut -d: -f6; }

for u in kvops kvsudo ta tanotool; do ensure_user "$u"; done
# useradd leaves '!' (locked) in shadow; '*' means "no password login" but not
# "locked", so public-key logins work whatever sshd/PAM make of locked accounts.
for u in kvops kvsudo tanotool; do usermod -p '*' "$u"; done

if [[ ! -s $PASSWORD_FILE ]]; then
    (umask 077; head -c 48 /dev/urandom | base64 -w0 | tr -dc 'A-Za-z0-9' | cut -c1-24 | tr -d '\n' >"$PASSWORD_FILE")
    log "generated a new password for ta"
fi
chown root:root "$PASSWORD_FILE"
chmod 0600 "$PASSWORD_FILE"
TA_PASSWORD=$(cat "$PASSWORD_FILE")
[[ ${#TA_PASSWORD} -ge 16 ]] || die "$PASSWORD_FILE holds a password shorter than 16 characters; delete it and rerun"
printf 'ta:%s\n' "$TA_PASSWORD" | chpasswd
chage -M 99999 -E -1 ta  # no expiry: an expired password makes su ask for a new one
TA_HOME=$(home_of ta)

# --------------------------------------------------------------------------- python reachable by ta
# The wrapper runs "$PYTHON -m keyvault.sandbox.tatool" as ta: ta needs to traverse
# every directory down to the venv python, its base interpreter and keyvault's sources.
# (From /, so that a checkout in the current directory does not stand in for an install.)
KV_SRC=$(cd / && "$PYTHON" -c 'import os, keyvault; print(os.path.dirname(os.path.dirname(os.path.abspath(keyvault.__file__))))') \
    || die "$PYTHON cannot import keyvault; install it first: $PYTHON -m pip install -e '.[postgres,test]'"
(cd / && "$PYTHON" -c 'import keyvault.sandbox.state, keyvault.sandbox.tatool') 2>/dev/null \
    || die "$PYTHON has keyvault but not keyvault.sandbox.state/tatool (the ta-tool emulator); update the checkout or reinstall"
PY_REAL=$(readlink -f "$PYTHON")

blocked_dirs() {  # print the ancestors of each path that lack o+x (ta owns none of them)
    local p d
    for p in "$@"; do
        d=$p
        [[ -d $d ]] || d=$(dirname "$d")
        while :; do
            if [[ $(stat -c %A "$d") != *[xt] ]]; then printf '%s\n' "$d"; fi
            [[ $d == / ]] && break
            d=$(dirname "$d")
        done
    done | sort -u
}
check_ta_python() {
    (cd / && runuser -u ta -- "$PYTHON" -c 'import keyvault.sandbox.tatool') >/dev/null 2>&1
}
if ! check_ta_python; then
    mapfile -t blocked < <(blocked_dirs "$PYTHON" "$PY_REAL" "$KV_SRC/keyvault")
    if [[ ${#blocked[@]} -gt 0 && $FIX_PERMS -eq 1 ]]; then
        # go+x, not just o+x: a process that drops only its uid (Python's
        # subprocess.run(user=...), as some tests do) keeps gid 0 and so gets the
        # group bits of root-owned directories.
        for d in "${blocked[@]}"; do log "chmod go+x $d (--fix-perms: so that ta can reach the python)"; chmod go+x "$d"; done
    fi
    if ! check_ta_python; then
        err=$(cd / && runuser -u ta -- "$PYTHON" -c 'import keyvault.sandbox.tatool' 2>&1 | tail -n 3 || true)
        msg="user ta cannot run '$PYTHON -c \"import keyvault.sandbox.tatool\"' (needed by the ta-tool wrapper)."
        if [[ ${#blocked[@]} -gt 0 ]]; then
            msg+=$'\n'"  Directories ta cannot traverse: ${blocked[*]}"
            msg+=$'\n'"  Fix: rerun with --fix-perms (adds go+x to them), or make the venv from a python"
            msg+=$'\n'"  outside /root (e.g. /usr/bin/python3 -m venv) in a checkout outside /root."
        fi
        msg+=$'\n'"  Python said: ${err:-nothing}"
        msg+=$'\n'"  Also check that $KV_SRC is readable by other users (o+r on files, o+rx on dirs)."
        die "$msg"
    fi
fi
log "user ta can run $PYTHON and import keyvault from $KV_SRC"

# --------------------------------------------------------------------------- ta-tool emulator
if [[ $RESET_STATE -eq 1 && -d $TA_STATE ]]; then
    log "--reset-state: removing $TA_STATE"
    rm -rf --one-file-system "$TA_STATE"
fi
install -d -m 0755 -o root -g root "$TA_SIM_PREFIX" "$TA_BIN_DIR"
"$PYTHON" -m keyvault.sandbox.state init --state-dir "$TA_STATE" --apps "$TA_APPS" --owner ta
"$PYTHON" -m keyvault.sandbox.state install --dest "$TA_BIN" --state-dir "$TA_STATE" \
    --owner ta --python "$PYTHON"
chmod 0755 "$TA_BIN"
log "ta-tool emulator at $TA_BIN (state $TA_STATE, apps $TA_APPS)"

add_path_line() {  # add_path_line FILE: add the PATH line once, keep the file ta's
    local f=$1
    if [[ ! -e $f ]]; then
        install -m 0644 -o ta -g "$(id -gn ta)" /dev/null "$f"
    fi
    grep -qxF "$PATH_LINE" "$f" || printf '\n%s\n' "$PATH_LINE" >>"$f"
    chown ta:"$(id -gn ta)" "$f"
}
# `su - ta`, `sudo -iu ta` and an SSH login as ta followed by `bash -l` run a login
# shell: bash reads the first of ~/.bash_profile, ~/.bash_login, ~/.profile, sh
# reads ~/.profile. Put the line in ~/.profile and in whichever bash file exists.
add_path_line "$TA_HOME/.profile"
for f in "$TA_HOME/.bash_profile" "$TA_HOME/.bash_login"; do
    if [[ -e $f ]]; then add_path_line "$f"; fi
done
# tanotool must never see ta-tool.
for f in .profile .bash_profile .bash_login .bashrc; do
    f=$(home_of tanotool)/$f
    if [[ -e $f ]]; then sed -i '/keyvault-test: ta-tool emulator/d' "$f"; fi
done

# --------------------------------------------------------------------------- sudoers
tmp_sudoers=$(mktemp)
cat >"$tmp_sudoers" <<'EOF'
# keyvault integration tests (tests/sshd/setup.sh): kvsudo may become ta without a password
kvsudo ALL=(ta) NOPASSWD: ALL
EOF
if ! visudo -cf "$tmp_sudoers" >/dev/null; then rm -f "$tmp_sudoers"; die "visudo rejected the sudoers drop-in"; fi
install -d -m 0755 /etc/sudoers.d
install -m 0440 -o root -g root "$tmp_sudoers" "$SUDOERS_FILE"
rm -f "$tmp_sudoers"
grep -Eq '^[@#]include(dir)?[[:space:]]+/etc/sudoers\.d' /etc/sudoers \
    || die "/etc/sudoers does not include /etc/sudoers.d (add '@includedir /etc/sudoers.d')"
visudo -c >/dev/null || die "visudo -c fails on the installed sudoers files"
log "sudoers drop-in $SUDOERS_FILE: kvsudo ALL=(ta) NOPASSWD: ALL"

# --------------------------------------------------------------------------- client keys
for u in "${LOGINS[@]}"; do
    key=$KEYS/$u
    if [[ ! -f $key ]]; then
        rm -f "$key.pub"
        ssh-keygen -q -t ed25519 -N '' -C "keyvault-test-$u" -f "$key"
        log "generated client key $key"
    fi
    [[ -f $key.pub ]] || ssh-keygen -y -f "$key" | sed "s/\$/ keyvault-test-$u/" >"$key.pub"
    chown root:root "$key" "$key.pub"
    chmod 0600 "$key"
    chmod 0644 "$key.pub"

    home=$(home_of "$u")
    group=$(id -gn "$u")
    chmod go-w "$home"
    install -d -m 0700 -o "$u" -g "$group" "$home/.ssh"
    ak=$home/.ssh/authorized_keys
    [[ -e $ak ]] || install -m 0600 -o "$u" -g "$group" /dev/null "$ak"
    # Replace this script's line (marked by the key comment), keep everything else.
    tmp_ak=$(mktemp)
    { grep -v " keyvault-test-$u\$" "$ak" || true; cat "$key.pub"; } >"$tmp_ak"
    cat "$tmp_ak" >"$ak"
    rm -f "$tmp_ak"
    chown "$u:$group" "$ak"
    chmod 0600 "$ak"
done
log "client keys in $KEYS, installed in ~/.ssh/authorized_keys of ${LOGINS[*]}"

# --------------------------------------------------------------------------- stop a previous sshd
listener_pid() {  # print the pid from the pid file if it is a live sshd
    local pid
    [[ -s $PID_FILE ]] || return 1
    pid=$(tr -dc '0-9' <"$PID_FILE")
    [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q sshd || return 1
    printf '%s\n' "$pid"
}
if pid=$(listener_pid); then
    log "stopping the previous sshd (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do [[ -e /proc/$pid ]] || break; sleep 0.1; done
    if [[ -e /proc/$pid ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
fi
rm -f "$PID_FILE"

# --------------------------------------------------------------------------- port
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [[ -n $PORT ]]; then
    port_busy "$PORT" && die "port $PORT on 127.0.0.1 is in use by another program"
else
    PORT=2222
    while port_busy "$PORT"; do
        PORT=$((PORT + 1))
        [[ $PORT -le 2299 ]] || die "no free port in 2222-2299 on 127.0.0.1; pass --port"
    done
fi

# --------------------------------------------------------------------------- host key + config
if [[ ! -f $HOST_KEY ]]; then
    rm -f "$HOST_KEY.pub"
    ssh-keygen -q -t ed25519 -N '' -C keyvault-test-host -f "$HOST_KEY"
    log "generated host key $HOST_KEY"
fi
[[ -f $HOST_KEY.pub ]] || ssh-keygen -y -f "$HOST_KEY" >"$HOST_KEY.pub"
chown root:root "$HOST_KEY" "$HOST_KEY.pub"
chmod 0600 "$HOST_KEY"
chmod 0644 "$HOST_KEY.pub"
HOST_PUB=$(cut -d' ' -f1,2 "$HOST_KEY.pub")
FINGERPRINT=$(ssh-keygen -lf "$HOST_KEY.pub" | awk '{print $2}')
[[ $FINGERPRINT == SHA256:* ]] || die "unexpected fingerprint from ssh-keygen -lf: $FINGERPRINT"
printf '[127.0.0.1]:%s %s\n' "$PORT" "$HOST_PUB" >"$KNOWN_HOSTS"
chmod 0644 "$KNOWN_HOSTS"

mkdir -p /run/sshd
chmod 0755 /run/sshd
cat >"$CONFIG" <<EOF
# keyvault integration-test sshd, written by tests/sshd/setup.sh; do not edit.
Port $PORT
ListenAddress 127.0.0.1
AddressFamily inet
HostKey $HOST_KEY
PidFile $PID_FILE
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
PubkeyAuthentication yes
AuthenticationMethods publickey
PermitRootLogin prohibit-password
AllowUsers ${LOGINS[*]}
UsePAM yes
MaxSessions 32
MaxStartups 64:30:128
AuthorizedKeysFile .ssh/authorized_keys
StrictModes yes
LogLevel INFO
UseDNS no
PrintMotd no
X11Forwarding no
AllowTcpForwarding no
PermitUserEnvironment no
Subsystem sftp internal-sftp
EOF
chmod 0644 "$CONFIG"
"$SSHD" -t -f "$CONFIG" || die "sshd -t rejected $CONFIG"

# --------------------------------------------------------------------------- start
: >>"$LOG"
"$SSHD" -f "$CONFIG" -E "$LOG" || die "sshd failed to start; see $LOG"
up=0
for _ in $(seq 100); do  # at most 10 s
    if port_busy "$PORT" && listener_pid >/dev/null; then up=1; break; fi
    sleep 0.1
done
[[ $up -eq 1 ]] || { tail -n 20 "$LOG" >&2 || true; die "sshd did not accept connections on 127.0.0.1:$PORT within 10 s; see $LOG"; }
PID=$(listener_pid)
log "sshd pid $PID listening on 127.0.0.1:$PORT (config $CONFIG, log $LOG)"

# --------------------------------------------------------------------------- sshd.json
"$PYTHON" - "$JSON" <<EOF
import json, os, sys
users = {u: {"identity": os.path.join("$KEYS", u)} for u in "${LOGINS[*]}".split()}
data = {
    "host": "127.0.0.1",
    "port": $PORT,
    "host_key_fingerprint": "$FINGERPRINT",
    "host_public_key": "$HOST_PUB",
    "known_hosts_file": "$KNOWN_HOSTS",
    "ta_password_file": "$PASSWORD_FILE",
    "tatool_state_dir": "$TA_STATE",
    "tatool_bin": "$TA_BIN",
    "users": users,
    "sshd_pid_file": "$PID_FILE",
    "sshd_config": "$CONFIG",
    "sshd_log": "$LOG",
    "sshd_bin": "$SSHD",
    "python": "$PYTHON",
}
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    json.dump(data, f, indent=2)
    f.write("\n")
os.chmod(tmp, 0o644)
os.replace(tmp, sys.argv[1])
EOF
log "wrote $JSON"

# --------------------------------------------------------------------------- smoke checks
SSH_OPTS=(-F /dev/null -p "$PORT" -o BatchMode=yes -o IdentitiesOnly=yes
          -o UserKnownHostsFile="$KNOWN_HOSTS" -o GlobalKnownHostsFile=/dev/null
          -o StrictHostKeyChecking=yes -o ConnectTimeout=5 -o LogLevel=ERROR)
ssh_as() {  # ssh_as USER CMD: run CMD over ssh as USER, stdin closed
    local u=$1; shift
    timeout 30 ssh "${SSH_OPTS[@]}" -i "$KEYS/$u" "$u@127.0.0.1" "$@" </dev/null
}
fail=0
check() {  # check DESCRIPTION EXPECTED ACTUAL
    if [[ $2 == "$3" ]]; then log "ok   $1"; else log "FAIL $1: expected '$2', got '$3'"; fail=1; fi
}

out=$(ssh_as root "su - ta -c 'command -v ta-tool'" 2>&1) || true
check "root: su - ta -c 'command -v ta-tool' (no password)" "$TA_BIN" "$out"
# ta-tool with no command prints its usage and exits 1: proves that ta can run the
# python and read the state without generating a key.
out=$(ssh_as root "su - ta -c 'ta-tool'" 2>&1) && rc=0 || rc=$?
check "root: su - ta -c 'ta-tool' runs the emulator (usage, exit 1)" "1 usage" "$rc $(grep -o '^usage' <<<"$out" | head -n1)"
out=$(ssh_as kvops "su - ta -c 'command -v ta-tool'" 2>&1) && rc=0 || rc=$?
check "kvops: su - ta without the password is refused" "refused" "$([[ $rc -ne 0 && $out != *"$TA_BIN"* ]] && echo refused || echo "rc=$rc out=$out")"
# The real thing: type ta's password at su's prompt on a PTY (ssh -tt).
out=$("$PYTHON" - "$KEYS/kvops" "$PORT" "$KNOWN_HOSTS" "$PASSWORD_FILE" <<'EOF' 2>&1
import os, pty, select, sys, time
key, port, known_hosts, pwfile = sys.argv[1:]
password = open(pwfile).read().strip()
argv = ["ssh", "-F", "/dev/null", "-tt", "-p", port, "-i", key, "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
        "-o", "LogLevel=ERROR", "kvops@127.0.0.1", "su - ta -c 'command -v ta-tool'"]
pid, fd = pty.fork()
if pid == 0:
    os.execvp(argv[0], argv)
buf, sent, deadline = b"", False, time.monotonic() + 20
while time.monotonic() < deadline:
    r, _, _ = select.select([fd], [], [], 0.2)
    if r:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
        if not sent and b"assword" in buf:
            os.write(fd, password.encode() + b"\n")
            sent = True
else:
    os.kill(pid, 9)
os.waitpid(pid, 0)
print(buf.decode(errors="replace").replace("\r", "").strip().splitlines()[-1:][0] if buf.strip() else "")
EOF
) || true
check "kvops: su - ta with ta's password on a PTY (ssh -tt)" "$TA_BIN" "$out"
out=$(ssh_as kvsudo "sudo -n -iu ta command -v ta-tool" 2>&1) || true
check "kvsudo: sudo -n -iu ta command -v ta-tool" "$TA_BIN" "$out"
out=$(ssh_as kvsudo "sudo -n -iu tanotool true" 2>&1) && rc=0 || rc=$?
check "kvsudo: sudo -n to another user is refused" "refused" "$([[ $rc -ne 0 ]] && echo refused || echo "rc=$rc")"
out=$(ssh_as ta "bash -lc 'command -v ta-tool'" 2>&1) || true
check "ta: bash -lc 'command -v ta-tool'" "$TA_BIN" "$out"
out=$(ssh_as tanotool "bash -lc 'command -v ta-tool'" 2>&1) && rc=0 || rc=$?
check "tanotool: no ta-tool in a login shell" "1 " "$rc $out"
out=$(ssh_as root "su - tanotool -c 'command -v ta-tool'" 2>&1) && rc=0 || rc=$?
check "root: su - tanotool -c 'command -v ta-tool' finds nothing" "1 " "$rc $out"

if [[ $fail -ne 0 ]]; then
    log "last lines of $LOG:"
    tail -n 20 "$LOG" >&2 || true
    die "smoke checks failed (sshd is left running on 127.0.0.1:$PORT for debugging; tests/sshd/stop.sh --out $OUT stops it)"
fi

cat <<EOF
[sshd-setup] done: sshd on 127.0.0.1:$PORT (pid $PID), host key $FINGERPRINT
[sshd-setup]   env file   $JSON   (tests read it via KEYVAULT_TEST_SSHD=$JSON)
[sshd-setup]   identities $KEYS/{$(IFS=,; echo "${LOGINS[*]}")}
[sshd-setup]   ta-tool    $TA_BIN -> $PYTHON, state $TA_STATE
[sshd-setup]   stop with  tests/sshd/stop.sh --out $OUT
EOF
