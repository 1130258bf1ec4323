#!/usr/bin/env bash
# Regenerates requirements/constraints.txt: exact versions of everything any extra of
# pyproject.toml installs (pip-tools' pip-compile, run with this machine's pip settings so
# that torch resolves to the CPU wheel). The README's commands, scripts/test.sh and .ci/run
# install with `pip install -c requirements/constraints.txt ...`, so a new machine gets
# exactly these versions. Run it after changing dependencies in pyproject.toml, then run
# the test suite in a new virtual environment (bash .ci/run) before committing both files.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q 'pip-tools>=7.5'
python -m piptools compile --quiet --all-extras --strip-extras --allow-unsafe \
  --no-emit-index-url --no-emit-find-links --output-file requirements/constraints.txt pyproject.toml
echo "wrote requirements/constraints.txt"
