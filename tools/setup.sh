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

# 1b. graphviz's `dot` renders snncc-viz pictures; optional (without it snncc-viz writes DOT and says how to
#     render it). Installed from the system's packages when we can, never fatal.
if ! command -v dot >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    if (apt-get install -y -qq graphviz >/dev/null 2>&1 || \
        (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq graphviz >/dev/null 2>&1)); then
        echo "setup: graphviz installed"
    else
        echo "setup: note: could not install graphviz; snncc-viz will write .dot files instead of pictures" >&2
    fi
fi

# 2. snncc itself (editable) with the test and demo dependencies (pytest, hypothesis, scikit-learn, matplotlib).
pip_install -e ".[test]"

# 3. Interop extras, without their dependencies: their metadata pulls torchvision, which would replace the
#    CPU torch with a CUDA build. Optional: the tests that need them skip when they are absent.
if pip_install --no-deps "spikingjelly==0.0.0.0.14" "snntorch==1.0.0"; then
    echo "setup: spikingjelly and snntorch installed"
else
    echo "setup: WARNING: could not install spikingjelly/snntorch; their interop tests will be skipped" >&2
fi

"$PYTHON" -c "import snncc, torch; print(f'setup: ok (snncc {snncc.__version__}, torch {torch.__version__})')"
