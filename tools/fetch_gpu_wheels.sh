#!/usr/bin/env bash
# The wheels tools/gpu_check.py needs on the lent GPU machine: the packages ssl_vision imports that its image
# lacks (kornia, hydra-core, omegaconf and what they need that is not there either: kornia-rs and the
# antlr4 runtime; PyYAML, packaging and numpy are there), for CPython 3.12 on x86-64 Linux. That machine has no
# network, so they travel with the repository (the device tool: carry [".whl"]) and are installed there with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#
#   bash tools/fetch_gpu_wheels.sh            # into .whl/ (added to .git/info/exclude: never committed)
#   bash tools/fetch_gpu_wheels.sh DIR        # into DIR
#
# The versions are the ones the project's tests run with. PYTHON picks the interpreter whose pip is used
# (default python3); it needs network access to the package index.
set -euo pipefail

dest="${1:-.whl}"
python="${PYTHON:-python3}"
mkdir -p "$dest"

"$python" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$dest" \
    kornia==0.9.0 kornia-rs==0.2.0 hydra-core==1.3.8 omegaconf==2.3.1
# hydra-core and omegaconf pin antlr4-python3-runtime==4.9.*, whose 4.9.3 is published as a source archive
# only: build its pure-Python (py3-none-any) wheel here
"$python" -m pip wheel --no-deps --no-binary antlr4-python3-runtime -w "$dest" antlr4-python3-runtime==4.9.3

# keep the wheels out of git when they land inside a work tree
if top=$(git -C "$dest" rev-parse --show-toplevel 2>/dev/null); then
    rel=$(realpath --relative-to="$top" "$dest")
    exclude=$(git -C "$top" rev-parse --path-format=absolute --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qxF "/$rel/" "$exclude" 2>/dev/null || echo "/$rel/" >> "$exclude"
fi
ls -l "$dest"/*.whl
