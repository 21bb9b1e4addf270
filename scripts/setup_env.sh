#!/usr/bin/env bash
# Creates .venv and installs exactly requirements/dev.lock (every dev/CI dependency at an exact,
# hash-checked version; torch is the on-disk CPU build 2.13.0+cpu, so no CUDA build is ever
# pulled), then memsched itself in editable mode with --no-deps. Idempotent and fast: when the
# stamp in .venv records the current lock, pyproject.toml and Python, nothing is reinstalled.
# Regenerate the lock with scripts/lock.sh after changing dependencies in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements/dev.lock
STAMP=.venv/.memsched-lock.sha256

# The torch pin: a bare or newer torch would pull a multi-GB CUDA build.
grep -q '^torch==2\.13\.0+cpu ' "$LOCK" || { echo "setup_env.sh: $LOCK must pin torch==2.13.0+cpu" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate

want=$( { cat "$LOCK" pyproject.toml; python -VV; } | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
rm -f "$STAMP"

quiet() { "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; return "${PIPESTATUS[0]}"; }

# The locked pip first (its own hash-checked entry), then the rest with it.
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
awk '/^pip==/ {on=1; print; next} on && /^[ \t]/ {print; next} {on=0}' "$LOCK" > "$tmp"
quiet python -m pip install -q --require-hashes -r "$tmp"
quiet python -m pip install -q --require-hashes -r "$LOCK"
# Exactly the lock: drop what an earlier lock or a manual install left behind.
extra=$(python - "$LOCK" <<'PY'
import re, sys
from importlib.metadata import distributions
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
locked = {norm(m.group(1)) for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", open(sys.argv[1]).read(), re.M)}
installed = {norm(d.metadata["Name"]) for d in distributions() if d.metadata["Name"]}
print(" ".join(sorted(installed - locked - {"memsched"})))
PY
)
if [ -n "$extra" ]; then
  echo "setup_env.sh: removing packages not in $LOCK: $extra" >&2
  quiet python -m pip uninstall -q -y $extra
fi
# memsched itself; setuptools (the build backend) comes from the lock, so no build isolation.
quiet python -m pip install -qq --no-deps --no-build-isolation -e .
python -m pip check
echo "$want" > "$STAMP"
