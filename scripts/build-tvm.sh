#!/usr/bin/env bash
# Build an Apache TVM wheel from source with LLVM plus the asked GPU backends (the PyPI wheel has
# LLVM and CUDA but no Vulkan), cached outside the repository: a second run with the same source
# commits and options prints the cached wheel at once.
#
#   scripts/build-tvm.sh [--vulkan] [--cuda] [--install VENV]
#
# The TVM source is not part of this repository and is not downloaded here. Point the script at
# git clones (bare or not) of the public repositories:
#   TVM_SOURCE      apache/tvm      (https://github.com/apache/tvm)
#   TVM_FFI_SOURCE  apache/tvm-ffi  (https://github.com/apache/tvm-ffi), the 3rdparty/tvm-ffi
#                   submodule; it must hold the commit that TVM_SOURCE's commit pins
#   TVM_COMMIT      what to build (default: HEAD of TVM_SOURCE)
# tvm-ffi's own submodules (dlpack, libbacktrace) come from the apache-tvm-ffi wheel on PyPI,
# which ships both. Debian packages are installed with apt-get when missing (needs root).
#
# Output: $MLC_ENGINE_CACHE/tvm-build/<key>/dist/apache_tvm-*.whl (MLC_ENGINE_CACHE defaults to
# ~/.cache/mlc_engine), <key> hashing the commits and options; build.log beside it keeps the output.
# --install VENV pip-installs the wheel into that virtual environment, replacing apache-tvm.
set -euo pipefail

vulkan=OFF cuda=OFF venv=""
while [ $# -gt 0 ]; do
    case "$1" in
        --vulkan) vulkan=ON ;;
        --cuda) cuda=ON ;;
        --install) venv=$2; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

: "${TVM_SOURCE:?set TVM_SOURCE to a git clone of https://github.com/apache/tvm}"
: "${TVM_FFI_SOURCE:?set TVM_FFI_SOURCE to a git clone of https://github.com/apache/tvm-ffi}"
# The tvm-ffi wheel whose 3rdparty/ (dlpack, libbacktrace) completes the tvm-ffi source tree.
tvm_ffi_wheel=${TVM_FFI_WHEEL_VERSION:-0.1.15.post2}

commit=$(git -C "$TVM_SOURCE" rev-parse "${TVM_COMMIT:-HEAD}^{commit}")
ffi_commit=$(git -C "$TVM_SOURCE" ls-tree "$commit" 3rdparty/tvm-ffi | awk '{print $3}')
git -C "$TVM_FFI_SOURCE" cat-file -e "$ffi_commit^{commit}" 2>/dev/null || {
    echo "TVM_FFI_SOURCE has no commit $ffi_commit (the tvm-ffi that TVM $commit pins)" >&2
    exit 1
}
# v0.27.dev0-35-g5d4dc87213 -> 0.27.dev35, as TVM's own setuptools_scm settings would say.
version=$(git -C "$TVM_SOURCE" describe --tags --match 'v*' "$commit" |
    sed -E 's/^v([0-9]+\.[0-9]+)\.dev[0-9]+-([0-9]+)-g.*/\1.dev\2/; s/^v//')

# Bump `recipe` when the build steps below change what they produce.
recipe=1
key=$(printf '%s\n' "$recipe" "$commit" "$ffi_commit" "$tvm_ffi_wheel" "vulkan=$vulkan" \
    "cuda=$cuda" | sha256sum | cut -c1-16)
cache=${MLC_ENGINE_CACHE:-$HOME/.cache/mlc_engine}/tvm-build/$key

install_wheel() {
    local wheel
    wheel=$(ls "$cache"/dist/apache_tvm-*.whl)
    echo "$wheel"
    if [ -n "$venv" ]; then
        "$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheel"
        "$venv/bin/python" -m pip install --quiet "apache-tvm-ffi>=$tvm_ffi_wheel" ml_dtypes
        echo "installed into $venv"
    fi
}
if ls "$cache"/dist/apache_tvm-*.whl >/dev/null 2>&1; then
    install_wheel
    exit 0
fi

echo "TVM $commit ($version), tvm-ffi $ffi_commit, vulkan=$vulkan cuda=$cuda -> $cache"

packages=(build-essential ninja-build llvm-15-dev libzstd-dev libxml2-dev zlib1g-dev)
[ "$vulkan" = ON ] && packages+=(libvulkan-dev spirv-headers spirv-tools mesa-vulkan-drivers vulkan-tools)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
if [ "$cuda" = ON ] && ! command -v nvcc >/dev/null; then
    echo "--cuda needs the CUDA toolkit (nvcc on PATH)" >&2
    exit 1
fi

mkdir -p "$cache"
exec > >(tee -a "$cache/build.log") 2>&1
src=$cache/src
if [ ! -f "$src/.complete" ]; then
    rm -rf "$src" && mkdir -p "$src"
    git -C "$TVM_SOURCE" archive "$commit" | tar -x -C "$src"
    mkdir -p "$src/3rdparty/tvm-ffi"
    git -C "$TVM_FFI_SOURCE" archive "$ffi_commit" | tar -x -C "$src/3rdparty/tvm-ffi"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$cache/wheels" \
        "apache-tvm-ffi==$tvm_ffi_wheel"
    python3 -m zipfile -e "$(ls "$cache"/wheels/apache_tvm_ffi-*.whl)" "$cache/wheels/tvm_ffi"
    rm -rf "$src/3rdparty/tvm-ffi/3rdparty"
    cp -r "$cache/wheels/tvm_ffi/tvm_ffi/3rdparty" "$src/3rdparty/tvm-ffi/3rdparty"
    touch "$src/.complete"
fi

# scikit-build-core, setuptools-scm and a CMake >= 3.26 (tvm-ffi's minimum; Debian 12 has 3.25).
buildenv=$cache/buildenv
if [ ! -x "$buildenv/bin/python" ]; then
    python3 -m venv "$buildenv"
    "$buildenv/bin/python" -m pip install --quiet 'scikit-build-core>=0.11' 'setuptools-scm>=8' \
        'cmake>=3.26' wheel
fi

# The shared libLLVM: `llvm-config --link-static` fails to link on Debian (no libPolly.a).
defines=(
    -C "cmake.define.USE_LLVM=/usr/bin/llvm-config-15"
    -C "cmake.define.USE_VULKAN=$vulkan"
    -C "cmake.define.USE_CUDA=$cuda"
    -C "cmake.define.USE_Z3=OFF"
    -C "cmake.define.HIDE_PRIVATE_SYMBOLS=ON"
)
start=$(date +%s)
# The build directory is kept, so a failed packaging step reruns incrementally.
PATH="$buildenv/bin:$PATH" SETUPTOOLS_SCM_PRETEND_VERSION="$version" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$buildenv/bin/python" -m pip wheel --no-build-isolation --no-deps -v \
    -C "build-dir=$cache/build" -C build.verbose=true "${defines[@]}" \
    -w "$cache/dist.part" "$src"
mv "$cache/dist.part" "$cache/dist"
echo "built in $(( ($(date +%s) - start) / 60 )) min"
install_wheel
