#!/usr/bin/env bash
# Check the systemd units in this directory with `systemd-analyze verify`, and print
# their exposure score from `systemd-analyze security --offline=yes` (informational).
# The replica template keyvault@.service is verified as itself and as keyvault@8201 and
# keyvault@8202 (the example of docs/deployment.md).
#
#   bash ops/systemd/verify.sh [KEYVAULT_BIN [KEYVAULT_AGENT_BIN]]
#
# `verify` needs ExecStart's binary to exist. The units run
# /opt/keyvault/venv/bin/keyvault (keyvault-agent.service:
# /opt/keyvault-agent/venv/bin/keyvault-agent, from the light client distribution); they are
# copied into a temp dir with those paths rewritten to KEYVAULT_BIN (default:
# /opt/keyvault/venv/bin/keyvault when it exists, else a stub script in the temp dir) and
# KEYVAULT_AGENT_BIN (default: keyvault-agent next to KEYVAULT_BIN, else a stub).
# Nothing is installed, enabled or started, and no user is created (verify does not
# resolve User=). Exits non-zero when verify fails or prints any line about these units
# (unknown keys, bad values, missing binaries...).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
INSTALLED=/opt/keyvault/venv/bin/keyvault
INSTALLED_AGENT=/opt/keyvault-agent/venv/bin/keyvault-agent
UNITS=(keyvault.service keyvault@.service keyvault-rotate.service keyvault-rotate.timer
    keyvault-agent.service)
SERVICES=(keyvault.service keyvault@.service keyvault-rotate.service keyvault-agent.service)
# The replica template is checked as itself and as the two instances of the example
# (docs/deployment.md): each a copy named keyvault@PORT.service, so %i is that port.
INSTANCES=(keyvault@8201.service keyvault@8202.service)

die() { printf 'verify.sh: %s\n' "$*" >&2; exit 1; }

command -v systemd-analyze >/dev/null 2>&1 \
    || die "systemd-analyze not found (Debian: apt-get install systemd; it need not be PID 1)"
echo "$(systemd-analyze --version | head -n 1)"

tmp=$(mktemp -d /tmp/keyvault-units.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

bin=${1:-}
if [[ -z $bin ]]; then
    if [[ -x $INSTALLED ]]; then
        bin=$INSTALLED
    else
        bin=$tmp/stub/keyvault
        mkdir -p "$tmp/stub"
        printf '#!/bin/sh\necho "stub keyvault for systemd-analyze verify" >&2\nexit 1\n' >"$bin"
        chmod 0755 "$bin"
        echo "no KEYVAULT_BIN given and $INSTALLED absent: using a stub"
    fi
fi
[[ -f $bin && -x $bin ]] || die "$bin is not an executable file"
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
agent_bin=${2:-$(dirname "$bin")/keyvault-agent}
if [[ ! -x $agent_bin ]]; then
    agent_bin=$tmp/stub/keyvault-agent
    mkdir -p "$tmp/stub"
    printf '#!/bin/sh\necho "stub keyvault-agent for systemd-analyze verify" >&2\nexit 1\n' >"$agent_bin"
    chmod 0755 "$agent_bin"
    echo "no keyvault-agent next to $bin: using a stub"
fi
agent_bin=$(cd "$(dirname "$agent_bin")" && pwd)/$(basename "$agent_bin")
# Point ExecStart at a symlink under the temp dir, so the rewritten path never needs
# quoting or sed escaping, whatever the real path holds.
mkdir -p "$tmp/bin"
ln -s "$bin" "$tmp/bin/keyvault"
ln -s "$agent_bin" "$tmp/bin/keyvault-agent"

for unit in "${UNITS[@]}"; do
    [[ -f $HERE/$unit ]] || die "$HERE/$unit is missing"
    sed -e "s|$INSTALLED_AGENT|$tmp/bin/keyvault-agent|g" -e "s|$INSTALLED|$tmp/bin/keyvault|g" \
        "$HERE/$unit" >"$tmp/$unit"
    if grep -Eq "$INSTALLED|$INSTALLED_AGENT" "$tmp/$unit"; then
        die "could not rewrite the ExecStart path of $unit"
    fi
done
for unit in "${SERVICES[@]}"; do
    grep -Eq "^ExecStart=$tmp/bin/keyvault(-agent)? " "$tmp/$unit" \
        || die "$unit: ExecStart does not run $INSTALLED or $INSTALLED_AGENT"
done
for instance in "${INSTANCES[@]}"; do
    cp "$tmp/keyvault@.service" "$tmp/$instance"
done
UNITS+=("${INSTANCES[@]}")
SERVICES+=("${INSTANCES[0]}")
echo "checking ${UNITS[*]} with ExecStart -> $bin, $agent_bin"

rc=0
out=$(cd "$tmp" && systemd-analyze verify --man=no "${UNITS[@]/#/$tmp/}" 2>&1) || rc=$?
if [[ -n $out ]]; then printf '%s\n' "$out"; fi
# Lines about other units on this machine are not ours to fix; lines naming our
# units, the temp dir or the binary are.
pattern="$tmp|keyvault(-rotate|-agent|@[0-9]*)?\.(service|timer)|$(printf '%s' "$bin" | sed 's/[][\.*^$|+?(){}]/\\&/g')"
ours=$(printf '%s\n' "$out" | grep -E "$pattern" || true)
if [[ $rc -ne 0 || -n $ours ]]; then
    die "systemd-analyze verify found problems in the units (exit $rc)"
fi
echo "systemd-analyze verify: ${UNITS[*]}: no warnings"

# Exposure score: informational (offline analysis of the unit files, systemd >= 250).
for unit in "${SERVICES[@]}"; do
    [[ $unit == *@.service ]] && continue  # scored as its instance
    if sec=$(cd "$tmp" && systemd-analyze security --offline=yes --no-pager "$tmp/$unit" 2>/dev/null); then
        printf '%s\n' "$sec" | grep -E '^✗' | sed "s/^/  $unit: /" || true
        printf '%s\n' "$sec" | grep -E 'Overall exposure level' || true
    else
        echo "systemd-analyze security --offline=yes is not supported here (systemd < 250); skipped"
        break
    fi
done

# The load balancer example of the two-replica setup: checked when HAProxy is installed.
if command -v haproxy >/dev/null 2>&1; then
    haproxy -c -q -f "$HERE/../haproxy/keyvault.cfg" || die "ops/haproxy/keyvault.cfg is not valid"
    echo "haproxy -c: ops/haproxy/keyvault.cfg is valid"
else
    echo "haproxy not installed: ops/haproxy/keyvault.cfg not checked"
fi
