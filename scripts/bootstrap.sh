#!/usr/bin/env bash
# Create .venv and install ddpm-deploy with everything the demo and the tests need (CPU machine).
# Re-running is cheap: it reinstalls only when requirements-ci.txt, requirements-nodeps.txt or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.ddpm-deploy-installed
want=$(cat requirements-ci.txt requirements-serve.txt requirements-nodeps.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] installing requirements (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements-ci.txt
  .venv/bin/python -m pip install -q --no-deps -r requirements-serve.txt   # tritonserver (see the file)
  .venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
