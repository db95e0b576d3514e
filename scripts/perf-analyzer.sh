#!/usr/bin/env bash
# Installs NVIDIA's perf_analyzer into .venv-triton/perf: the binary ships inside the
# tritonclient 2.51.0 wheel (newer wheels need a newer glibc than Debian 12's; the PyPI package
# `perf-analyzer` is a placeholder), and needs libcudart from nvidia-cuda-runtime-cu12 even on
# CPU-only machines, plus Debian's libb64-0d (scripts/system-deps.sh). See PLATFORM-NOTES.
# Idempotent; prints the wrapper's path.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.venv-triton/perf
WRAPPER=.venv-triton/bin/perf_analyzer-geogate
PY=${PYTHON:-python3.11}
if [ ! -x "$WRAPPER" ]; then
  rm -rf "$DIR" && mkdir -p "$DIR/wheels" .venv-triton/bin
  "$PY" -m pip download -q --no-deps -d "$DIR/wheels" tritonclient==2.51.0 nvidia-cuda-runtime-cu12==12.9.79
  "$PY" -m zipfile -e "$DIR"/wheels/tritonclient-2.51.0-*.whl "$DIR/tritonclient"
  "$PY" -m zipfile -e "$DIR"/wheels/nvidia_cuda_runtime_cu12-*.whl "$DIR/cudart"
  BIN="$PWD/$DIR/tritonclient/tritonclient-2.51.0.data/data/bin/perf_analyzer"
  chmod +x "$BIN"
  rm -rf "$DIR/wheels"
  cat > "$WRAPPER" <<WRAP
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$PWD/$DIR/cudart/nvidia/cuda_runtime/lib:\${LD_LIBRARY_PATH:-}"
exec "$BIN" "\$@"
WRAP
  chmod +x "$WRAPPER"
fi
echo "$WRAPPER"
