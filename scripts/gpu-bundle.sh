#!/usr/bin/env bash
# A self-contained folder that runs tests/gpu.rs on a GPU machine with no Rust, no cargo and no network
# (how the figures in README "GPU (CUDA)" were taken): the CUDA build of the test binary (stripped, xz), the
# test model packed for the test's texts (scripts/gpu_bundle_model.py: exact for those texts, about half the
# bytes), the PEFT fixtures, movie_sentiment, and run.sh. About 53 MB.
#
# Usage: bash scripts/gpu-bundle.sh [OUT_DIR]          (default: target/gpu-bundle)
# Then on the GPU machine: bash OUT_DIR/run.sh         (needs python3 with numpy and safetensors, xz, and
#   the CUDA 13 runtime libraries: cudart, cublas(Lt), curand, nvrtc; it finds them under /opt, /usr and
#   /lib, e.g. in a PyTorch install's nvidia/cu13/lib, or set PEFTDB_CUDA_LIBS)
# Here: python3 with numpy, safetensors and tokenizers (PYTHON=... to choose one), the CUDA toolkit of
# scripts/cuda-toolkit.sh, and ../shared (fixtures and tasks) beside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
out="${1:-$repo/target/gpu-bundle}"
py="${PYTHON:-python3}"
shared="${PEFTDB_SHARED_DIR:-$repo/../shared}"
model="${PEFTDB_MODEL_DIR:-$repo/models/all-MiniLM-L6-v2}"
die() {
  echo "gpu-bundle: error: $*" >&2
  exit 1
}
[ -f "$model/model.safetensors" ] || die "no test model at $model: run scripts/fetch-model.sh"
[ -d "$shared/peft-fixtures" ] || die "no ../shared/peft-fixtures at $shared (set PEFTDB_SHARED_DIR)"
"$py" -c 'import numpy, safetensors, tokenizers' 2>/dev/null \
  || die "$py lacks numpy, safetensors or tokenizers (pip install numpy safetensors tokenizers, or set PYTHON)"
eval "$(bash scripts/cuda-toolkit.sh)"
export CARGO_TARGET_DIR="${PEFTDB_CUDA_TARGET_DIR:-$repo/target-cuda}"
bin="$(cargo test --release --locked --features cuda --test gpu --no-run --message-format=json 2>/dev/null \
  | "$py" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        print(m["executable"])' | tail -1)"
[ -x "$bin" ] || die "the CUDA build of tests/gpu.rs failed (run: cargo test --release --features cuda --test gpu --no-run)"
rm -rf "$out" && mkdir -p "$out/model" "$out/shared/tasks"
strip -o "$out/gpu" "$bin" && xz -T2 -9 "$out/gpu"
cp -r "$shared/peft-fixtures" "$out/shared/" && cp -r "$shared/tasks/movie_sentiment" "$out/shared/tasks/"
chmod -R u+w "$out/shared"
(cd "$model" && cp -r config.json tokenizer.json tokenizer_config.json special_tokens_map.json "$out/model/")
# The texts tests/gpu.rs embeds: the fixtures' reference sentence, its own second sentence, movie_sentiment's
# dev split (the episode is drawn from it) and label texts.
texts="$out/texts.txt"
"$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["input"]["text"])' \
  "$shared/peft-fixtures/reference_outputs.json" >"$texts"
sed -n 's/^ *"\(a considerably longer second sentence[^"]*\)",$/\1/p' tests/gpu.rs >>"$texts"
[ "$(wc -l <"$texts")" = 2 ] || die "could not find the test's texts in tests/gpu.rs"
"$py" scripts/gpu_bundle_model.py pack "$model" "$out/model" "$texts" \
  "$shared/tasks/movie_sentiment/dev.jsonl" "$shared/tasks/movie_sentiment/task.json"
xz -T2 -6 "$out/model/packed.safetensors"
cp scripts/gpu_bundle_model.py "$out/"
cat >"$out/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs tests/gpu.rs from this bundle (see scripts/gpu-bundle.sh); logs also go to $OUT when set.
set -uo pipefail
cd "$(dirname "$0")"
log="${OUT:-.}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
xz -d -k -f model/packed.safetensors.xz && python3 gpu_bundle_model.py unpack model || exit 1
xz -d -k -f gpu.xz && chmod +x gpu || exit 1
libs="${PEFTDB_CUDA_LIBS:-}"
if [ -z "$libs" ]; then
  for n in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    f=$(find /opt /usr /lib -name "$n" 2>/dev/null | head -1)
    [ -n "$f" ] || echo "run.sh: $n not found (set PEFTDB_CUDA_LIBS)"
    [ -n "$f" ] && libs="$libs:$(dirname "$f")"
  done
fi
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PEFTDB_MODEL_DIR="$PWD/model" PEFTDB_SHARED_DIR="$PWD/shared" PEFTDB_FIXTURES="$PWD/shared/peft-fixtures"
# The CPU side with 2 threads (the CI machine's), then with every core.
RAYON_NUM_THREADS=2 ./gpu --nocapture --test-threads 1 2>&1 | tee "$log/gpu-test.log"
rc=${PIPESTATUS[0]}
./gpu --nocapture --test-threads 1 stacked 2>&1 | tee "$log/gpu-test-all-cores.log"
exit "$rc"
RUN
chmod +x "$out/run.sh"
echo "gpu-bundle: $out ($(du -sh "$out" | cut -f1)); on the GPU machine: bash $out/run.sh"
