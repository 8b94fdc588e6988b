#!/usr/bin/env bash
# Every accelerator figure the issues ask for, in one command, with a log per benchmark.
#
#   bash benchmarks/accelerator.sh CHECKPOINT OUT_DIR [quick]
#
# CHECKPOINT: a csm checkpoint folder (a random full-size one works: the figures do not depend on the weights'
# values); OUT_DIR: where the logs go (one per benchmark, plus device.txt and summary.txt). Each benchmark runs
# under its own time limit, so one that hangs or fails costs its limit and the others still run; the exit
# status counts the benchmarks that failed. `quick` shortens every run and skips the server's warm-up (a check
# that the script works, not a figure).
# Order: what is cheapest and most asked for first (where a batch-1 frame's time goes, batch-1 frame time, int8,
# Mimi memory, then the server).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: bash benchmarks/accelerator.sh CHECKPOINT OUT_DIR [quick]" >&2
  exit 2
fi
CKPT="$1"
OUT="$2"
QUICK="${3:-}"
[ -d "$CKPT" ] || { echo "checkpoint folder not found: $CKPT" >&2; exit 2; }
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
failed=0

run() {  # run NAME SECONDS COMMAND...: COMMAND's output to OUT/NAME.log, its status and time to summary.txt
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s: $*" >>"$OUT/summary.txt"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  tail -n 3 "$OUT/$name.log"
}

{
  date -u
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

if [ "$QUICK" = quick ]; then
  F=8; AGREE=16; LONG=30; LEVELS=(1 4); SLOTS=8; CONV=2; SIZE=(--size tiny); SERVER_FLAGS=(--no-warmup)
else
  F=64; AGREE=200; LONG=600; LEVELS=(1 64 256 600); SLOTS=640; CONV=64; SIZE=(); SERVER_FLAGS=()
fi

# Batch 1: where a frame's device time goes, kernel by kernel, in classes (jax.profiler trace; the table,
# profile.json, the compiled HLO and the raw trace for ui.perfetto.dev in OUT/profile).
run profile_b1 240 "$PY" benchmarks/profile_frame.py "${SIZE[@]}" --batch 1 --frames-per-call 8 --out "$OUT/profile"
# Batch 1: frame time split into backbone, depth pass, sampling and host, beside the bandwidth bound.
run generate_b1 240 "$PY" benchmarks/bench_generate.py "${SIZE[@]}" --batches 1 --frames "$F" --frames-per-call 8
# int8 weights: batch-1 speed and greedy agreement with the unquantized weights.
run generate_b1_int8 240 "$PY" benchmarks/bench_generate.py "${SIZE[@]}" --batches 1 --frames "$F" --frames-per-call 8 \
  --quantize int8 --agreement-frames "$AGREE"
# Mimi: one-shot scratch by length and a long file's peak device memory.
run mimi 240 "$PY" benchmarks/bench_mimi.py --batches 1 --stream-frames 20 --repeats 2 --long-seconds "$LONG"
# The server on this checkpoint: first audio p50/p95/p99, audio s/s, real-time streams per level.
run server 540 "$PY" benchmarks/bench_server.py --checkpoint "$CKPT" --slots "$SLOTS" --frames-per-call 4 \
  "${SERVER_FLAGS[@]}" --clients "${LEVELS[@]}" --requests 1 --max-audio-ms 4000
# Conversations: end of turn to first audio (needs a spoken turn and a speech recognizer: TURN_AUDIO=a WAV,
# ASR_MODEL=a faster-whisper model name or folder, and the converse extra installed).
if [ -n "${TURN_AUDIO:-}" ] && [ -n "${ASR_MODEL:-}" ]; then
  run conversations 600 "$PY" benchmarks/bench_server.py --checkpoint "$CKPT" --slots 128 --frames-per-call 4 \
    "${SERVER_FLAGS[@]}" --conversations "$CONV" --turns 2 --turn-audio "$TURN_AUDIO" --asr-model "$ASR_MODEL"
else
  echo "conversations: skipped (set TURN_AUDIO and ASR_MODEL to run them)" >>"$OUT/summary.txt"
fi

echo "failed: $failed" >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
exit "$failed"
