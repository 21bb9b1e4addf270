#!/usr/bin/env bash
# Regenerates requirements/dev.lock: every dev/CI dependency at an exact version, with hashes,
# compiled by pip-tools' pip-compile from pyproject.toml's [dev] extra plus requirements/dev.in
# (which pins the on-disk CPU build torch==2.13.0). pip-tools runs in a throwaway venv, so the
# project's .venv is untouched; scripts/setup_env.sh then installs exactly the lock.
#
#   bash scripts/lock.sh                      # re-lock, keeping current pins where still valid
#   bash scripts/lock.sh --upgrade            # re-lock everything to the newest allowed versions
#   bash scripts/lock.sh --upgrade-package X  # bump one package
#
# Needs Python 3.11 (the on-disk torch wheel is cp311) and pip's machine config (find-links to
# that wheel); uv and poetry don't read it and would resolve torch to a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements/dev.lock
PIP_VERSION=26.3
PIP_TOOLS_VERSION=7.6.2

if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "lock.sh: needs Python 3.11 (got $("$PY" -V 2>&1)); set PYTHON=..." >&2
  exit 1
fi

TOOLS=$(mktemp -d)
trap 'rm -rf "$TOOLS"' EXIT
"$PY" -m venv "$TOOLS/venv"
"$TOOLS/venv/bin/python" -m pip install -q "pip==$PIP_VERSION" "pip-tools==$PIP_TOOLS_VERSION" 2>&1 \
  | { grep -v 'is ignored: it is neither a file nor a directory' || true; } >&2

CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh" "$TOOLS/venv/bin/pip-compile" -q \
  --extra dev \
  --allow-unsafe \
  --strip-extras \
  --generate-hashes \
  --no-emit-index-url \
  --no-emit-find-links \
  --output-file "$LOCK" \
  "$@" \
  pyproject.toml requirements/dev.in 2>&1 \
  | { grep -v 'is ignored: it is neither a file nor a directory' || true; } >&2

# Guards: the CPU torch pin, and no CUDA wheels dragged in by anything.
grep -q '^torch==2\.13\.0+cpu ' "$LOCK" || { echo "lock.sh: $LOCK does not pin torch==2.13.0+cpu" >&2; exit 1; }
if grep -Eiq '^(nvidia-|cuda-)' "$LOCK"; then
  echo "lock.sh: $LOCK pulls NVIDIA/CUDA packages:" >&2
  grep -Ei '^(nvidia-|cuda-)' "$LOCK" >&2
  exit 1
fi

# Our own header above pip-compile's (pip-compile rewrites the whole file on each run).
{
  echo "# requirements/dev.lock: exact versions (with hashes) of everything dev and CI install."
  echo "# Do not edit by hand. Regenerate with: bash scripts/lock.sh [--upgrade | --upgrade-package NAME]"
  echo "# Inputs: pyproject.toml [dev] extra + requirements/dev.in (torch==2.13.0, the CPU build on disk)."
  echo "# Installed by scripts/setup_env.sh (pip install -r this file, then pip install --no-deps -e .)."
  sed '/^# requirements\/dev.lock:/,/^# Installed by scripts\/setup_env.sh/d' "$LOCK"
} > "$LOCK.tmp"
mv "$LOCK.tmp" "$LOCK"
echo "wrote $LOCK ($(grep -c '^[A-Za-z0-9]' "$LOCK") packages)"
