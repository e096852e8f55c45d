#!/usr/bin/env bash
# Stop the test sshd started by tests/sshd/setup.sh.
#
#   tests/sshd/stop.sh [--out DIR] [--sessions]
#
# --sessions also kills the per-connection sshd processes of that listener (open
# SSH sessions survive the listener otherwise). Users, keys and the emulator stay.
set -euo pipefail

OUT=/var/lib/keyvault-test
SESSIONS=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) [[ $# -ge 2 ]] || { echo "stop.sh: --out needs a value" >&2; exit 2; }; OUT=$2; shift 2 ;;
        --out=*) OUT=${1#*=}; shift ;;
        --sessions) SESSIONS=1; shift ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "stop.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done
[[ $(id -u) -eq 0 ]] || { echo "stop.sh: must be run as root" >&2; exit 1; }

PID_FILE=${OUT%/}/sshd.pid
if [[ ! -s $PID_FILE ]]; then
    echo "[sshd-stop] no pid file $PID_FILE: nothing to stop"
    exit 0
fi
pid=$(tr -dc '0-9' <"$PID_FILE")
if [[ -z $pid || ! -r /proc/$pid/cmdline ]] || ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q sshd; then
    echo "[sshd-stop] pid ${pid:-?} from $PID_FILE is not a running sshd; removing the stale pid file"
    rm -f "$PID_FILE"
    exit 0
fi

if [[ $SESSIONS -eq 1 ]]; then
    children=$(ps -o pid= --ppid "$pid" || true)
    for c in $children; do kill -KILL "$c" 2>/dev/null || true; done
    echo "[sshd-stop] killed $(wc -w <<<"$children") session process(es)"
fi
kill -TERM "$pid" 2>/dev/null || true
for _ in $(seq 50); do [[ -e /proc/$pid ]] || break; sleep 0.1; done
if [[ -e /proc/$pid ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
rm -f "$PID_FILE"
echo "[sshd-stop] stopped sshd (pid $pid)"
