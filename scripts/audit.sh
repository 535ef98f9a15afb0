#!/usr/bin/env bash
# The main job: a complete local audit of the built-in default model, offline, on CPU.
# Extra arguments go to `memaudit run` (e.g. --set generation.samples_per_prompt=8).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/venv.sh")"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec "$venv/bin/memaudit" run "$@"
