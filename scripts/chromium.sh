#!/usr/bin/env bash
# Make sure Debian's chromium is installed: the report test renders the HTML report in it.
# Installs it with apt-get when missing and this runs as root; otherwise says how to.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "memaudit: chromium is missing; install Debian's chromium package (apt-get install chromium)" \
         "or the report test fails" >&2
    exit 0
fi
echo "memaudit: installing Debian's chromium for the report test (once)" >&2
log="${TMPDIR:-/tmp}/memaudit-chromium-install.log"
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get install -y --no-install-recommends chromium ||
       { apt-get update && apt-get install -y --no-install-recommends chromium; }; } >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    echo "memaudit: installing chromium failed (log: $log); the report test will fail" >&2
fi
