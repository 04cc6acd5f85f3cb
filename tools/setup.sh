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

# 3. Interop extras, without their dependencies: their metadata pulls torchvision and torchaudio, which would
#    replace the CPU torch with a CUDA build. Optional: the tests that need them skip when they are absent.
#    SpikingJelly 2.x is the current release and what the main environment gets. Of its long requirement list
#    (h5py, scipy, tensorboard, SciencePlots, ...) only loguru and numpy are imported by
#    spikingjelly.activation_based.{neuron,layer,surrogate,functional} on the CPU (checked in a bare venv
#    holding only torch); numpy comes with snncc, so loguru is the one extra. The rest serve datasets,
#    plotting and the CUDA/Triton back ends, none of which snncc or its tests touch.
if pip_install --no-deps "spikingjelly==2.0.0" "loguru==0.7.3" "snntorch==1.0.0"; then
    echo "setup: spikingjelly 2.0.0 and snntorch 1.0.0 installed"
else
    echo "setup: WARNING: could not install spikingjelly/snntorch; their interop tests will be skipped" >&2
fi

# 3a. SpikingJelly 2.x's model zoo (spikingjelly.activation_based.model, used by the interop tests' VGG and
#     SEW-ResNet) imports h5py at package import, for its checkpoint tools. h5py is a binary wheel needing only
#     numpy, so --no-deps is safe. Optional: without it the zoo tests skip.
if pip_install --no-deps "h5py==3.16.0"; then
    echo "setup: h5py installed (for SpikingJelly's model zoo)"
else
    echo "setup: WARNING: could not install h5py; the SpikingJelly model-zoo tests will be skipped" >&2
fi

# 3b. SpikingJelly 0.0.0.0.14 (the release most published SNN code was written against; its nodes differ from
#     2.x's) in a repo-local folder outside the environment, so that both versions can be tested:
#     tests/test_sj_versions.py runs it with PYTHONPATH=build/sj014. build/ is git-ignored. It imports nothing
#     beyond torch and numpy, hence --no-deps. Installed into a temporary folder and moved into place, so an
#     interrupted install leaves no half-filled folder that looks installed; skipped when already there.
SJ014_DIR="build/sj014"
SJ014_VERSION="0.0.0.0.14"
SJ014_OK="import sys, importlib.metadata as m; sys.exit(not any(d.version == '$SJ014_VERSION' for d in m.distributions(name='spikingjelly', path=['$SJ014_DIR'])))"
if [ -d "$SJ014_DIR/spikingjelly" ] && "$PYTHON" -c "$SJ014_OK" >/dev/null 2>&1; then
    echo "setup: spikingjelly $SJ014_VERSION already in $SJ014_DIR"
else
    rm -rf "$SJ014_DIR.tmp"
    mkdir -p "$(dirname "$SJ014_DIR")"
    if pip_install --no-deps --target "$SJ014_DIR.tmp" "spikingjelly==$SJ014_VERSION"; then
        rm -rf "$SJ014_DIR"
        mv "$SJ014_DIR.tmp" "$SJ014_DIR"
        echo "setup: spikingjelly $SJ014_VERSION installed in $SJ014_DIR"
    else
        rm -rf "$SJ014_DIR.tmp"
        echo "setup: WARNING: could not install spikingjelly $SJ014_VERSION into $SJ014_DIR;" \
             "tests/test_sj_versions.py will skip its 0.0.0.0.14 test" >&2
    fi
fi

"$PYTHON" -c "import snncc, torch; print(f'setup: ok (snncc {snncc.__version__}, torch {torch.__version__})')"
