#!/usr/bin/env bash
# Wheels for a GPU machine whose image has torch (and CUDA, nvcc) but not this project's other
# packages and no network: what the GPU suite imports, for that machine's Python (PYV, default 3.12),
# into .whl/ (DEST). Run here, where PyPI is reachable, after `make venv`; then on the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD PY=python3 bash tools/gpu_suite.sh
# The first CUDA run (docs/platform-notes.md, "The first CUDA run") needed exactly these.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${PYV:-3.12}
DEST=${DEST:-.whl}
pin() { grep -i "^$1==" requirements.txt; }  # the versions this repository pins
mkdir -p "$DEST"
platform=(--only-binary=:all: --python-version "$PYV" --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST")
# their own dependencies (numpy, pyyaml, cloudpickle, msgpack, ninja, psutil, ...) are in a CUDA image
python3 -m pip download -q --no-deps "${platform[@]}" "$(pin webdataset)" "$(pin braceexpand)" "$(pin lpips)" \
    "$(pin submitit)" hjson
python3 -m pip download -q "${platform[@]}" pydantic  # DeepSpeed's config; resolves its exact pydantic-core
# DeepSpeed publishes an sdist only: a wheel with no ops prebuilt (FusedAdam builds with nvcc at first use)
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$(pin deepspeed)"
ls "$DEST"
