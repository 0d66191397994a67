#!/usr/bin/env bash
# A CUDA 13.0 toolkit for building peftdb with `--features cuda`, from PyPI alone (no GPU, no driver, no
# system CUDA needed). Idempotent: the first run installs about 1.2 GB; later runs only print.
#
#   eval "$(bash scripts/cuda-toolkit.sh)"      # then: cargo build --release --features cuda
#
# What it lays out under $PEFTDB_CUDA_DIR (default: .cuda/ in the repository, gitignored):
#   pip/                 the wheels (`pip install --target`), nvidia/cu13/{bin,include,nvvm,lib}
#   home/                CUDA_HOME: bin, include, nvvm -> pip/nvidia/cu13/...; lib64/lib*.so, unversioned
#                        links to the wheels' versioned libraries (the linker's -lcudart, -lcublas, ...)
#   home/lib64/stubs/    libcuda.so(.1): a stub of the driver library (no wheel ships libcuda). It defines
#                        every cu* function that cudarc's driver bindings declare (the version candle uses,
#                        per Cargo.lock) and every one cuda.h declares; each returns 34,
#                        CUDA_ERROR_STUB_LIBRARY. Enough to link, and to run on the CPU.
#
# It prints (stdout, nothing else goes there) the export lines: CUDA_HOME, PATH, CUDA_COMPUTE_CAP, and
# LD_LIBRARY_PATH for running a CUDA build: the wheels' libraries, plus the stub only where this machine
# has no real driver (a GPU machine must load the real libcuda.so.1; the stub would hide it).
#
# Environment:
#   PEFTDB_CUDA_DIR     where the toolkit goes (default <repo>/.cuda)
#   PEFTDB_CUDA_STUB    1: put the stub on LD_LIBRARY_PATH; 0: never; default: only when no driver is found
#   CUDA_COMPUTE_CAP    kept when set; else the GPU's (nvidia-smi), else 90 (sm_90a: H100/H200 only)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
spec='cuda-toolkit[nvcc,crt,nvvm,cudart,cccl,cublas,curand,nvrtc]==13.0.2'
dir="${PEFTDB_CUDA_DIR:-$repo/.cuda}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
pip_dir="$dir/pip"
home="$dir/home"
log() { echo "cuda-toolkit: $*" >&2; }
die() {
  echo "cuda-toolkit: error: $*" >&2
  exit 1
}

# 1. The wheels, installed once (into a temporary folder, renamed into place when complete).
if [ "$(cat "$pip_dir/.peftdb-spec" 2>/dev/null)" != "$spec" ]; then
  python3 -m pip --version >/dev/null 2>&1 \
    || die "pip is required to install the CUDA toolkit from PyPI (apt-get install python3-pip)"
  log "installing $spec into $pip_dir (about 1.2 GB; once)"
  rm -rf "$pip_dir.tmp"
  python3 -m pip install --quiet --disable-pip-version-check --target "$pip_dir.tmp" "$spec" >&2 \
    || die "pip install of $spec failed"
  [ -x "$pip_dir.tmp/nvidia/cu13/bin/nvcc" ] || die "the wheels brought no nvidia/cu13/bin/nvcc"
  echo "$spec" >"$pip_dir.tmp/.peftdb-spec"
  rm -rf "$pip_dir" "$home"
  mv "$pip_dir.tmp" "$pip_dir"
fi
cu="$pip_dir/nvidia/cu13"

# 2. CUDA_HOME: the wheel's tree, plus unversioned library names for the linker.
mkdir -p "$home/lib64/stubs"
for d in bin include nvvm; do
  ln -sfn "$cu/$d" "$home/$d"
done
for lib in cudart cublas cublasLt curand nvrtc; do
  # The wheels ship libX.so.N (one major version each); pick the shortest such name.
  real="$(find "$cu/lib" -maxdepth 1 -name "lib$lib.so.*" -printf '%f\n' | awk '{print length, $0}' | sort -n \
    | head -n 1 | cut -d' ' -f2)"
  [ -n "$real" ] || die "no lib$lib.so.* in $cu/lib"
  ln -sfn "$cu/lib/$real" "$home/lib64/lib$lib.so"
done

# 3. The libcuda stub: every cu* name of cudarc's driver bindings and of cuda.h (after its macros, so the
#    _v2 names the real library exports), each `int f(void) { return 34; }`. cuGetErrorName/String answer
#    with a sentence, so that an error printed by a CUDA build says what happened.
stubs="$home/lib64/stubs"
command -v gcc >/dev/null || die "gcc is required to build the libcuda stub (apt-get install gcc)"
cudarc_ver="$(awk '/^name = "cudarc"$/ {getline; gsub(/version = |"/, ""); print; exit}' "$repo/Cargo.lock")"
[ -n "$cudarc_ver" ] || die "no cudarc in Cargo.lock (has candle's cuda feature been removed?)"
find_sys() { # prints the path, or nothing (status 0 either way: `set -e` must not stop at "not yet")
  local f
  for f in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_ver"/src/driver/sys/mod.rs; do
    [ -f "$f" ] && { echo "$f"; return 0; }
  done
  return 0
}
sys="$(find_sys)"
if [ -z "$sys" ]; then
  log "fetching the crates (cudarc $cudarc_ver's sources are not in the cargo registry yet)"
  (cd "$repo" && cargo fetch --locked >&2) || die "cargo fetch failed"
  sys="$(find_sys)"
fi
[ -n "$sys" ] || die "cudarc-$cudarc_ver/src/driver/sys/mod.rs not found under ${CARGO_HOME:-$HOME/.cargo}/registry/src"
names="$(
  {
    grep -oE '^\s*pub unsafe fn cu[A-Za-z0-9_]+' "$sys" | awk '{print $4}' || true
    { gcc -E -P -x c -I "$cu/include" "$cu/include/cuda.h" 2>/dev/null || true; } \
      | grep -oE 'CUresult[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]*\(' | grep -oE 'cu[A-Za-z0-9_]+' || true
  } | sort -u
)"
count="$(echo "$names" | grep -c . || true)"
[ "$count" -ge 300 ] || die "only $count driver functions found in $sys and cuda.h: their layout changed"
src="$stubs/libcuda-stub.c"
{
  echo "/* Generated by scripts/cuda-toolkit.sh: a libcuda.so.1 stub for linking and CPU-only runs."
  echo "   $count functions (cudarc $cudarc_ver driver bindings and cuda.h); each returns"
  echo "   CUDA_ERROR_STUB_LIBRARY (34). */"
  echo 'static const char msg[] = "CUDA driver stub library (scripts/cuda-toolkit.sh): no real CUDA driver is loaded";'
  echo 'int cuGetErrorName(int e, const char **s) { (void)e; if (s) *s = "CUDA_ERROR_STUB_LIBRARY"; return 0; }'
  echo 'int cuGetErrorString(int e, const char **s) { (void)e; if (s) *s = msg; return 0; }'
  echo "$names" | grep -vxE 'cuGetErrorName|cuGetErrorString' | sed 's/.*/int &(void) { return 34; }/'
} >"$src.new"
if ! cmp -s "$src.new" "$src" || [ ! -f "$stubs/libcuda.so.1" ]; then
  log "building the libcuda stub ($count functions) in $stubs"
  gcc -shared -fPIC -O1 -w -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so.1.tmp" -x c "$src.new" \
    || die "gcc could not build the libcuda stub"
  mv "$stubs/libcuda.so.1.tmp" "$stubs/libcuda.so.1"
  ln -sfn libcuda.so.1 "$stubs/libcuda.so"
  mv "$src.new" "$src"
else
  rm -f "$src.new"
fi

# 4. The environment.
real_driver=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  real_driver=1
elif /sbin/ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
  real_driver=1
fi
use_stub="${PEFTDB_CUDA_STUB:-$((1 - real_driver))}"
cap="${CUDA_COMPUTE_CAP:-}"
if [ -z "$cap" ] && [ "$real_driver" = 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
  cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d '. ')"
fi
cap="${cap:-90}"
ld="$cu/lib"
if [ "$use_stub" = 1 ]; then
  ld="$stubs:$ld"
  log "no CUDA driver here: LD_LIBRARY_PATH includes the libcuda stub (a CUDA build runs, on the CPU only)"
fi
echo "export CUDA_HOME='$home'"
echo "export PATH='$home/bin':\"\$PATH\""
echo "export CUDA_COMPUTE_CAP='$cap'"
echo "export LD_LIBRARY_PATH='$ld'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
