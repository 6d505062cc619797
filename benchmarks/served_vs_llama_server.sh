#!/usr/bin/env bash
# Served throughput, one server at a time on the same machine, measured by the same client
# (`fp4serve bench serve --base-url`): llama.cpp's llama-server on the Q4_1 GGUF, then fp4serve on
# the same model (the default mode, and --quantization nvfp4 --nvfp4-lm-head), then
# `fp4serve bench compare` tables (llama-server = A, fp4serve = B; B / A > 1: fp4serve ahead).
# Use: benchmarks/served_vs_llama_server.sh LLAMA_BIN_DIR [OUT_DIR]
set -euo pipefail
BIN=${1:?the llama.cpp bin directory (docs/benchmarks.md shows how to build it)}
OUT=${2:-bench_results/served}
GGUF=$(python -c "from fp4serve.default_model import find_default_gguf; print(find_default_gguf())")
SWEEP=(--concurrency 1,4,16 --categories extraction_json,prose --max-tokens 128 --no-progress)
mkdir -p "$OUT"

wait_ready() {
  for _ in $(seq 600); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.2; done
  echo "server at $1 did not come up" >&2; return 1
}

"$BIN/llama-server" -m "$GGUF" --port 8091 -t 2 -np 16 -c 32768 >"$OUT/llama-server.log" 2>&1 &
LLAMA=$!
trap 'kill $LLAMA 2>/dev/null || true' EXIT
wait_ready http://127.0.0.1:8091
fp4serve bench serve --base-url http://127.0.0.1:8091/v1 --label "llama-server Q4_1" --out "$OUT/llama" "${SWEEP[@]}"
kill $LLAMA; wait $LLAMA 2>/dev/null || true

fp4serve bench serve --serve-args "--max-num-seqs 16" --label "fp4serve default" --out "$OUT/fp4serve" "${SWEEP[@]}"
fp4serve bench serve --serve-args "--max-num-seqs 16 --quantization nvfp4 --nvfp4-lm-head" --label "fp4serve nvfp4" \
  --out "$OUT/fp4serve-nvfp4" "${SWEEP[@]}"

echo "## llama-server (A) vs fp4serve default (B)"
fp4serve bench compare "$OUT/llama" "$OUT/fp4serve"
echo "## llama-server (A) vs fp4serve --quantization nvfp4 --nvfp4-lm-head (B)"
fp4serve bench compare "$OUT/llama" "$OUT/fp4serve-nvfp4"
