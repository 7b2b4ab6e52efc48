#!/usr/bin/env bash
# Idempotent set-up: FFCV's system libraries, a virtual environment, the Python packages.
# Re-running it does nothing once everything is in place (the stamp file holds a hash of
# requirements.txt; editing requirements.txt re-runs the pip step).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
APT_PACKAGES="libopencv-dev libturbojpeg0-dev pkg-config"

have_system_libs() {
  command -v pkg-config >/dev/null 2>&1 &&
    pkg-config --exists opencv4 &&
    { pkg-config --exists libturbojpeg || ls /usr/lib/*/libturbojpeg.so* >/dev/null 2>&1 || ls /usr/lib/libturbojpeg.so* >/dev/null 2>&1; }
}

if ! have_system_libs; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing FFCV's system libraries ($APT_PACKAGES) with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $APT_PACKAGES >/dev/null
  else
    echo "setup: FFCV needs system libraries that are missing; install them first, e.g." >&2
    echo "  sudo apt-get install $APT_PACKAGES" >&2
    exit 1
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi

want=$(sha256sum requirements.txt | cut -d' ' -f1)
stamp="$VENV/.requirements.sha256"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing requirements.txt into $VENV (torch is a large download the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  # FFCV's build imports numpy and needs a C compiler; install the build-time needs first.
  "$VENV/bin/python" -m pip install -q "numpy>=1.26" "torch>=2.4" "torchvision>=0.19"
  "$VENV/bin/python" -m pip install -q -r requirements.txt
  "$VENV/bin/python" - <<'PY'
import torch, torchvision, ffcv, fastargs  # noqa: F401  fail here, not in the first test
print(f"setup: torch {torch.__version__}, torchvision {torchvision.__version__}, ffcv ok")
PY
  echo "$want" > "$stamp"
fi
