#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv) and print its path.
# Re-installs only when pyproject.toml or constraints.txt changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MEMAUDIT_VENV:-$root/.venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
stamp="$venv/.memaudit-install-stamp"
want="$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" ]]; then
    echo "memaudit: creating virtual environment $venv" >&2
    "$python" -m venv "$venv"
fi
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "memaudit: installing dependencies into $venv (first time: a few minutes)" >&2
    log="$venv/install.log"
    if ! { "$venv/bin/python" -m pip install --upgrade pip &&
           "$venv/bin/python" -m pip install -c "$root/constraints.txt" -e "$root[test]"; } >"$log" 2>&1; then
        tail -n 30 "$log" >&2
        echo "memaudit: installing dependencies failed; the whole log is $log" >&2
        exit 1
    fi
    echo "$want" > "$stamp"
fi
echo "$venv"
