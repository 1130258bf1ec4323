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
# The dev extra names tensafe[all]: pip-compile pins the project itself as "tensafe @ file:///<this
# checkout>", a path that exists only here; a constraint on it breaks every other checkout.
python - <<'PY'
from pathlib import Path
p = Path("requirements/constraints.txt")
lines = p.read_text().splitlines(keepends=True)
out, skip = [], False
for line in lines:
    if line.startswith("tensafe @ ") or line.startswith("tensafe=="):
        skip = True
        continue
    if skip and line.startswith("    #"):
        continue
    skip = False
    out.append(line)
p.write_text("".join(out))
PY
if grep -q "file://" requirements/constraints.txt; then
  echo "requirements/constraints.txt names a local path; fix scripts/lock.sh" >&2
  exit 1
fi
echo "wrote requirements/constraints.txt"
