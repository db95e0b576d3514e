#!/usr/bin/env bash
# Builds .venv-triton: a real NVIDIA Triton 2.51 server (the `tritonserver` binary shipped in
# the nvidia-pytriton wheel) with its python backend, in its own environment because
# pytriton needs numpy<2 (the main .venv has numpy 2). Idempotent. See PLATFORM-NOTES.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-triton
PYTHON=${PYTHON:-python3.11}
PYTRITON_VERSION=0.7.0
if [ ! -x "$VENV/bin/tritonserver-geogate" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q "nvidia-pytriton==$PYTRITON_VERSION"
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  PYVER=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  PYLIB=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
  BACKENDS="$PWD/$VENV/backends"
  mkdir -p "$BACKENDS/python"
  cp "$SITE/pytriton/tritonserver/backends/python/libtriton_python.so" \
     "$SITE/pytriton/tritonserver/backends/python/triton_python_backend_utils.py" "$BACKENDS/python/"
  cp "$SITE/pytriton/tritonserver/python_backend_stubs/$PYVER/triton_python_backend_stub" "$BACKENDS/python/"
  # The wrapper sets what the binary needs: the interpreter's own libpython first (else the
  # stub picks up Debian's), the wheel's bundled libs (libcudart etc.), and this venv's bin
  # first on PATH so the python stub imports this venv's numpy<2.
  cat > "$VENV/bin/tritonserver-geogate" <<WRAP
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$PYLIB:$SITE/nvidia_pytriton.libs:\${LD_LIBRARY_PATH:-}"
export PATH="$PWD/$VENV/bin:\$PATH"
exec "$SITE/pytriton/tritonserver/bin/tritonserver" --backend-directory "$BACKENDS" "\$@"
WRAP
  chmod +x "$VENV/bin/tritonserver-geogate"
fi
echo "$VENV/bin/tritonserver-geogate"
