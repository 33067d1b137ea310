#!/usr/bin/env bash
# Creates (once) the virtualenv the Makefile uses and installs moalign into it.
# - A machine whose python3 already has a CUDA torch keeps it: the venv sees the system site-packages.
# - Otherwise torch==2.13.0 is installed first (a local CPU wheel on our machines; an unpinned torch
#   would pull a multi-GB CUDA build), then moalign and its dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MOALIGN_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "[bootstrap] CUDA torch found in $PY: creating $VENV with system site-packages (your torch is kept)"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    echo "[bootstrap] creating $VENV"
    "$PY" -m venv "$VENV"
  fi
fi

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "[bootstrap] installing torch==2.13.0"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
fi

STAMP="$VENV/.moalign-installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "[bootstrap] installing moalign (editable) and its dependencies"
  "$VENV/bin/python" -m pip install -q -e ".[dev,demo]"
  touch "$STAMP"
fi
