#!/usr/bin/env bash
# Build the standalone desktop app: packaging/dist/offramp/offramp-app (see packaging/README.md).
#
#   packaging/build.sh                                  # fresh build venv, CPU-only torch (small)
#   PYTHON=/path/to/venv/bin/python packaging/build.sh  # reuse an environment that has the
#                                                       # dependencies and pyinstaller (offline)
#   TORCH_INDEX= packaging/build.sh                     # fresh venv, torch from PyPI (on Linux: CUDA, ~4 GB more)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
build=$here/build
dist=$here/dist
start=$(date +%s)

if [[ -n ${PYTHON:-} ]]; then
    py=$PYTHON
    "$py" -m PyInstaller --version >/dev/null 2>&1 || {
        echo "build.sh: $py has no PyInstaller; run: $py -m pip install pyinstaller" >&2; exit 2; }
    wheel_flags=(--no-build-isolation --no-index)  # offline: the environment's setuptools builds it
else
    py=$build/venv/bin/python
    [[ -x $py ]] || "${BASE_PYTHON:-python3}" -m venv "$build/venv"
    "$py" -m pip install --quiet --upgrade pip
    index=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
    if [[ -n $index ]]; then  # torch first, from its CPU index, so that the project does not pull the CUDA build
        "$py" -m pip install --quiet torch torchvision --index-url "$index"
    fi
    wheel_flags=()
fi

# The project's wheel, built from a copy: setuptools leaves build/ next to the sources it builds,
# and a stale one leaks into later wheels.
rm -rf "$build/src" "$build/wheel" "$build/site"
mkdir -p "$build/src"
cp -r "$root/pyproject.toml" "$root/README.md" "$root/engine" "$root/app" "$root/resources" "$build/src/"
find "$build/src" -name __pycache__ -prune -exec rm -rf {} +
"$py" -m pip wheel --quiet --no-deps ${wheel_flags[@]+"${wheel_flags[@]}"} -w "$build/wheel" "$build/src"
wheel=$(ls "$build"/wheel/offramp-*.whl)

if [[ -n ${PYTHON:-} ]]; then
    # The environment may hold the project installed editable (a developer's venv): leave it alone
    # and install the wheel into a private folder that the recipe puts first on the path.
    "$py" -m pip install --quiet --no-deps --target "$build/site" "$wheel"
    export OFFRAMP_SITE=$build/site
else
    "$py" -m pip install --quiet "$wheel" pyinstaller
fi

"$py" -m PyInstaller --noconfirm --clean --log-level WARN \
    --distpath "$dist" --workpath "$build/pyinstaller" "$here/offramp.spec"

echo "build.sh: built $dist/offramp/offramp-app in $(( $(date +%s) - start )) s"
du -sh "$dist/offramp"
