#!/bin/bash
# `npu-dit bench ulysses` on a lent device machine's CPU (16 cores there: Gloo's threads get cores of
# their own). That machine has its own torch and no network, so the project and diffusers travel as
# wheels in .whl/ (ignored by git), made here first:
#   .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl .
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_17_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
# then run `bash tools/device_bench_ulysses.sh [bench options]` there with `.whl` carried. Results
# land in $OUT (machine.txt, cpu16.json, and cpu16.err with one line per run).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/npu_dit_device_bench}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site
{ nproc; lscpu | grep -E "Model name|^CPU\(s\)|Thread|Socket|NUMA node\(s\)"; free -g | head -2
  python3 -c "import torch, diffusers, transformers, npu_dit; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--warmup 2 --iters 5 --runs 5 --no-peer)
timeout 530 python3 -m npu_dit.tools.cli bench ulysses "${ARGS[@]}" --json > "$OUT/cpu16.json" 2> >(tee "$OUT/cpu16.err" >&2)
echo "bench rc $?"
