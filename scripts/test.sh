#!/usr/bin/env bash
# The test suite (CPU only). Extra arguments go to pytest (e.g. -k config, --run-slow).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$("$root/scripts/venv.sh")"
"$root/scripts/chromium.sh"
export HF_HUB_OFFLINE=1
cd "$root"
exec "$venv/bin/python" -m pytest "$@"
