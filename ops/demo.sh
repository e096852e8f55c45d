#!/usr/bin/env bash
# The main job on a fresh machine: a real rotation over SSH against the bundled
# TA simulator, with an embedded SQLite store and a generated master key.
# Nothing here needs root or a TA cluster. Everything lives in $KEYVAULT_HOME.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export KEYVAULT_HOME=${KEYVAULT_HOME:-$PWD/.kv-demo}
unset KEYVAULT_DATABASE_URL KEYVAULT_MASTER_KEY_FILE
kv() { echo "+ keyvault $*" >&2; .venv/bin/keyvault "$@"; }

kv init
kv sandbox up --ssh-port 0 --api-port 0
trap 'kv sandbox down || true' EXIT
kv host check sandbox
kv rotate root --cluster sandbox --yes
kv rotate app --cluster sandbox demo app1 --yes
kv rotate app --cluster sandbox demo --yes
kv verify --cluster sandbox --root
kv verify --cluster sandbox --appid demo
kv secrets history --cluster sandbox --appid demo
kv secrets list
kv rotations list
echo
echo "done: keys are stored encrypted in $KEYVAULT_HOME/keyvault.db (master key $KEYVAULT_HOME/master.key)."
echo "print one with: KEYVAULT_HOME=$KEYVAULT_HOME .venv/bin/keyvault secrets show --cluster sandbox --appid demo --reveal"
