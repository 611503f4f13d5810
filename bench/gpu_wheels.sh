#!/usr/bin/env bash
# The wheels a lent GPU machine lacks for bench/gpu_adaptive.sh (it has Python 3.12 and torch with
# Triton, and no network): download them here into .whl/ (git-ignored), then carry .whl to it and
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
# Versions follow this checkout's environment where it has them (pyproject.toml's pins).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
want() {  # the installed version of a distribution, else the bare name
  "$py" -c "import importlib.metadata as m, sys
try: print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')
except m.PackageNotFoundError: print(sys.argv[1])" "$1"
}
pkgs=()
for d in pydantic pydantic-core annotated-types typing-extensions typing-inspection pyyaml pillow \
         numpy tqdm cityscapesscripts hjson ninja py-cpuinfo msgpack psutil packaging einops; do
  pkgs+=("$(want "$d")")
done
mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version 3.12 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  --platform any -d .whl "${pkgs[@]}"
# DeepSpeed ships as a source archive: build its pure-Python wheel (no ops compiled)
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps -w .whl "$(want deepspeed)"
ls .whl
