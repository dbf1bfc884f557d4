#!/usr/bin/env bash
# The GPU path in one unattended run (under 10 minutes on a machine with an NVIDIA GPU, the CUDA toolkit and
# cargo): build with --features cuda, run the parity tests on the GPU (the CPU's tolerances), edit a toy photo and
# generate on the GPU, time the engine at SD v1.5 size on random weights (f32 and f16), and print a short report.
#
#   bash tools/gpu-check.sh [OUT_DIR]        (default: target/gpu-check)
#
# Needs nvcc on PATH or CUDA_ROOT (a CUDA toolkit, or the pip packages nvidia-cuda-nvcc/-nvvm/-crt/-runtime 13.4.* and
# nvidia-cuda-cccl:
# see docs/performance.md), CUDA_COMPUTE_CAP if nvidia-smi cannot tell it, and the SD v1.5 configs and CLIP
# tokenizer (../shared/fixtures; without them the engine timing is skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-target/gpu-check}"
mkdir -p "$OUT"
REPORT="$OUT/report.txt"
: >"$REPORT"
say() { echo "$*" | tee -a "$REPORT"; }
step() {  # step NAME TIMEOUT_S COMMAND...: runs, logs to OUT/NAME.log, records pass/fail and seconds
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    say "PASS $name ($((SECONDS - start)) s)"
  else
    say "FAIL $name ($((SECONDS - start)) s, exit $?; last lines of $OUT/$name.log:)"
    tail -n 15 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$REPORT"
  fi
}

say "stylediff GPU check, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if ! command -v nvidia-smi >/dev/null; then
  say "FAIL no nvidia-smi: this machine has no NVIDIA driver"; exit 1
fi
say "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -1)"
if [ -z "${CUDA_COMPUTE_CAP:-}" ]; then
  CUDA_COMPUTE_CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d '.')
  export CUDA_COMPUTE_CAP
fi
if ! command -v nvcc >/dev/null && [ -n "${CUDA_ROOT:-}" ]; then export PATH="$CUDA_ROOT/bin:$PATH"; fi
command -v nvcc >/dev/null || { say "FAIL no nvcc (set CUDA_ROOT or PATH)"; exit 1; }
say "nvcc: $(nvcc --version | tail -1), compute capability $CUDA_COMPUTE_CAP"

step build 420 cargo build --release --features cuda
BIN=target/release/stylediff
[ -x "$BIN" ] || { say "no binary: stopping"; cat "$REPORT"; exit 1; }

# Parity with diffusers on the small random pipelines, on the GPU (same 1e-4 tolerance as on the CPU).
STYLEDIFF_TEST_DEVICE=cuda step parity 300 cargo test --release --features cuda --test parity

# A whole toy edit (inversion with StyleDiffusion, then P2Plus) and a generation on the GPU, end to end.
photo="$OUT/toy-photo.png"
step toy-render 60 "$BIN" toy render --caption "a red circle on a blue background" --out "$photo"
step toy-run-cuda 300 "$BIN" run --device cuda --image "$photo" --prompt "a red circle on a blue background" \
  --target "a red square on a blue background" --out "$OUT/toy-edit-cuda.png"
step toy-generate-cuda 120 "$BIN" generate --device cuda --prompt "a red circle on a blue background" \
  --out "$OUT/toy-generate-cuda.png"

# Engine timing at SD v1.5 size (random weights) on the GPU.
CONFIGS=../shared/fixtures/real-models/sd-v1-5
if [ -d "$CONFIGS" ]; then
  MODEL="$OUT/sd15-random"
  [ -d "$MODEL" ] || step random-model 120 "$BIN" engine random-model --config "$CONFIGS" \
    --tokenizer ../shared/fixtures/clip-tokenizer \
    --image-encoder-config ../shared/fixtures/real-models/clip-vit-base-patch16/image_encoder --out "$MODEL"
  step engine-bench-f32 240 "$BIN" engine bench --device cuda --model "$MODEL" --repeats 5 --out-dir "$OUT/bench-f32"
  step engine-bench-f16 240 "$BIN" engine bench --device cuda --dtype f16 --model "$MODEL" --repeats 5 \
    --parts unet-batch1,unet-batch2,unet-forward-backward,vae-decode --out-dir "$OUT/bench-f16"
  for b in bench-f32 bench-f16; do
    [ -f "$OUT/$b/report.json" ] && sed -n '/^stylediff/,$p' "$OUT/engine-$b.log" | tee -a "$REPORT"
  done
else
  say "SKIP engine timing: $CONFIGS is absent"
fi
say "report: $REPORT"
grep -q '^FAIL' "$REPORT" && exit 1 || exit 0
