# Shared by scripts/demo and scripts/test: make .venv with Python 3.11 and install p2pnn into it.
# Sourced, not run. Re-running is cheap: pip skips what is already installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${P2PNN_VENV:-$ROOT/.venv}"

find_python() {
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
           "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            command -v "$candidate"; return 0
        fi
    done
    echo "p2pnn needs Python 3.11 (python3.11 not found on PATH)" >&2
    return 1
}

ensure_venv() {  # $1: pip extras, e.g. "[test]" or ""
    local extras="${1:-}"
    if [ ! -x "$VENV/bin/python" ]; then
        "$(find_python)" -m venv "$VENV"
    fi
    local stamp="$VENV/.p2pnn-installed$extras"
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install -qq --disable-pip-version-check -e "$ROOT$extras"
        touch "$stamp"
    fi
}
