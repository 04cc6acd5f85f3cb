#!/usr/bin/env bash
# Install snncc into the current Python environment, with what its tests and examples need.
# Idempotent: safe to run again; it only installs what is missing or changed.
#
#   bash tools/setup.sh            # uses `python`; set PYTHON=/path/to/python to choose another
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python}"
pip_install() { "$PYTHON" -m pip install -q --disable-pip-version-check "$@"; }

# 1. torch: keep an installed one (any recent version, >= 2.1 as setup.py requires); otherwise the pinned
#    version (on the project's machines this resolves to a local CPU-only build).
TORCH_OK='import sys, torch; sys.exit(tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 1))'
if "$PYTHON" -c "$TORCH_OK" >/dev/null 2>&1; then
    echo "setup: torch $("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null) already installed"
else
    echo "setup: installing torch==2.13.0"
    pip_install "torch==2.13.0"
fi

# 2. snncc itself (editable) with the test and demo dependencies (pytest, hypothesis, scikit-learn).
pip_install -e ".[test]"

# 3. Interop extras, without their dependencies: their metadata pulls torchvision, which would replace the
#    CPU torch with a CUDA build. Optional: the tests that need them skip when they are absent.
if pip_install --no-deps "spikingjelly==0.0.0.0.14" "snntorch==1.0.0"; then
    echo "setup: spikingjelly and snntorch installed"
else
    echo "setup: WARNING: could not install spikingjelly/snntorch; their interop tests will be skipped" >&2
fi

"$PYTHON" -c "import snncc, torch; print(f'setup: ok (snncc {snncc.__version__}, torch {torch.__version__})')"
