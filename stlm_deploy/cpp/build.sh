#!/usr/bin/env bash
# Configure + build the C++ runtime (stlm::deploy + stlm_infer_cpp) into stlm_deploy/cpp/build.
#
#   stlm_deploy/cpp/build.sh [extra cmake -D options...]
#
# OpenVINO comes from the Python package (its wheel ships headers + CMake config): $PYTHON, else the
# repository's .venv/bin/python, else the first python3 on PATH. Release, -j${JOBS:-2}, ccache when
# installed, Ninja when installed. BUILD_DIR overrides the build folder.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
build_dir="${BUILD_DIR:-$here/build}"
if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x "$repo/.venv/bin/python" ]]; then
  py="$repo/.venv/bin/python"
else
  py="$(command -v python3 || true)"
fi
[[ -n "$py" ]] || { echo "build.sh: no python found (set PYTHON=/path/to/python with openvino installed)" >&2; exit 1; }
ov_dir="$("$py" -c "import openvino, pathlib; print(pathlib.Path(openvino.__file__).parent / 'cmake')" 2>/dev/null)" || {
  echo "build.sh: $py cannot import openvino (pip install openvino, or set PYTHON=...)" >&2; exit 1; }

args=(-S "$here" -B "$build_dir" -DCMAKE_BUILD_TYPE=Release "-DOpenVINO_DIR=$ov_dir")
if [[ ! -f "$build_dir/CMakeCache.txt" ]] && command -v ninja >/dev/null 2>&1; then
  args+=(-G Ninja)
fi
if command -v ccache >/dev/null 2>&1; then
  args+=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
cmake "${args[@]}" "$@"
cmake --build "$build_dir" -j "${JOBS:-2}"
