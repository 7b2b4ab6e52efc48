#!/usr/bin/env bash
# make data-fashion: Debian's dataset-fashion-mnist (the original idx files in FASHION_ROOT), then
# DATA/fashion_mnist_{train,test}.beton with their write records (skipped when both exist).
# As root the package is installed with apt-get; otherwise the one command to run is printed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
DATA=${DATA:-data}
FASHION_ROOT=${FASHION_ROOT:-/usr/share/datasets/fashion-mnist}
PACKAGE=dataset-fashion-mnist

if [ ! -e "$FASHION_ROOT/train-images-idx3-ubyte.gz" ]; then
  if [ "$FASHION_ROOT" = /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "data-fashion: installing $PACKAGE with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "$PACKAGE" >/dev/null
  else
    echo "data-fashion: Fashion-MNIST is not in $FASHION_ROOT; install it with:  sudo apt-get install $PACKAGE  (or set FASHION_ROOT to the folder of its four idx files)" >&2
    exit 2
  fi
fi
exec "$PY" -m utils.write_beton --dataset fashion_mnist --root "$FASHION_ROOT" --out "$DATA" --skip-existing
