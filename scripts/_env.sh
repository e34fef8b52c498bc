# Sourced by demo.sh and test.sh with the extras they need (setup.cfg): create .venv if missing and
# install imgworker (editable, so edits in this checkout take effect) with those extras.
# Both scripts share .venv; each extras set has its own install stamp, so running one never
# leaves the other's packages out.
set -euo pipefail
extras="${1:?usage: source scripts/_env.sh EXTRAS (demo, test, ...)}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then py="$candidate"; break; fi
  done
fi
[ -n "$py" ] || { echo "imgworker needs Python 3.11 or newer (python3.11 or python3 on PATH)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($py --version)" >&2
  "$py" -m venv .venv
fi
stamp=".venv/.imgworker-installed-${extras}"
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "installing imgworker[${extras}] and its dependencies into .venv" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip >&2
  .venv/bin/python -m pip install --quiet -e ".[${extras}]" >&2
  touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
