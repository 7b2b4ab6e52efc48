#!/usr/bin/env bash
# Fetch the pure-Python wheels the lent GPU machine lacks, and print the one command to run there.
#
#   bash scripts/device_wheels.sh          # -> .whl/*.whl (git-ignored) + the device command
#
# The lent machine has Python 3.12 and its own torch, numpy, OpenCV, pandas, PyYAML, scikit-learn,
# matplotlib, tqdm and tensorboard, but not fastargs (the config schema), terminaltables (fastargs
# needs it) or torch-pruning (channel structure); it cannot reach the internet.  These three are
# pure Python, so wheels downloaded here for Python 3.12 install there without a build.  The
# versions are the ones this checkout's virtualenv tests with (unpinned when it lacks one).
# FFCV is not among them: it is compiled; the device check runs without it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
if [ ! -x "$PYTHON" ]; then PYTHON=python3; fi
WHEELS=.whl
PACKAGES=(fastargs terminaltables torch-pruning)

requirements=()
for package in "${PACKAGES[@]}"; do
    version=$("$PYTHON" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$package")
    requirements+=("${package}${version:+==$version}")
done

mkdir -p "$WHEELS"
for requirement in "${requirements[@]}"; do
    package=${requirement%%==*}
    stem=${package//-/_}
    if ls "$WHEELS"/"${stem}"-*-none-any.whl >/dev/null 2>&1; then
        continue                                           # fetched before
    fi
    # A published wheel for Python 3.12 when there is one; fastargs 1.2.0 is published as a source
    # archive only, so its wheel is built here (pure Python: the py3-none-any wheel runs on 3.12).
    if ! "$PYTHON" -m pip download --quiet --only-binary=:all: --python-version 3.12 --no-deps \
            --dest "$WHEELS" "$requirement" 2>/dev/null; then
        echo "device_wheels: no published wheel for $requirement; building one from its source archive"
        "$PYTHON" -m pip wheel --quiet --no-deps --no-binary "$package" --wheel-dir "$WHEELS" "$requirement"
    fi
    if ! ls "$WHEELS"/"${stem}"-*-none-any.whl >/dev/null 2>&1; then
        echo "device_wheels: no pure-Python (none-any) wheel for $requirement in $WHEELS/" >&2
        exit 1
    fi
done

echo "wheels in $WHEELS/:"
ls -1 "$WHEELS"/*.whl | sed 's/^/  /'
cat <<'EOF'

On the lent GPU machine (the device tool's run: carry [".whl"], timeout_s 560), one command:

python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH; python3 bench/device_check.py --out $OUT/device_check

It takes under 8 minutes and writes $OUT/device_check/device_check.json and device_check.md section
by section (a killed run keeps what it measured).  Rehearse it here first, on the CPU:

.venv/bin/python bench/device_check.py --cpu --tiny --out /tmp/device_check
EOF
