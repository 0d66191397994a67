#!/usr/bin/env bash
# Run every cargo-fuzz target for a bounded time.
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 60 s each, all targets)
# Needs cargo-fuzz (`cargo install cargo-fuzz`). On a stable toolchain, RUSTC_BOOTSTRAP=1 lets cargo-fuzz
# pass its -Z flags. Seeds: the real PEFT fixtures (../shared/peft-fixtures) and fuzz/seeds/<target>/.
# Crashes land in fuzz/artifacts/<target>/; turn each into a regression test (tests/fuzz_regressions.rs).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
SECS="${1:-60}"
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(safetensors_parse read_adapter tensor_name manifest store_codec)
fi
export RUSTC_BOOTSTRAP=1
FIX="${PEFTDB_FIXTURES:-../../shared/peft-fixtures}"
# Build once (release + debug assertions, address sanitizer).
cargo fuzz build -O
status=0
for t in "${TARGETS[@]}"; do
  corpus="corpus/$t"
  mkdir -p "$corpus"
  if [ -d "seeds/$t" ]; then cp -n seeds/"$t"/* "$corpus"/ 2>/dev/null || true; fi
  if [ -d "$FIX" ]; then
    case "$t" in
      safetensors_parse|store_codec)
        for f in "$FIX"/*/adapter_model.safetensors; do
          cp -n "$f" "$corpus/$(basename "$(dirname "$f")").st" 2>/dev/null || true
        done ;;
      read_adapter)
        # u16 LE config length | config | selector byte | weights
        for d in "$FIX"/*/; do
          n=$(basename "$d")
          python3 - "$d" "$corpus/$n.bin" <<'PY' || true
import struct, sys, os
d, out = sys.argv[1], sys.argv[2]
c = open(os.path.join(d, "adapter_config.json"), "rb").read()
w = open(os.path.join(d, "adapter_model.safetensors"), "rb").read()
open(out, "wb").write(struct.pack("<H", len(c)) + c + b"\x00" + w[:65536])
PY
        done ;;
      tensor_name)
        printf 'base_model.model.encoder.layer.3.attention.self.query.lora_A.weight' > "$corpus/lora_a"
        printf 'prompt_embeddings' > "$corpus/prompt" ;;
      manifest)
        printf '{"version":1,"tasks":[{"name":"t"}],"objects":[{"path":"a/b","task":"t","stage":"best"}]}' > "$corpus/ok.json" ;;
    esac
  fi
  echo "== fuzzing $t for ${SECS}s"
  if ! cargo fuzz run -O "$t" "$corpus" -- -max_total_time="$SECS" -rss_limit_mb=2048 -max_len=1048576 -print_final_stats=1; then
    echo "!! $t found a crash: see fuzz/artifacts/$t/"
    status=1
  fi
done
exit $status
