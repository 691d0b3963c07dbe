# Sourced by bin/run and bin/test: makes sure .venv exists with the given
# requirements installed, then sets $PY to its interpreter.
# Needs only a Python 3.11+ on PATH (or named by $PYTHON).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV_DIR:-$ROOT/.venv}"
REQUIREMENTS="$ROOT/$1"

find_python() {
  local candidate
  for candidate in ${PYTHON:-} python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2])' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  echo "error: Python 3.11 or newer is needed; put python3.11+ on PATH or set PYTHON=/path/to/python" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  BASE_PYTHON="$(find_python)"
  echo "==> creating virtualenv $VENV with $("$BASE_PYTHON" --version)"
  "$BASE_PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# Reinstall only when the pinned requirements changed since the last install.
stamp="$VENV/.installed-$(basename "$REQUIREMENTS")"
want="$(cat "$ROOT"/requirements*.txt | "$PY" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "==> installing $(basename "$REQUIREMENTS") into $VENV"
  "$PY" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
  # (the filter drops noise from pip configs that list absent local indexes)
  "$PY" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS" \
    2> >(grep -v "neither a file nor a directory" >&2)
  echo "$want" >"$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
