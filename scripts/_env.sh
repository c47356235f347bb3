# Shared by scripts/demo and scripts/test: make .venv with Python 3.11, 3.12 or 3.13 and install p2pnn into it.
# Sourced, not run. Re-running is cheap: pip skips what is already installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${P2PNN_VENV:-$ROOT/.venv}"
PYTHONS="python3.13 python3.12 python3.11 python3"  # the first one on PATH that is 3.11 to 3.13 makes the venv

find_python() {
    for candidate in $PYTHONS; do
        if command -v "$candidate" >/dev/null 2>&1 &&
           "$candidate" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))' 2>/dev/null; then
            command -v "$candidate"; return 0
        fi
    done
    echo "p2pnn needs Python 3.11, 3.12 or 3.13 (none of $PYTHONS on PATH is)" >&2
    return 1
}

ensure_venv() {  # $1: pip extras, e.g. "[test]" or ""
    local extras="${1:-}"
    if [ ! -x "$VENV/bin/python" ]; then
        local python
        python="$(find_python)"
        echo "p2pnn: creating $VENV with $("$python" --version)" >&2
        "$python" -m venv "$VENV"
    fi
    local stamp="$VENV/.p2pnn-installed$extras"
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        # The first run downloads PyTorch and friends (hundreds of MB, a minute or more): say so, and show
        # each package as pip takes it; the whole pip log stays in $VENV/pip-install.log.
        echo "p2pnn: installing p2pnn$extras and its dependencies into $VENV (first run only; PyTorch is large)" >&2
        local log="$VENV/pip-install.log"
        if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$ROOT$extras" 2>&1 | tee "$log" |
                { grep --line-buffered -E '^(Collecting|Installing collected|Successfully installed)' || true; } |
                sed -u -e 's/^Collecting /  collecting /' -e 's/^Installing collected packages: /  installing: /' \
                       -e 's/^Successfully installed .*/  done/' >&2; then
            echo "p2pnn: pip install failed; its log: $log" >&2
            tail -n 15 "$log" >&2
            return 1
        fi
        touch "$stamp"
    fi
}
