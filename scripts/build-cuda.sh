#!/usr/bin/env bash
# Builds peftdb with `--features cuda` (release, lib + bin) from the PyPI CUDA toolkit of
# scripts/cuda-toolkit.sh, into its own target folder, and checks the binary:
#   - on a machine without a GPU (the libcuda stub on LD_LIBRARY_PATH): `peftdb --help` runs, the CPU path
#     of the CUDA build works (`eval --device cpu`, when the test model is there), and `--device cuda` fails
#     with a clear error (exit 1, "cannot open CUDA device"), never a panic;
#   - on a machine with a GPU: tests/gpu.rs runs for real (fixtures on CUDA vs CPU, rerank throughput);
#   - everywhere: tests/gpu.rs compiles with the cuda feature and runs (it skips, saying why, without a GPU).
#
# Usage: bash scripts/build-cuda.sh
# Environment: PEFTDB_CUDA_DIR (the toolkit, see scripts/cuda-toolkit.sh), PEFTDB_CUDA_TARGET_DIR (the
# cargo target folder, default <repo>/target-cuda), PEFTDB_CUDA_GPU_TEST=0 to skip tests/gpu.rs.
# Cost on a 2-core machine: about 10 minutes the first time (6 of them nvcc on candle's kernels).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
die() {
  echo "build-cuda: error: $*" >&2
  exit 1
}
command -v cargo >/dev/null || die "cargo is required"

env_lines="$(bash scripts/cuda-toolkit.sh)" || die "scripts/cuda-toolkit.sh failed (see above)"
eval "$env_lines"
echo "build-cuda: CUDA_HOME=$CUDA_HOME CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
export CARGO_TARGET_DIR="${PEFTDB_CUDA_TARGET_DIR:-$repo/target-cuda}"
stub=0
case ":$LD_LIBRARY_PATH:" in *"/lib64/stubs:"*) stub=1 ;; esac

start=$(date +%s)
cargo build --release --locked --features cuda --lib --bin peftdb
secs=$(($(date +%s) - start))
bin="$CARGO_TARGET_DIR/release/peftdb"
[ -x "$bin" ] || die "no binary at $bin"
size=$(stat -c %s "$bin")
echo "build-cuda: built $bin in ${secs}s, $((size / 1024 / 1024)) MiB"
echo "build-cuda: libcuda.so.1 => $(ldd "$bin" | awk '$1 == "libcuda.so.1" {print $3}')"

# --help runs (a CUDA build does not start at all without some libcuda.so.1).
"$bin" --help >/dev/null || die "'peftdb --help' of the CUDA build failed (is a libcuda.so.1 on LD_LIBRARY_PATH?)"
echo "build-cuda: 'peftdb --help' runs"

model="${PEFTDB_MODEL_DIR:-$repo/models/all-MiniLM-L6-v2}"
task="$repo/../shared/tasks/metaphor_paraphrase"
if [ "$stub" = 1 ]; then
  # The CPU path of the CUDA build, on a real model, when the test model is there.
  if [ -f "$model/model.safetensors" ] && [ -d "$task" ]; then
    "$bin" --json eval --model "$model" --task "$task" --split dev --device cpu >/dev/null \
      || die "'peftdb eval --device cpu' of the CUDA build failed"
    echo "build-cuda: 'peftdb eval --device cpu' of the CUDA build works"
  else
    echo "build-cuda: no test model at $model (scripts/fetch-model.sh) or no ../shared: CPU run not checked"
  fi
  # --device cuda without a GPU: a clear error, exit 1, no panic.
  set +e
  out="$("$bin" eval --model "$model" --task "$task" --device cuda 2>&1)"
  rc=$?
  set -e
  echo "build-cuda: 'peftdb eval --device cuda' (exit $rc): $out"
  [ "$rc" = 1 ] || die "--device cuda without a GPU: expected exit 1, got $rc"
  case "$out" in *panicked*) die "--device cuda without a GPU panicked" ;; esac
  case "$out" in *"cannot open CUDA device"*) ;; *) die "--device cuda without a GPU: unclear error" ;; esac
fi

if [ "${PEFTDB_CUDA_GPU_TEST:-1}" != 0 ]; then
  [ "$stub" = 1 ] || bash scripts/fetch-model.sh >/dev/null
  start=$(date +%s)
  cargo test --release --locked --features cuda --test gpu -- --nocapture
  echo "build-cuda: tests/gpu.rs with the cuda feature: $(($(date +%s) - start))s"
fi
echo "build-cuda: OK"
